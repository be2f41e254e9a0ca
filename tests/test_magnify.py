"""Motion magnification on a real photograph moved by known sub-pixel amounts."""

from __future__ import annotations

import functools

import cv2
import h5py
import numpy as np
import pytest
from skimage import data
from skimage.filters import window
from skimage.metrics import structural_similarity
from skimage.registration import phase_cross_correlation

from mer.common import PipelineError, read_h5, write_h5
from mer.magnify import METHODS, luminance, magnify_file, magnify_pair, pyramid_filters

SIZE = 224
ALPHA = 3.0


@functools.cache
def _spectrum() -> tuple[np.ndarray, int]:
    """FFT of the astronaut's head and shoulders (288² context), mirrored so it is periodic."""
    crop = cv2.resize(data.astronaut()[0:320, 110:430], (288, 288), interpolation=cv2.INTER_AREA)
    n = crop.shape[0]
    # Even extension: shifting it in the Fourier domain wraps no edge step into the picture.
    periodic = np.pad(crop.astype(np.float64), ((n, 0), (n, 0), (0, 0)), mode="symmetric")
    return np.fft.fft2(periodic, axes=(0, 1)), n


def moved(dx: float, dy: float = 0.0) -> np.ndarray:
    """SIZE² uint8 RGB crop of the photograph translated by (dx, dy) pixels, exactly (band-limited)."""
    spectrum, n = _spectrum()
    fy = np.fft.fftfreq(2 * n)[:, None, None]
    fx = np.fft.fftfreq(2 * n)[None, :, None]
    image = np.fft.ifft2(spectrum * np.exp(-2j * np.pi * (fx * dx + fy * dy)), axes=(0, 1)).real
    m = n + (n - SIZE) // 2
    return np.clip(np.rint(image[m:m + SIZE, m:m + SIZE]), 0, 255).astype(np.uint8)


def displacement(reference: np.ndarray, image: np.ndarray) -> np.ndarray:
    """(dy, dx) of `image` relative to `reference`: Hann-windowed phase correlation, 1/200 px."""
    hann = window("hann", reference.shape[:2])
    a, b = luminance(reference), luminance(image)
    shift, _, _ = phase_cross_correlation((a - a.mean()) * hann, (b - b.mean()) * hann, upsample_factor=200)
    return -shift


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(a, b, channel_axis=2, data_range=255)


def test_moved_is_a_translation():
    # The ground-truth generator itself: measured motion is the requested one.
    np.testing.assert_allclose(displacement(moved(0), moved(0.75, -0.5)), [-0.5, 0.75], atol=0.02)


@pytest.mark.parametrize("method", list(METHODS))
def test_alpha_one_is_the_apex(method):
    onset, apex = moved(0), moved(0.5)
    assert np.array_equal(magnify_pair(onset, apex, method, 1.0), apex)
    if method in ("linear", "phase"):  # the method itself, past magnify_pair's α = 1 shortcut
        own = METHODS[method](onset, apex, 1.0, levels=4, orientations=4, sigma=2.0, weights="")
        assert np.abs(own - apex.astype(np.float32)).max() < 1e-3


@pytest.mark.parametrize("alpha", [0.0, 3.0, 10.0])
def test_none_returns_the_apex(alpha):
    onset, apex = moved(0), moved(1.0)
    assert np.array_equal(magnify_pair(onset, apex, "none", alpha), apex)


@pytest.mark.parametrize("method", ["linear", "phase"])
def test_static_pair_stays(method):
    apex = moved(0.3)
    out = magnify_pair(apex.copy(), apex, method, ALPHA)
    assert np.abs(out.astype(int) - apex).max() <= 1


@pytest.mark.parametrize("shape", [(224, 224), (223, 225), (64, 80)])
def test_pyramid_rebuilds_exactly(shape):
    # Analysis then synthesis (half the analysis filter, real part) plus both residuals = identity.
    bands, high, low = pyramid_filters(*shape, 4, 4)
    rng = np.random.default_rng(0)
    image = rng.normal(size=shape)
    spectrum = np.fft.fft2(image)
    complex_bands = np.fft.ifft2(spectrum * bands)
    synthesis = (np.fft.fft2(complex_bands) * bands / 2).sum(0)
    rebuilt = np.fft.ifft2(synthesis + spectrum * (high**2 + low**2)).real
    np.testing.assert_allclose(rebuilt, image, atol=1e-5)


@pytest.mark.parametrize("d", [0.25, 0.5, 1.0])
def test_phase_reaches_alpha_times_the_motion(d):
    onset, apex, truth = moved(0), moved(d), moved(ALPHA * d)
    out = magnify_pair(onset, apex, "phase", ALPHA)
    dy, dx = displacement(onset, out)
    # Measured 0.85-0.86 of the target: frequencies below π/16 (low residual) are not moved, and
    # the top octave falls short once α·d·ω nears π. Vertical motion stays ~0.
    assert 0.7 * ALPHA * d <= dx <= 1.1 * ALPHA * d
    assert abs(dy) < 0.05
    # ...and the picture is the moved photograph, not just a moved peak (measured 0.92-0.99).
    assert ssim(out, truth) >= 0.9
    assert ssim(out, truth) > ssim(apex, truth)


