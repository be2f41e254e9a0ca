"""Motion magnification: exaggerate the onset → apex motion of each aligned crop pair by `magnify.alpha`.

α is the TOTAL displacement factor: the magnified apex shows α × the onset → apex motion, so
α = 1 returns the apex unchanged (bit for bit, for every method) and the paper's 3 triples it.

Methods (one entry of METHODS each, so `learned` plugs in as one more line):

* none:   the apex as is.
* linear: two-frame Eulerian, apex + (α − 1)(apex − onset) on the full band, in float, clipped to
          0..255 (rounded only for uint8 input, as every method's result). A first-order Taylor
          step: right while the magnified motion is well below a pixel, then it turns into an
          overshooting intensity difference (docs/magnification.md).
* phase:  two-frame phase-based (Wadhwa et al. 2013): complex steerable pyramid of the luminance,
          per band the phase difference apex vs onset is amplitude-weighted smoothed and the apex
          phase pushed on by (α − 1) × that difference. Octave bandwidth; `levels` octaves from π/4..π
          down plus one band above π/2, so (levels + 1) × orientations bands (see pyramid_filters).
          The low-pass residual (below ~π/16) and chrominance stay the apex's. ~0.1 s per 224² pair.
* learned: Oh et al. 2018, the network of mer/magnifier.py with the weights file `magnify.weights`
          (written by stage `train_magnifier` of magnification/dvc.yaml, loaded once per process).
          Opt-in: docs/magnification.md says how it measures against phase.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import scipy.fft

from mer.common import (
    PipelineError,
    package_versions,
    parallel_map,
    read_h5,
    round_uint8,
    single_threaded,
    write_h5,
)

# Rec. 601 luma, the Y of both YIQ and YCrCb. Its weights sum to 1 and the chroma rows of those
# transforms sum to 0, so adding ΔY to R, G and B alike changes Y by ΔY and leaves I, Q (Cr, Cb) alone.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
EPS = 1e-12  # keeps the amplitude-weighted mean finite where a band has no energy at all


def _check_pair(onset: np.ndarray, apex: np.ndarray) -> None:
    if onset.shape != apex.shape:
        raise PipelineError(f"onset is {onset.shape} but apex is {apex.shape}: a pair must share its shape")
    if onset.ndim not in (2, 3) or (onset.ndim == 3 and onset.shape[2] != 3):
        raise PipelineError(f"frames are {onset.shape}: expected H×W×3 RGB or H×W grey")
    if onset.dtype != apex.dtype or onset.dtype not in (np.uint8, np.float32):
        raise PipelineError(f"frames are {onset.dtype}/{apex.dtype}: expected both uint8 or both float32 "
                            "(grey levels 0..255)")


def luminance(image: np.ndarray) -> np.ndarray:
    """H×W float32 luma of an H×W×3 RGB or H×W grey image (grey levels 0..255)."""
    return image.astype(np.float32) if image.ndim == 2 else image.astype(np.float32) @ LUMA


# ---------------------------------------------------------------------------------------------
# Complex steerable pyramid (Portilla & Simoncelli 2000 filters, octave bandwidth), built in the
# frequency domain at full resolution: no down-sampling means no aliasing between levels and any
# H×W works; at 224² and the default (4 + 1) × 4 bands it still costs only a few tens of FFTs.


def _lo(r: np.ndarray) -> np.ndarray:
    """Radial low-pass: 1 below π/4, 0 above π/2, raised-cosine in log2 radius between; Lo² + Hi² = 1."""
    with np.errstate(divide="ignore"):
        t = np.clip(-np.log2(r / (np.pi / 2)), 0.0, 1.0)
    return np.sin(np.pi / 2 * t)


def _hi(r: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        t = np.clip(-np.log2(r / (np.pi / 2)), 0.0, 1.0)
    return np.cos(np.pi / 2 * t)


@functools.lru_cache(maxsize=8)
def pyramid_filters(height: int, width: int, levels: int, orientations: int) -> tuple[np.ndarray, ...]:
    """(bands, high, low): bands is ((levels+1)·orientations)×H×W float32 analysis filters on the fft2 grid.

    Band (k, o) = 2 · radial_k(r) · α_K cos^(K−1)(θ − πo/K) on the half plane where that cosine is
    positive (analytic: the band response is complex and its phase is local phase). Radial parts are
    Portilla & Simoncelli's octave raised-cosine pairs: radial_k = Lo(2^(k−2) r) Hi(2^(k−1) r) for
    k = 1..levels (octaves π/2^(k+1)..π/2^(k-1)), `low` = Lo(2^(levels−1) r) keeps what is below.
    radial_0 = Hi(r/2) is their "high-pass residual" (π/2 up to the corners), made a band of its own
    here rather than left unmagnified: it holds ~80% of the DFT grid, and leaving it alone drags the
    apparent motion back towards 1× (measured: 0.4 of the target instead of ~0.8). Only the Nyquist
    row/column (a frequency that is its own negative, so it has no analytic half) stays in `high`.
    The synthesis filter is half the analysis filter; Re(Σ synthesised bands) + high² + low²
    rebuilds the image exactly (tests/test_magnify.py checks it).
    """
    fy = 2 * np.pi * np.fft.fftfreq(height)[:, None]
    fx = 2 * np.pi * np.fft.fftfreq(width)[None, :]
    r = np.hypot(fx, fy)
    theta = np.arctan2(fy, fx)
    nyquist = np.zeros((height, width), bool)
    if height % 2 == 0:
        nyquist[height // 2, :] = True
    if width % 2 == 0:
        nyquist[:, width // 2] = True
    k = orientations
    alpha_k = 2 ** (k - 1) * math.factorial(k - 1) / math.sqrt(k * math.factorial(2 * (k - 1)))
    angular = []
    for o in range(k):
        c = np.cos(theta - np.pi * o / k)
        angular.append(np.where(c > 0, alpha_k * np.abs(c) ** (k - 1), 0.0))
    radial = [_hi(r / 2) * ~nyquist] + [_lo(r * 2.0 ** (k - 2)) * _hi(r * 2.0 ** (k - 1))
                                        for k in range(1, levels + 1)]
    bands = [2 * rad * a for rad in radial for a in angular]
    filters = (np.stack(bands).astype(np.float32), nyquist.astype(np.float32),
               _lo(r * 2.0 ** (levels - 1)).astype(np.float32))
    for f in filters:
        f.flags.writeable = False  # shared by every call (and forked worker): nobody may edit them
    return filters


def _smooth(image: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def phase_delta(y_onset: np.ndarray, y_apex: np.ndarray, alpha: float, levels: int, orientations: int,
                sigma: float) -> np.ndarray:
    """H×W float32 luminance change that takes the apex from 1× to α× the onset → apex motion.

    Only the pyramid bands change, so the result is the synthesis of c_apex·(e^{i(α−1)Δφ} − 1)
    alone: the apex's own residuals and band content never pass through a lossy rebuild, and
    α = 1 or Δφ = 0 give exactly 0.
    """
    height, width = y_apex.shape
    bands, _, _ = pyramid_filters(height, width, levels, orientations)
    fft = functools.partial(scipy.fft.fft2, workers=1)  # one process per core already (parallel_map)
    ifft = functools.partial(scipy.fft.ifft2, workers=1)
    c_onset = ifft(fft(y_onset.astype(np.complex64))[None] * bands)
    c_apex = ifft(fft(y_apex.astype(np.complex64))[None] * bands)
    product = c_apex * np.conj(c_onset)
    dphi = np.angle(product).astype(np.float32)
    weight = np.abs(product).astype(np.float32)  # |c_apex|·|c_onset|: phase is noise where either is weak
    if sigma > 0:
        for b in range(len(bands)):
            # σ is in pixels of the π/4..π octave (band 1); octave k's filters are 2^(k−1) times
            # wider, so is its blur (the top band gets the same σ: half its width would be too noisy).
            s = sigma * 2.0 ** max(b // orientations - 1, 0)
            dphi[b] = _smooth(weight[b] * dphi[b], s) / (_smooth(weight[b], s) + EPS)
    change = c_apex * (np.exp(1j * (alpha - 1) * dphi) - 1)
    spectrum = (fft(change) * (bands / 2)).sum(axis=0)
    return ifft(spectrum).real.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Methods: f(onset, apex, alpha, levels, orientations, sigma, weights) -> float32 grey levels 0..255,
# not rounded; inputs already checked.


def _none(onset: np.ndarray, apex: np.ndarray, alpha: float, **_: Any) -> np.ndarray:
    return apex.astype(np.float32)


def _linear(onset: np.ndarray, apex: np.ndarray, alpha: float, **_: Any) -> np.ndarray:
    # Written as apex + (α−1)·diff, not onset + α·diff, so α = 1 is exact whatever the rounding.
    a, o = apex.astype(np.float32), onset.astype(np.float32)
    return np.clip(a + np.float32(alpha - 1) * (a - o), 0, 255)


def _phase(onset: np.ndarray, apex: np.ndarray, alpha: float, levels: int, orientations: int,
           sigma: float, **_: Any) -> np.ndarray:
    delta = phase_delta(luminance(onset), luminance(apex), alpha, levels, orientations, sigma)
    if apex.ndim == 3:
        delta = delta[..., None]  # same ΔY on R, G, B: chrominance stays the apex's (see LUMA)
    return np.clip(apex.astype(np.float32) + delta, 0, 255)


@functools.cache
def learned_model(path: str) -> Any:
    """The learned magnifier with the weights file `path`, loaded once per process."""
    from mer.magnifier import load_model  # torch is imported only when `learned` is used

    if not path:
        raise PipelineError("magnify.weights is empty: set it to the learned magnifier's weights file "
                            "(models/magnifier.pt: `dvc repro magnification/dvc.yaml:train_magnifier`)")
    return load_model(path)


def learned(onset: np.ndarray, apex: np.ndarray, alpha: float, *, weights: Path | str = "",
            **_: Any) -> np.ndarray:
    """The learned magnifier's output at any α, 1 included (magnify_pair short-circuits α = 1)."""
    import torch

    from mer.magnifier import to_levels, to_tensor

    model = learned_model(str(weights))
    grey = apex.ndim == 2
    pair = np.stack([onset, apex])
    if grey:
        pair = np.repeat(pair[..., None], 3, axis=3)
    height, width = apex.shape[:2]
    pad_y, pad_x = -height % 4, -width % 4  # the net halves the size twice
    mode = "reflect" if min(height, width) > max(pad_y, pad_x) else "edge"
    pair = np.pad(pair, ((0, 0), (0, pad_y), (0, pad_x), (0, 0)), mode=mode)
    # one thread: one process per core already (parallel_map)
    with single_threaded(torch.get_num_threads, torch.set_num_threads), torch.inference_mode():
        x = to_tensor(pair)
        out = to_levels(model(x[:1], x[1:], torch.tensor([alpha], dtype=torch.float32)))[0, :height, :width]
    return luminance(out) if grey else out  # back to grey through the same luma as everywhere else


