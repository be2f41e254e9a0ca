"""Stage `flow`: TV-L1 optical flow from the onset crop to the magnified apex crop.

Stores raw float32 (u, v) in crop pixels: normalising is the model's business, so a change
of normalisation never invalidates this (slow) cache.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from mer.common import load_params, package_versions, parallel_map, read_h5, run_main, stage_paths, write_h5


def tvl1(flow_params: dict[str, Any]) -> cv2.optflow.DualTVL1OpticalFlow:
    """cv2's Dual TV-L1 with the `flow` params (names as in params.yaml)."""
    p = flow_params
    return cv2.optflow.DualTVL1OpticalFlow_create(
        tau=p["tau"], lambda_=p["lambda"], theta=p["theta"], nscales=p["nscales"], warps=p["warps"],
        epsilon=p["epsilon"], innnerIterations=p["inner_iterations"], outerIterations=p["outer_iterations"],
        scaleStep=p["scale_step"], gamma=p["gamma"], medianFiltering=p["median_filtering"],
    )


def grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image


def flow_pair(pair: tuple[np.ndarray, np.ndarray], flow_params: dict[str, Any]) -> np.ndarray:
    """H×W×2 float32 (u = x, v = y) flow from `pair[0]` to `pair[1]` (RGB or grey uint8)."""
    first, second = pair
    return tvl1(flow_params).calc(grey(first), grey(second), None).astype(np.float32)


def compute_flow(onset: np.ndarray, apex_magnified: np.ndarray, flow_params: dict[str, Any],
                 workers: int) -> np.ndarray:
    """N×H×W×2 float32 flows, onset → magnified apex, one sample per pool task."""
    work = functools.partial(flow_pair, flow_params=flow_params)
    return np.stack(parallel_map(work, list(zip(onset, apex_magnified)), workers, desc="flow"))


def main(argv: Sequence[str] | None = None) -> None:
    paths = stage_paths("flow", ["frames", "magnified", "out"], argv)
    params = load_params()
    frames, _ = read_h5(paths.frames, ["onset", "sample"])
    magnified, _ = read_h5(paths.magnified, ["apex_magnified"])
    flow = compute_flow(frames["onset"], magnified["apex_magnified"], params["flow"], params["workers"])
    write_h5(paths.out, {"flow": flow, "sample": frames["sample"]},
             {"params": {"flow": params["flow"]}, "versions": package_versions()})
    print(f"flow: {len(flow)} TV-L1 fields -> {paths.out}")


if __name__ == "__main__":
    run_main(main)
