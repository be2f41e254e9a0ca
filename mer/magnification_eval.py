"""The known-motion magnification evaluation: every magnify method on held-out synthetic motion with known
truth.

Scenes: the astronaut's face (held out of the magnifier's training photos) and a procedural texture
from a seed the training never draws. Motion: a global shift or smooth local bumps with max
displacement d ∈ MOTIONS px, clean or with sensor noise σ = 2 grey levels (2/255) on onset and apex.
Each method magnifies at α = 3; against the truth (the scene rendered at 3d, clean):

* ratio: achieved / target displacement (1 = exact; `none` gives ~1/3), TV-L1 flow (the pipeline's
  `flow` params) from the onset to the output, projected on the true magnified motion over the
  moving region: Σ m·u / Σ |u|², u = 3 × true apex motion, region = interior (global) or
  |u| ≥ half its max (local);
* SSIM (RGB) and PSNR against the truth;
* seconds per 224² pair (median of 3, one thread) and the learned net at α = 1 (forced through the
  network, not the α = 1 shortcut of magnify_pair): SSIM of its output vs the apex.

Stage `eval_magnification` writes the result to metrics/magnification.json and `plot`'s figure to
metrics/magnification_ratio.png.
"""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mer.common import (
    new_figure,
    parallel_map,
    save_figure,
    single_threaded,
    single_threaded_opencv,
)
from mer.flow import flow_pair
from mer.magnifier import flow_fields, procedural, quantise, render, to_uint8
from mer.magnify import METHODS, learned, learned_model, magnify_pair

ALPHA = 3.0
MOTIONS = (0.1, 0.25, 0.5, 1.0, 2.0)
NOISE = {"clean": 0.0, "noisy": 2.0}
KINDS = ("global", "local")
METHOD_NAMES = tuple(METHODS)
SIZE = 128  # evaluation crops; timing uses 224²
SEED = 20_000  # far from the training seeds


def scenes() -> dict[str, torch.Tensor]:
    """name → 3 × 2·SIZE × 2·SIZE float32 RGB scene in [0, 255] (frames are rendered at 2× and
    downsampled)."""
    from skimage import data

    face = data.astronaut()[30:250, 150:370].astype(np.float32)  # head, 220²
    face = np.clip(cv2.resize(face, (2 * SIZE, 2 * SIZE), interpolation=cv2.INTER_CUBIC), 0, 255)
    with one_thread():
        texture = procedural(np.random.default_rng(SEED), torch.Generator().manual_seed(SEED), 1, 2 * SIZE)[0]
    return {"face": torch.from_numpy(face).permute(2, 0, 1), "texture": texture}


def one_thread() -> contextlib.AbstractContextManager[None]:
    """torch on one thread: one process per core already (parallel_map), and no OpenMP pool to fork."""
    return single_threaded(torch.get_num_threads, torch.set_num_threads)


