"""What the preprocessing report (stage `preprocessing_report`) costs at CASME II size.

    python -m benchmarks.preprocessing_report [--samples 143]

Needs `data/interim/frames.h5` and `landmarks.h5` (`dvc repro landmarks`) and the raw frames of
params.yaml's dataset (640 x 480 for the embedded one, as CASME II's). Their crops, and the raw frames
a variant with `frames` keys re-crops, are repeated up to `--samples` clips (CASME II's 3-class
protocol: 143 clips, 24 subjects; subjects renamed per copy so that LOSO has as many folds), then
the report runs with params.yaml's variants and `workers` as `dvc repro` would. Prints the wall time
of the whole report and of each variant, and, measured in the same run, one TV-L1 pair: the ratio
says what a variant costs in pair-times per clip.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from mer.common import class_names, load_params, read_h5, worker_count
from mer.flow import flow_pair
from mer.preprocessing_report import preprocessing_report, raw_frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=143)
    parser.add_argument("--frames", default="data/interim/frames.h5")
    parser.add_argument("--landmarks", default="data/interim/landmarks.h5")
    args = parser.parse_args()
    params = load_params()
    frames, attrs = read_h5(args.frames, ["onset", "apex", "label", "subject", "sample"])
    landmarks, _ = read_h5(args.landmarks, ["landmarks"])
    n = len(frames["label"])
    index = np.arange(args.samples) % n
    copy = np.arange(args.samples) // n
    arrays = {key: frames[key][index] for key in ("onset", "apex", "label")}
    arrays["subject"] = np.array([f"{s}_{c}" for s, c in zip(frames["subject"][index], copy)])
    arrays["landmarks"] = landmarks["landmarks"][index]
    raw = raw_frames(params, frames["subject"], frames["sample"])
    raw = dataclasses.replace(raw, jobs=[raw.jobs[i] for i in index])

    start = time.perf_counter()
    flow_pair((arrays["onset"][0], arrays["apex"][0]), params["flow"])
    one_pair = time.perf_counter() - start

    start = time.perf_counter()
    report = preprocessing_report(arrays, class_names(attrs), params, params["workers"], lambda: raw)
    total = time.perf_counter() - start
    workers = worker_count(params["workers"])
    passes = total * workers / (one_pair * args.samples * len(report))
    print(f"{args.samples} clips, {len(set(arrays['subject']))} subjects, {len(report)} variants, "
          f"{workers} workers: {total:.0f} s ({total / 60:.1f} min)")
    print(f"one TV-L1 pair in this process (OpenCV's own threads): {one_pair:.2f} s; the report costs "
          f"{passes:.2f} such pair-times per clip, variant and worker (magnification, re-crops, probes, pool "
          "included; each variant's own time is printed above)")


if __name__ == "__main__":
    main()
