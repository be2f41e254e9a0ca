"""Optical flow: TV-L1 from the onset crop to the magnified apex crop.

Stores raw float32 (u, v) in crop pixels: normalising is the model's business, so a change
of normalisation never invalidates this (slow) cache.

TV-L1 assumes that a point keeps its brightness. A light that changes between onset and apex
breaks that: a 3% gain gives ~1.3 px of spurious flow on a 224 crop, as much as a magnified
micro-expression. `flow.illumination` first maps the apex's grey levels onto the onset's with a
smooth gain and offset field (polynomials in x, y of degree 0 = global, the default, 1 = linear,
2 = quadratic; least squares over the crop, reweighted so that the pixels a movement or a blink
changes weigh little), then computes the flow (docs/pipeline.md, "Lighting").
"""

from __future__ import annotations

import functools
from typing import Any

import cv2
import numpy as np

from mer.common import parallel_map


def tvl1(flow_params: dict[str, Any]) -> cv2.optflow.DualTVL1OpticalFlow:
    """cv2's Dual TV-L1 with the `flow` params (names as in params.yaml)."""
    p = flow_params
    return cv2.optflow.DualTVL1OpticalFlow_create(
        tau=p["tau"], lambda_=p["lambda"], theta=p["theta"], nscales=p["nscales"], warps=p["warps"],
        epsilon=p["epsilon"], innnerIterations=p["inner_iterations"], outerIterations=p["outer_iterations"],
        scaleStep=p["scale_step"], gamma=p["gamma"], medianFiltering=p["median_filtering"],
    )


ILLUMINATION_DEGREES = {"none": None, "global": 0, "linear": 1, "quadratic": 2}


def grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image


def match_illumination(reference: np.ndarray, image: np.ndarray, degree: int, passes: int = 3) -> np.ndarray:
    """`image` (grey uint8) with its lighting mapped onto `reference`'s, as float64 grey levels (not
    rounded: re-quantising a near-identity map draws one-grey-level contours that TV-L1 reads as flow).

    Fits reference ≈ g(x, y) image + o(x, y), g and o polynomials of `degree` in the centred,
    unit-scaled pixel coordinates, by least squares reweighted `passes` times with Huber weights
    (k = 1.345 robust sd): the pixels that a movement or a blink changes weigh less than the light."""
    h, w = image.shape
    y, x = np.mgrid[0:h, 0:w]
    x, y = (x.ravel() / max(w - 1, 1) - 0.5), (y.ravel() / max(h - 1, 1) - 0.5)
    terms = [np.ones_like(x)] + [x**i * y ** (d - i) for d in range(1, degree + 1) for i in range(d, -1, -1)]
    basis = np.stack(terms, axis=1)  # HW x T
    pixels = image.ravel().astype(np.float64)
    design = np.concatenate([basis * pixels[:, None], basis], axis=1)  # gain terms, offset terms: HW x 2T
    target = reference.ravel().astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    for _ in range(passes):
        residual = np.abs(target - design @ coef)
        k = 1.345 * (1.4826 * np.median(residual) + 1e-6)
        root = np.sqrt(np.minimum(1.0, k / np.maximum(residual, 1e-12)))
        coef, *_ = np.linalg.lstsq(design * root[:, None], target * root, rcond=None)
    return np.clip(design @ coef, 0, 255).reshape(h, w)


def flow_pair(pair: tuple[np.ndarray, np.ndarray], flow_params: dict[str, Any]) -> np.ndarray:
    """H×W×2 float32 (u = x, v = y) flow from `pair[0]` to `pair[1]` (RGB or grey; uint8, or float32
    grey levels 0..255 as the `frames` stage's crops, which TV-L1 reads unrounded).

    With `flow_params["illumination"]` other than none, the second's lighting is fitted to the
    first's; where the fit changes it by at least `illumination_min` grey levels on average, TV-L1
    runs on the matched pair in float (cv2 reads float input as 0..1), else on the pair as given."""
    first, second = grey(pair[0]), grey(pair[1])
    mode = flow_params.get("illumination", "none")  # caches and models made before this key: no match
    if mode not in ILLUMINATION_DEGREES:
        raise ValueError(f"flow.illumination must be one of {list(ILLUMINATION_DEGREES)}, got {mode!r}")
    if ILLUMINATION_DEGREES[mode] is not None:
        matched = match_illumination(first, second, ILLUMINATION_DEGREES[mode])
        if np.abs(matched - second).mean() >= float(flow_params.get("illumination_min", 0.0)):
            second = matched
    if first.dtype != np.uint8 or second.dtype != np.uint8:
        first, second = ((image / 255).astype(np.float32) for image in (first, second))
    return tvl1(flow_params).calc(first, second, None).astype(np.float32)


def compute_flow(onset: np.ndarray, apex_magnified: np.ndarray, flow_params: dict[str, Any],
                 workers: int) -> np.ndarray:
    """N×H×W×2 float32 flows, onset → magnified apex, one sample per pool task."""
    work = functools.partial(flow_pair, flow_params=flow_params)
    return np.stack(parallel_map(work, list(zip(onset, apex_magnified)), workers, desc="flow"))