def test_linear_is_right_for_tiny_motion_and_breaks_down_for_large():
    onset = moved(0)
    ratio = {d: displacement(onset, magnify_pair(onset, moved(d), "linear", ALPHA))[1] / (ALPHA * d)
             for d in (0.1, 1.0)}
    # Measured 0.87 at 0.1 px: a first-order step 1 + α(e^{-iωd} − 1) falls short of e^{-iαωd}
    # near Nyquist, and phase correlation weights every frequency alike.
    assert 0.85 <= ratio[0.1] <= 1.1
    # Measured 0.41 at 1 px: barely more than the apex's own motion (1/α = 0.33).
    assert ratio[1.0] < 0.6
    apex, truth = moved(1.0), moved(ALPHA)
    linear, phase = (magnify_pair(onset, apex, m, ALPHA) for m in ("linear", "phase"))
    assert ssim(linear, truth) < 0.75 < 0.9 < ssim(phase, truth)  # measured 0.68 vs 0.92


def test_grey_and_colour_agree_on_luminance_motion():
    onset, apex = moved(0), moved(0.5)
    grey = magnify_pair(cv2.cvtColor(onset, cv2.COLOR_RGB2GRAY), cv2.cvtColor(apex, cv2.COLOR_RGB2GRAY),
                        "phase", ALPHA)
    colour = magnify_pair(onset, apex, "phase", ALPHA)
    assert grey.shape == (SIZE, SIZE) and grey.dtype == np.uint8
    assert np.abs(grey.astype(int) - cv2.cvtColor(colour, cv2.COLOR_RGB2GRAY)).mean() < 1.0
    # Chrominance is the apex's: R−G and B−G differences only change where the clip bites.
    changed = (colour.astype(int) - apex)
    inside = (colour > 0).all(-1) & (colour < 255).all(-1)
    spread = changed.max(-1) - changed.min(-1)
    assert spread[inside].max() <= 1


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(PipelineError, match="none, linear, phase"):
        magnify_pair(moved(0), moved(0.5), "eulerian", ALPHA)


@pytest.mark.parametrize("alpha", [-1.0, float("nan"), float("inf")])
def test_bad_alpha_is_refused(alpha):
    with pytest.raises(PipelineError, match="alpha"):
        magnify_pair(moved(0), moved(0.5), "phase", alpha)


def test_mismatched_pair_is_refused():
    with pytest.raises(PipelineError, match="share"):
        magnify_pair(moved(0), moved(0.5)[:100], "phase", ALPHA)


def test_stage_end_to_end(tmp_path):
    onset = np.stack([moved(0), moved(0.2, 0.1), moved(-0.5)])
    apex = np.stack([moved(0.5), moved(0.2, 0.4), moved(-0.5)])
    sample = np.array(["EP01_1", "EP02_3", "EP07_f"])
    frames = tmp_path / "frames.h5"
    write_h5(frames, {"onset": onset, "apex": apex, "subject": np.array(["sub01", "sub01", "sub02"]),
                      "sample": sample}, {})
    params = {"method": "phase", "alpha": 3.0, "levels": 4, "orientations": 4, "sigma": 2.0}
    first, second = tmp_path / "a" / "magnified.h5", tmp_path / "b" / "magnified.h5"
    assert magnify_file(frames, first, params, workers=2) == 3
    magnify_file(frames, second, params, workers=1)
    assert first.read_bytes() == second.read_bytes()  # deterministic, and independent of the pool

    arrays, attrs = read_h5(first)
    assert list(arrays) == ["apex_magnified", "sample"]
    out = arrays["apex_magnified"]
    assert out.shape == (3, SIZE, SIZE, 3) and out.dtype == np.uint8
    assert list(arrays["sample"]) == list(sample)
    assert attrs["method"] == "phase" and attrs["alpha"] == 3.0
    assert '"levels": 4' in attrs["params"] and "numpy" in attrs["versions"]
    np.testing.assert_array_equal(out[0], magnify_pair(onset[0], apex[0], "phase", 3.0))
    assert np.abs(out[2].astype(int) - apex[2]).max() <= 1  # static sample
    with h5py.File(first) as f:  # the pair's motion is there, tripled
        assert displacement(onset[1], f["apex_magnified"][1])[0] == pytest.approx(0.9, abs=0.3)


def test_stage_refuses_bad_params_before_reading(tmp_path):
    params = {"method": "magic", "alpha": 3.0, "levels": 4, "orientations": 4, "sigma": 2.0}
    with pytest.raises(PipelineError, match="none, linear, phase"):
        magnify_file(tmp_path / "absent.h5", tmp_path / "out.h5", params, workers=1)