def make_case(scene: torch.Tensor, kind: str, d: float, noise: float, seed: int,
           size: int = SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(onset, apex, truth at α·d) size²×3 uint8 and the true magnified flow size²×2 for one case."""
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    with one_thread():
        flow = flow_fields(rng, size, np.array([d]), np.array([kind == "local"]))
        onset, apex, truth = render(scene[None], flow, torch.tensor([[0.0, 1.0, ALPHA]]))[0].unbind(0)
        onset, apex = to_uint8(quantise(torch.stack([onset, apex]), gen, noise))
        truth = to_uint8(quantise(truth[None], torch.Generator().manual_seed(seed + 1), 0.0))[0]
    return onset, apex, truth, ALPHA * flow[0].permute(1, 2, 0).numpy()


def ratio(measured: np.ndarray, true: np.ndarray, kind: str) -> float:
    norm = np.linalg.norm(true, axis=2)
    if kind == "global":
        region = np.zeros(norm.shape, bool)
        region[8:-8, 8:-8] = True
    else:
        region = norm >= 0.5 * norm.max()
    m, u = measured[region], true[region]
    return float((m * u).sum() / (u * u).sum())


def evaluate_case(case: tuple[str, str, float, str], scene_images: dict[str, torch.Tensor],
                  flow_params: dict[str, Any], weights: str) -> list[dict[str, Any]]:
    name, kind, d, noise_name = case
    seed = SEED + 1000 * list(scene_images).index(name) + 100 * KINDS.index(kind) + MOTIONS.index(d)
    onset, apex, truth, true_flow = make_case(scene_images[name], kind, d, NOISE[noise_name], seed)
    rows = []
    for method in METHOD_NAMES:
        out = magnify_pair(onset, apex, method, ALPHA, weights=weights)
        measured = flow_pair((onset, out), flow_params)
        rows.append({"scene": name, "kind": kind, "d": d, "noise": noise_name, "method": method,
                     "ratio": ratio(measured, true_flow, kind),
                     "ssim": float(structural_similarity(out, truth, channel_axis=2, data_range=255)),
                     "psnr": float(peak_signal_noise_ratio(truth, out, data_range=255))})
    if noise_name == "clean":  # the net itself at α = 1 (magnify_pair would short-circuit)
        rows.append({"scene": name, "kind": kind, "d": d, "noise": noise_name, "method": "learned@1",
                     "ssim": float(structural_similarity(learned(onset, apex, 1.0, weights=weights),
                                                         apex, channel_axis=2, data_range=255))})
    return rows


def seconds_per_pair(weights: str) -> dict[str, float]:
    """Median of 3 single-thread runs on a 224² pair (after one warm-up)."""
    with one_thread():
        scene = procedural(np.random.default_rng(SEED), torch.Generator().manual_seed(SEED), 1, 448)[0]
    onset, apex, _, _ = make_case(scene, "global", 0.5, 0.0, SEED, size=224)
    out = {}
    with single_threaded_opencv():
        for method in METHOD_NAMES:
            run = functools.partial(magnify_pair, onset, apex, method, ALPHA, weights=weights)
            run()
            times = []
            for _ in range(3):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            out[method] = float(np.median(times))
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for method in METHOD_NAMES:
        mine = [r for r in rows if r["method"] == method]
        per: dict[str, Any] = {}
        for noise_name in NOISE:
            for kind in KINDS:
                for d in MOTIONS:
                    cell = [r for r in mine
                            if r["noise"] == noise_name and r["kind"] == kind and r["d"] == d]
                    per.setdefault(noise_name, {}).setdefault(kind, {})[str(d)] = {
                        key: round(float(np.mean([r[key] for r in cell])), 4)
                        for key in ("ratio", "ssim", "psnr")}
        table[method] = {"mean": {key: round(float(np.mean([r[key] for r in mine])), 4)
                                  for key in ("ratio", "ssim", "psnr")}, **per}
    return table


def plot(table: dict[str, Any], path: Path) -> None:
    fig, axes = new_figure(1, 4, figsize=(16, 3.6), sharey=True)
    for ax, (noise_name, kind) in zip(axes, [(n, k) for n in NOISE for k in KINDS]):
        for method in METHOD_NAMES:
            ax.plot(MOTIONS, [table[method][noise_name][kind][str(d)]["ratio"] for d in MOTIONS], "o-",
                    label=method)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{kind} motion, {noise_name}")
        ax.set_xlabel("apex motion d (px)")
    axes[0].set_ylabel(f"achieved / target displacement (α = {ALPHA:g})")
    axes[0].legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def evaluate(flow_params: dict[str, Any], workers: int, weights: Path | str) -> dict[str, Any]:
    learned_model(str(weights))  # fail fast (and load once, before the pool forks) if weights are missing
    scene_images = scenes()
    cases = [(n, k, d, z) for n in scene_images for k in KINDS for d in MOTIONS for z in NOISE]
    work = functools.partial(evaluate_case, scene_images=scene_images, flow_params=flow_params,
                             weights=str(weights))
    rows = [r for rs in parallel_map(work, cases, workers, desc="eval_magnification") for r in rs]
    identity = [r["ssim"] for r in rows if r["method"] == "learned@1"]
    rows = [r for r in rows if r["method"] != "learned@1"]
    return {"alpha": ALPHA, "size": SIZE, "scenes": list(scene_images), "noise_sigma_grey_levels": NOISE,
            "ratio_is": "achieved / target displacement, 1 = exact (TV-L1, onset -> output)",
            "learned_alpha1_ssim_vs_input": {"mean": round(float(np.mean(identity)), 4),
                                             "min": round(float(np.min(identity)), 4)},
            "seconds_per_224_pair": {k: round(v, 5) for k, v in seconds_per_pair(str(weights)).items()},
            "methods": summarise(rows)}