METHODS: dict[str, Callable[..., np.ndarray]] = {"none": _none, "linear": _linear, "phase": _phase,
                                                 "learned": learned}


def magnify_pair(onset: np.ndarray, apex: np.ndarray, method: str, alpha: float, levels: int = 4,
                 orientations: int = 4, sigma: float = 2.0, weights: Path | str = "") -> np.ndarray:
    """Apex with α × the onset → apex motion; H×W×3 RGB or H×W grey in, same shape and dtype out: uint8
    rounded, float32 (the `frames` stage's crops) not. `weights`: the learned magnifier's weights file
    (method `learned` only)."""
    if method not in METHODS:
        raise PipelineError(f"magnify.method is {method!r}: use one of {', '.join(METHODS)}")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise PipelineError(f"magnify.alpha is {alpha}: use a finite factor >= 0 (1 = no magnification)")
    if int(levels) != levels or levels < 1 or int(orientations) != orientations or orientations < 1:
        raise PipelineError(f"magnify.levels={levels}, orientations={orientations}: use integers >= 1")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise PipelineError(f"magnify.sigma is {sigma}: use pixels >= 0 (0 = no smoothing)")
    onset, apex = np.asarray(onset), np.asarray(apex)
    _check_pair(onset, apex)
    if alpha == 1:
        return apex.copy()  # the identity by definition; also skips the pyramid's cost
    out = METHODS[method](onset, apex, float(alpha), levels=int(levels), orientations=int(orientations),
                          sigma=float(sigma), weights=weights)
    return round_uint8(out) if apex.dtype == np.uint8 else out.astype(np.float32, copy=False)


