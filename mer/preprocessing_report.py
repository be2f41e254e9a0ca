"""The preprocessing report: which preprocessing keeps the most of this dataset's signal, before
any training.

For every variant of `preprocessing_report.variants` (overrides of the `frames`, `magnify` and `flow`
params sections; what a variant leaves out is params.yaml's), the aligned onset / apex crops of
`frames` are magnified and turned into TV-L1 flow as the `magnify` and `flow` stages would, and the
two linear probes of `baselines` (`flow_cells`, `flow_landmarks`) are scored on that flow over the
same LOSO folds. A variant with `frames` keys of its own (e.g. the crop's margin) first re-crops the
raw frames and re-fits the landmarks as the `frames` and `landmarks` stages would. One JSON table
(`metrics/preprocessing.json`: variant -> probe -> uf1 / uar, and the variant's overrides) and one
bar chart. Variants that come to the same params are computed once. Cost: one TV-L1 pass per sample
and distinct variant, and a face alignment and landmark fit per sample and distinct crop
(docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mer import face
from mer.common import (
    PipelineError,
    new_figure,
)
from mer.datasets import dataset_from_params
from mer.flow import compute_flow
from mer.frames import FrameJob, crop_jobs, frame_jobs, warn_past_edge
from mer.landmarks import detect_landmarks
from mer.magnify import magnify_all
from mer.probes import run_baselines

SECTIONS = ("frames", "magnify", "flow")  # what a variant may override


@dataclass(frozen=True)
class RawFrames:
    """What a variant with `frames` keys re-crops: the raw onset / apex frames of the report's
    samples, in its arrays' order, and the dlib files of the `frames` and `landmarks` stages."""
    jobs: list[FrameJob]
    predictor_file: Path
    cnn_file: Path


def raw_frames(params: dict[str, Any], subjects: np.ndarray, samples: np.ndarray) -> RawFrames:
    """The raw frames of the samples the `frames` file holds (`subjects`, `samples`, its order), of
    params.yaml's `data`, with the dlib files of its `landmarks` section."""
    dataset = dataset_from_params(params["data"])
    wanted = set(zip(subjects, samples))
    kept = [s for s in dataset.samples() if (s.subject, s.sample) in wanted]
    if [(s.subject, s.sample) for s in kept] != list(zip(subjects, samples)):
        raise PipelineError(f"{dataset.name}: the label spreadsheet gives other samples than the frames file "
                            "holds: rerun `dvc repro`")
    return RawFrames(frame_jobs(dataset, kept), face.predictor_path(params["landmarks"]["predictor"]),
                     face.cnn_detector_path(params["landmarks"]["cnn_detector"]))


def recrop(raw: RawFrames, frames_params: dict[str, Any], name: str, workers: int) -> dict[str, np.ndarray]:
    """`onset`, `apex` and `landmarks` of every sample with variant `name`'s `frames` params, as the
    `frames` and `landmarks` stages would make them."""
    face.check_detectors(frames_params["detectors"], f"preprocessing_report.variants.{name}.frames.detectors")
    crops = crop_jobs(raw.jobs, frames_params, raw.predictor_file, workers, raw.cnn_file, f"{name}: frames")
    lost = [job.name for job, crop in zip(raw.jobs, crops) if crop is None]
    if lost:
        raise PipelineError(f"preprocessing_report.variants.{name}: no face found in {len(lost)} sample(s) "
                            f"the pipeline's crops have ({', '.join(lost[:5])}): drop its face-finding keys")
    warn_past_edge([job.name for job in raw.jobs], [crop["outside"] for crop in crops], f"{name}: ")
    arrays = {key: np.stack([crop[key] for crop in crops]) for key in ("onset", "apex", "face_box")}
    arrays["landmarks"], _ = detect_landmarks(arrays["onset"], arrays["apex"], arrays.pop("face_box"),
                                              raw.predictor_file, workers, raw.cnn_file)
    return arrays


