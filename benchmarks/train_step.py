"""Training cost per sample, frozen vs trainable stems, and the share of it spent in the stems.

    python -m benchmarks.train_step [--samples 8] [--batch 4] [--threads 1] [--real]

Random inputs of the processed-file shapes (or, with --real, the first samples of
data/processed/<data.dataset>.h5), the model of params.yaml, one thread by default (as one fold
worker of the `train` stage). Prints, per sample:
- trainable stems (the paper): one training step = stems + head forward/backward + Adam; the stems'
  share is (full step - head step on detached stem maps) / full step;
- frozen stems (the CPU default): stems forward once per sample (cached), then head steps only;
  the stems' share of a whole LOSO run = stems / (stems + epochs x (subjects - 1) x head step),
  with `train.epochs` and the dataset's subject count (12 if unknown).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from mer.common import class_names, load_params, read_h5
from model import MiHFTr, ModelConfig, build_loss, prepare_batch


def inputs(n: int, real: bool, params: dict) -> tuple[dict[str, np.ndarray], int, int]:
    """(arrays, num_classes, subjects) of n samples."""
    path = Path("data/processed") / f"{params['data']['dataset']}.h5"
    if real:
        arrays, attrs = read_h5(path, ["apex", "flow", "landmarks", "label", "subject"])
        classes = class_names(attrs)
        num_classes = len(classes)
        subjects = len(set(arrays["subject"]))
        return {k: v[:n] for k, v in arrays.items()}, num_classes, subjects
    rng = np.random.default_rng(0)
    arrays = {
        "apex": rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8),
        "flow": rng.normal(0, 1, (n, 224, 224, 2)).astype(np.float32),
        "landmarks": rng.uniform(30, 190, (n, 51, 4)).astype(np.float32),
        "label": rng.integers(0, 3, n),
    }
    return arrays, 3, 12


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--real", action="store_true", help="use the processed file instead of random inputs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    params = load_params()
    epochs = int((params.get("train") or {}).get("epochs", 100))
    arrays, num_classes, subjects = inputs(args.samples, args.real, params)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    b = args.batch
    apex, flow, lm = prepare_batch(arrays["apex"][:b], arrays["flow"][:b], arrays["landmarks"][:b], device)
    y = torch.from_numpy(arrays["label"][:b].astype(np.int64)).to(device)
    counts = np.bincount(arrays["label"], minlength=num_classes)
    print(f"{device}, {args.threads} thread(s), batch {b}, {'real' if args.real else 'random'} inputs")

    results = {}
    for frozen in (False, True):
        cfg = ModelConfig.from_params({**params["model"], "freeze_stems": frozen})
        net = MiHFTr(cfg, num_classes).to(device).train()
        loss_fn = build_loss(cfg.loss, cfg.gamma, counts).to(device)
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)

        def step(af, mf, full: bool, net=net, loss_fn=loss_fn, opt=opt) -> None:
            logits = net(apex, flow, lm) if full else net.head(af, mf, lm)
            loss = loss_fn(logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        with torch.no_grad():
            af, mf = net.stems(apex, flow)
            stems_fwd = timed(lambda net=net: net.stems(apex, flow), args.repeats) / b
        head = timed(lambda af=af, mf=mf, step=step: step(af, mf, False), args.repeats) / b
        if frozen:
            total_run = stems_fwd + epochs * (subjects - 1) * head
            results["frozen"] = (1 / head, stems_fwd / total_run)
            print(f"frozen stems:    stems forward (once per sample) {1e3 * stems_fwd:7.1f} ms, head step "
                  f"{1e3 * head:7.1f} ms -> {1 / head:6.1f} training samples/s; stems' share of a LOSO run "
                  f"({epochs} epochs x {subjects - 1} folds per sample) {100 * stems_fwd / total_run:5.1f}%")
        else:
            full = timed(lambda af=af, mf=mf, step=step: step(af, mf, True), args.repeats) / b
            results["trainable"] = (1 / full, (full - head) / full)
            print(f"trainable stems: full step {1e3 * full:7.1f} ms ({1 / full:6.1f} training samples/s), "
                  f"of which stems {1e3 * (full - head):7.1f} ms = {100 * (full - head) / full:5.1f}%, "
                  f"head {1e3 * head:7.1f} ms")
    speedup = results["frozen"][0] / results["trainable"][0]
    print(f"frozen / trainable training throughput: {speedup:.1f}x")


if __name__ == "__main__":
    main()
