"""LOSO training throughput: each fold alone (`train.fold_batch: 1`) vs folds trained together.

    python -m benchmarks.train [--samples 16] [--subjects 4] [--epochs 2] [--batch 4] [--stems both]
    python -m benchmarks.train --paper    # CASME II-sized, trainable stems, 100 epochs, batch 64, GPU

Random arrays shaped like the processed HDF5 (N x 224 x 224 x 3 uint8 apex, N x 224 x 224 x 2
float32 flow, N x 51 x 4 landmarks inside the crop, 3 classes, subjects in turn), the `model` and
`train` sections of params.yaml with these sizes, on CUDA when present, else the CPU. For frozen
stems (cached AF / MF, the CPU default) and / or trainable stems (the paper), it runs the `train`
stage's `run_folds` twice in this one process, sequential (`fold_batch: 1`: a pool of `workers`
single-thread processes on CPU, one fold after the other on CUDA) then fold-batched (`--fold-batch`
folds at a time, 0 = all; on CPU one group per pool process, or a lone group on `workers` threads),
and prints training samples/s (training samples x epochs / seconds of `run_folds`, the predictions
of the held-out subjects included) of each, their ratio, and the wall time of the whole schedule.
`--toggle amp` (or `channels_last`) also times the fold-batched path with that option flipped.
`--sequential-epochs` times the sequential path on fewer epochs (samples/s per epoch does not
depend on their number) where all of them would take too long; explicit options override `--paper`.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from mer.common import load_params, worker_count
from model.loso import run_folds
from model.training import FoldData, configure, loso_splits, resolve_device

# CASME II-sized (3 classes: ~145 samples, 24 subjects), the paper's schedule. 8 folds at a time:
# the trainable stems keep ~90 MB of activations per image for the backward (float32, measured on
# CPU), ~35 GB for 8 folds' batches of ~46. Each fold alone is timed on 5 epochs only (a device
# command may run 10 min).
PAPER = {"samples": 145, "subjects": 24, "epochs": 100, "batch": 64, "stems": "trainable", "fold_batch": 8,
         "sequential_epochs": 5}


def synthetic(samples: int, subjects: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random processed-HDF5 arrays: every subject and class present, landmarks inside the crop."""
    rng = np.random.default_rng(seed)
    onset = rng.uniform(30, 190, (samples, 51, 2))
    return {
        "apex": rng.integers(0, 256, (samples, 224, 224, 3), dtype=np.uint8),
        "flow": rng.normal(0, 1, (samples, 224, 224, 2)).astype(np.float32),
        "landmarks": np.concatenate([onset, onset + rng.normal(0, 1, onset.shape)], -1).astype(np.float32),
        "label": np.arange(samples) % 3,
        "subject": np.array([f"s{i % subjects:02d}" for i in range(samples)]),
    }


def timed_run(params: dict, arrays: dict[str, np.ndarray], fold_batch: int,
              epochs: int) -> tuple[float, float]:
    """(training samples / s, seconds) of run_folds with this fold_batch and epoch count."""
    params = {**params, "train": {**params["train"], "fold_batch": fold_batch, "epochs": epochs}}
    cfg, model_cfg, device = configure(params)
    folds = loso_splits(arrays["subject"], cfg.seed)
    data = FoldData.build(cfg, model_cfg, device, arrays, 3)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run_folds(data, folds, params["workers"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return sum(len(f.train) for f in folds) * epochs / seconds, seconds


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--subjects", type=int, default=4, help="= folds")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--sequential-epochs", type=int, default=0,
                    help="epochs timed with each fold alone (0: --epochs)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--stems", choices=["frozen", "trainable", "both"], default="both")
    ap.add_argument("--fold-batch", type=int, default=0, help="folds trained together (0: all)")
    ap.add_argument("--workers", type=int, default=0, help="CPU processes / threads (0: every core)")
    ap.add_argument("--amp", choices=["none", "bf16"], default="none")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--toggle", choices=["amp", "channels_last"],
                    help="also time fold-batched with this flipped (amp: none <-> bf16), same run")
    ap.add_argument("--paper", action="store_true", help="CASME II-sized: " + ", ".join(
        f"{k.replace('_', '-')} {v}" for k, v in PAPER.items()))
    if ap.parse_known_args()[0].paper:
        ap.set_defaults(**PAPER)
    args = ap.parse_args()
    params = load_params()
    params["workers"] = args.workers
    params["train"] = {**params["train"], "batch_size": args.batch, "amp": args.amp,
                       "channels_last": args.channels_last, "device": "auto"}
    arrays = synthetic(args.samples, args.subjects)
    device = resolve_device("auto")
    workers = min(worker_count(args.workers), args.subjects)
    print(f"{device} ({os.cpu_count()} CPU cores, {workers} workers), {args.samples} samples, "
          f"{args.subjects} subjects, {args.epochs} epochs, batch {args.batch}, "
          f"fold_batch {args.fold_batch}, amp {args.amp}, channels_last {args.channels_last}")
    for frozen in {"frozen": [True], "trainable": [False], "both": [True, False]}[args.stems]:
        params["model"] = {**params["model"], "freeze_stems": frozen}
        seq_epochs = args.sequential_epochs or args.epochs
        seq, seq_s = timed_run(params, arrays, 1, seq_epochs)
        bat, bat_s = timed_run(params, arrays, args.fold_batch, args.epochs)
        name = "frozen stems   " if frozen else "trainable stems"
        print(f"{name}: sequential {seq:8.1f} samples/s ({seq_s:7.1f} s for {seq_epochs} epochs, "
              f"{seq_s * args.epochs / seq_epochs:7.1f} s for {args.epochs}), fold-batched {bat:8.1f} "
              f"samples/s ({bat_s:7.1f} s for {args.epochs} epochs): fold-batched / sequential "
              f"{bat / seq:5.2f}x")
        if args.toggle:
            flipped = {"amp": "none" if args.amp == "bf16" else "bf16",
                       "channels_last": not args.channels_last}
            other = {**params, "train": {**params["train"], args.toggle: flipped[args.toggle]}}
            rate, seconds = timed_run(other, arrays, args.fold_batch, args.epochs)
            print(f"  fold-batched with {args.toggle} {flipped[args.toggle]}: {rate:8.1f} samples/s "
                  f"({seconds:7.1f} s): {rate / bat:5.2f}x the rate without")
        if device.type == "cuda":
            print(f"  peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
            torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