def variant_params(params: dict[str, Any], overrides: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """The `frames`, `magnify` and `flow` sections of one variant: params.yaml's, the variant's keys set."""
    unknown = sorted(set(overrides or {}) - set(SECTIONS))
    bad_keys = [f"{s}.{k}" for s in SECTIONS for k in (overrides or {}).get(s, {}) if k not in params[s]]
    if unknown or bad_keys:
        raise PipelineError(f"preprocessing_report.variants.{name}: unknown {unknown + bad_keys}; a variant "
                            f"sets keys of {list(SECTIONS)} that params.yaml has")
    return {s: {**params[s], **(overrides or {}).get(s, {})} for s in SECTIONS}


def preprocessing_report(arrays: dict[str, np.ndarray], classes: list[str], params: dict[str, Any],
                         workers: int, raw: Callable[[], RawFrames] | None = None
                         ) -> dict[str, dict[str, Any]]:
    """{variant: {probe: {uf1, uar}, "params": its overrides}} for the frames arrays (`onset`, `apex`,
    `label`, `subject`) and `landmarks` (N x 51 x 4) made with params.yaml's `frames`. `raw` gives the
    raw frames: called once, and only if a variant sets `frames` keys of its own."""
    variants = params["preprocessing_report"]["variants"]
    if not variants:
        raise PipelineError("preprocessing_report.variants is empty: name at least one ({} = the defaults)")
    # Each step computed once per distinct params (e.g. a variant restating a default is not recomputed),
    # keyed by the params sections it depends on.
    crops = {json.dumps({"frames": params["frames"]}, sort_keys=True): arrays}
    magnified: dict[str, np.ndarray] = {}
    scored: dict[str, dict[str, Any]] = {}
    report: dict[str, dict[str, Any]] = {}
    raw_once = functools.cache(raw) if raw is not None else None
    for name, overrides in variants.items():
        sections = variant_params(params, overrides, name)
        start = time.perf_counter()  # printed, not written: the JSON stays the same bytes run to run
        crop_key, magnify_key, score_key = (json.dumps({s: sections[s] for s in SECTIONS[:n]}, sort_keys=True)
                                            for n in (1, 2, 3))
        if score_key not in scored:
            if crop_key not in crops:
                if raw_once is None:
                    raise PipelineError(f"preprocessing_report.variants.{name} sets `frames` keys: it "
                                        "re-crops the raw frames, which this run was not given")
                crops[crop_key] = {**arrays, **recrop(raw_once(), sections["frames"], name, workers)}
            crop = crops[crop_key]
            if magnify_key not in magnified:
                magnified[magnify_key] = magnify_all(crop["onset"], crop["apex"], sections["magnify"],
                                                     workers)
            flow = compute_flow(crop["onset"], magnified[magnify_key], sections["flow"], workers)
            scored[score_key] = run_baselines({**crop, "flow": flow}, classes, params["baselines"])
        scores = scored[score_key]
        report[name] = {**{probe: {k: s[k] for k in ("uf1", "uar")} for probe, s in scores.items()},
                        "params": overrides or {}}
        summary = ", ".join(f"{probe} UF1 {s['uf1']:.3f}" for probe, s in scores.items())
        print(f"preprocessing_report: {name}: {summary} ({time.perf_counter() - start:.0f} s)")
    return report


def plot_report(report: dict[str, dict[str, Any]], dataset: str) -> Any:
    """Grouped horizontal bars: UF1 of each probe for each variant."""
    names = list(report)
    probes = [k for k in report[names[0]] if k != "params"]
    fig, ax = new_figure(figsize=(7, 1.5 + 0.5 * len(names)))
    height = 0.8 / len(probes)
    for i, probe in enumerate(probes):
        values = [report[n][probe]["uf1"] for n in names]
        bars = ax.barh(np.arange(len(names)) + i * height, values, height, label=probe)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_yticks(np.arange(len(names)) + height * (len(probes) - 1) / 2, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("LOSO pooled UF1 of the linear probe")
    ax.set_title(f"{dataset}: signal kept by each preprocessing variant")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(probes), fontsize=8,
              frameon=False)  # below the axes: inside, it would cover the last variant's bars
    fig.tight_layout()
    return fig