def magnify_item(pair: tuple[np.ndarray, np.ndarray], magnify_params: dict[str, Any]) -> np.ndarray:
    """magnify_pair of one (onset, apex) pair with the `magnify` params section."""
    p = magnify_params
    return magnify_pair(pair[0], pair[1], p["method"], p["alpha"], p["levels"], p["orientations"], p["sigma"],
                        p.get("weights", ""))


def magnify_all(onset: np.ndarray, apex: np.ndarray, magnify_params: dict[str, Any],
                workers: int) -> np.ndarray:
    """N×H×W(×3) magnified apexes (the crops' dtype), one sample per pool task."""
    work = functools.partial(magnify_item, magnify_params=magnify_params)
    out = parallel_map(work, list(zip(onset, apex)), workers, desc="magnify")
    return np.stack(out) if out else np.zeros_like(apex)


def magnify_file(frames_h5: Path | str, out_h5: Path | str, magnify_params: dict[str, Any],
                 workers: int) -> int:
    """Read onset/apex crops from `frames_h5`, write `apex_magnified` + `sample` to `out_h5`; returns N."""
    p = magnify_params
    missing = [key for key in ("method", "alpha", "levels", "orientations", "sigma") if key not in p]
    if missing:
        raise PipelineError(f"params.yaml magnify: missing {', '.join(missing)}")
    # Fail on the parameters before reading or computing anything.
    magnify_item((np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)), p)
    frames, _ = read_h5(frames_h5, ["onset", "apex", "sample"])
    onset, apex, sample = frames["onset"], frames["apex"], frames["sample"]
    if onset.shape != apex.shape or len(sample) != len(apex):
        raise PipelineError(f"{frames_h5}: onset {onset.shape}, apex {apex.shape} and {len(sample)} sample "
                            "names disagree: rerun the frames stage")
    magnified = magnify_all(onset, apex, p, workers)
    write_h5(out_h5, {"apex_magnified": magnified, "sample": sample},
             {"method": p["method"], "alpha": float(p["alpha"]), "params": {"magnify": p},
              "versions": package_versions()})
    return len(magnified)
