"""Preprocessing cost per sample, step by step, and how close the parallel pipeline gets to it.

    python -m benchmarks.preprocess

Needs the dataset of params.yaml on disk (`dvc repro synthesize` for the default). Prints each
step's single-thread seconds per sample, then runs the five preprocessing stages as `dvc repro`
would (one process per stage, `workers` = all cores) in a scratch directory and prints the
end-to-end samples/s and the efficiency = (sum of single-thread step times / cores) ÷ (measured
seconds per sample): 1.0 means the pool loses nothing to start-up, I/O or idle workers.
Last, the cost of the face-finding fallback chain where HOG succeeds: the `frames` per-sample
work with `frames.detectors` as configured against HOG alone, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

from mer import face, frames
from mer.common import load_params, stage_command, write_h5
from mer.datasets import dataset_from_params
from mer.flow import flow_pair
from mer.landmarks import landmarks_pair
from mer.magnify import magnify_pair

REPO = Path(__file__).resolve().parents[1]
STAGES = ("frames", "magnify", "flow", "landmarks", "pack")


def single_thread_steps(jobs: list[frames.FrameJob], params: dict) -> dict[str, float]:
    """Seconds per sample of each step, one thread, in this process."""
    cv2.setNumThreads(1)
    fp, mp = params["frames"], params["magnify"]
    predictor_file = face.predictor_path(params["landmarks"]["predictor"])
    face.predictor(predictor_file)
    totals = dict.fromkeys(("decode", "face detection + alignment", "magnification", "TV-L1",
                            "landmarks", "HDF5 write"), 0.0)
    crops = []
    for job in jobs:
        t0 = time.perf_counter()
        for path in (job.onset_path, job.apex_path):
            frames.read_rgb(path, job.name)
        t1 = time.perf_counter()
        crop = frames.crop_sample(job, fp["size"], fp["margin"], fp["detect_width"], fp["upsample"],
                                  predictor_file)
        t2 = time.perf_counter()
        magnified = magnify_pair(crop["onset"], crop["apex"], mp["method"], mp["alpha"], mp["levels"],
                                 mp["orientations"], mp["sigma"])
        t3 = time.perf_counter()
        flow_pair((crop["onset"], magnified), params["flow"])
        t4 = time.perf_counter()
        landmarks_pair((crop["onset"], crop["apex"], crop["face_box"]), predictor_file)
        t5 = time.perf_counter()
        totals["decode"] += t1 - t0
        totals["face detection + alignment"] += (t2 - t1) - (t1 - t0)  # crop_sample decodes again
        totals["magnification"] += t3 - t2
        totals["TV-L1"] += t4 - t3
        totals["landmarks"] += t5 - t4
        crops.append((crop, magnified))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_h5(Path(tmp) / "bench.h5", {
            "onset": np.stack([c["onset"] for c, _ in crops]),
            "apex": np.stack([m for _, m in crops]),
            "flow": np.zeros((len(crops), fp["size"], fp["size"], 2), np.float32),
        }, {})
        totals["HDF5 write"] = time.perf_counter() - t0
    return {step: seconds / len(jobs) for step, seconds in totals.items()}


def fallback_cost(jobs: list[frames.FrameJob], params: dict) -> tuple[float, float, str]:
    """Single-thread samples/s of `frames`' per-sample work with HOG alone and with the configured
    chain, and which step found each face. Alternating per sample, so load drift hits both alike."""
    cv2.setNumThreads(1)
    fp = params["frames"]
    predictor_file = face.predictor_path(params["landmarks"]["predictor"])
    cnn_file = face.cnn_detector_path(params["landmarks"]["cnn_detector"])
    seconds = {"hog": 0.0, "chain": 0.0}
    found = []
    for job in jobs:
        for variant, detectors in (("hog", ["hog"]), ("chain", fp["detectors"])):
            start = time.perf_counter()
            crop = frames.crop_sample(job, fp["size"], fp["margin"], fp["detect_width"], fp["upsample"],
                                      predictor_file, detectors, cnn_file)
            seconds[variant] += time.perf_counter() - start
        found.append(crop["detector"] if crop else "none")
    return len(jobs) / seconds["hog"], len(jobs) / seconds["chain"], face.detector_counts(found)


def pipeline_seconds(params: dict) -> float:
    """Wall time of the preprocessing stages as separate processes, in a scratch project."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for package in ("stages", "mer", "model"):
            shutil.copytree(REPO / package, work / package, ignore=shutil.ignore_patterns("__pycache__"))
        run_params = dict(params, workers=0)
        run_params["data"] = dict(params["data"], root=str((REPO / params["data"]["root"]).resolve()))
        (work / "params.yaml").write_text(yaml.safe_dump(run_params))
        start = time.perf_counter()
        commands = [shlex.split(stage_command(REPO, stage)) for stage in STAGES]  # as dvc.yaml runs them
        for command in commands:
            subprocess.run([sys.executable, *command[1:]], cwd=work, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start


def main() -> None:
    argparse.ArgumentParser(description=__doc__,  # no options: --help only
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    params = load_params(REPO / "params.yaml")
    data = params["data"]
    dataset = dataset_from_params(dict(data, root=REPO / data["root"]))
    jobs = frames.frame_jobs(dataset, dataset.samples())
    cores = os.cpu_count() or 1

    steps = single_thread_steps(jobs, params)
    print(f"single-thread seconds per sample ({len(jobs)} samples of {dataset.name}):")
    for step, seconds in steps.items():
        print(f"  {step:<28} {seconds:8.4f}")
    step_sum = sum(steps.values())
    print(f"  {'sum':<28} {step_sum:8.4f}")

    wall = pipeline_seconds(params)
    per_sample = wall / len(jobs)
    print(f"pipeline ({' -> '.join(STAGES)}, {cores} cores): {wall:.1f} s, "
          f"{len(jobs) / wall:.2f} samples/s, {per_sample:.4f} s per sample")
    print(f"limit set by per-sample compute: {step_sum / cores:.4f} s per sample")
    print(f"efficiency = (sum / cores) / measured = {step_sum / cores / per_sample:.2f}")

    hog, chain, found = fallback_cost(jobs, params)
    print(f"frames per-sample work, one thread: HOG only {hog:.2f} samples/s, chain "
          f"{'/'.join(params['frames']['detectors'])} {chain:.2f} samples/s, ratio chain/HOG "
          f"{chain / hog:.3f} (faces found by {found})")


if __name__ == "__main__":
    main()
