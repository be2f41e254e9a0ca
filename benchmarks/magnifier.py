"""The learned magnifier's training speed: data generation (examples/s) and training (steps/s).

    python benchmarks/magnifier.py [--device auto] [--baseline 1c7222b] [--batches 5] [--steps 2]

Two schedules, the `magnifier` params otherwise: `cpu` (params.yaml: 64² patches, batch 4) and
`gpu` (the paper's 384² patches, batch --gpu-batch). Data: `make_batch` timed over --batches
batches after one warm-up. Training: `train_magnifier` (data included, one torch thread as the
stage runs it) timed at --steps and 2 × --steps steps; the difference is the steady per-step cost.
--baseline REV also times the magnifier as of git revision REV (mer/magnifier.py, or model/magnifier.py
where it lived before; e.g. 1c7222b, the last per-patch numpy generator) the same way, on the same device.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mer import magnifier  # noqa: E402


def load_revision(rev: str) -> ModuleType:
    """The magnifier as of git revision `rev` (mer/magnifier.py, or model/magnifier.py where it lived
    before), imported as a module of its own."""
    shown = [subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)
             for path in ("mer/magnifier.py", "model/magnifier.py")]
    source = next((s.stdout for s in shown if s.returncode == 0), None)
    if source is None:
        raise SystemExit(f"revision {rev} has neither mer/magnifier.py nor model/magnifier.py")
    with tempfile.TemporaryDirectory() as folder:  # the module's code is read at import: nothing left behind
        path = Path(folder) / f"magnifier_{rev}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def batch_maker(module: ModuleType, p: dict[str, Any]) -> Callable[[], Any]:
    """One batch of training data per call, as `module`'s train_magnifier makes it."""
    if hasattr(module, "make_example"):  # the per-patch numpy generator (before batching)
        rng, photos = np.random.default_rng(p["seed"]), module.training_photos()
        return lambda: [x.to(p["device"]) for x in module.make_batch(rng, p, photos)]
    rng, gen = np.random.default_rng(p["seed"]), torch.Generator(p["device"]).manual_seed(p["seed"])
    photos = module.training_photos(p["device"])
    return lambda: module.make_batch(rng, gen, p, photos)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def examples_per_second(module: ModuleType, p: dict[str, Any], batches: int) -> float:
    make = batch_maker(module, p)
    make()  # warm-up (photos, kernels)
    sync(p["device"])
    start = time.perf_counter()
    for _ in range(batches):
        make()
    sync(p["device"])
    return batches * p["batch"] / (time.perf_counter() - start)


def steps_per_second(module: ModuleType, p: dict[str, Any], steps: int) -> float:
    def run(n: int) -> float:
        start = time.perf_counter()
        module.train_magnifier({**p, "steps": n}, log=False)  # returns CPU tensors: synchronised
        return time.perf_counter() - start

    run(1)  # warm-up
    return steps / (run(2 * steps) - run(steps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when present)")
    ap.add_argument("--baseline", help="git revision whose magnifier to time as well")
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--gpu-batch", type=int, default=4)
    ap.add_argument("--schedules", nargs="+", default=["cpu", "gpu"], choices=["cpu", "gpu"])
    args = ap.parse_args()
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(1)  # as train_magnifier runs
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["magnifier"]
    versions = {"batched": magnifier}
    if args.baseline:
        versions[f"{args.baseline} (per patch)"] = load_revision(args.baseline)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU, 1 torch thread"
    print(f"torch {torch.__version__}, device {device} ({name})")
    for schedule in args.schedules:
        shape = {"cpu": {}, "gpu": {"patch": 384, "batch": args.gpu_batch}}[schedule]
        p = {**params, **shape, "device": device}
        print(f"{schedule} schedule: {p['patch']}² patches, batch {p['batch']}")
        speeds = {}
        for label, module in versions.items():
            data = examples_per_second(module, p, args.batches)
            train = steps_per_second(module, p, args.steps)
            speeds[label] = data, train
            print(f"  {label:<24} data {data:8.1f} examples/s   training {train:7.3f} steps/s "
                  f"({train * p['batch']:.1f} examples/s)", flush=True)
        if args.baseline:  # measured in this run, side by side
            (data, train), (base_data, base_train) = speeds.values()
            print(f"  batched / {args.baseline}: data {data / base_data:.2f}x, "
                  f"training {train / base_train:.2f}x")


if __name__ == "__main__":
    main()
