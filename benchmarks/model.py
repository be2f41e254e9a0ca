"""Forward + backward seconds per sample of MiHF-Tr on CPU, paper settings, 224x224 inputs.

    python benchmarks/model.py [--batch 8] [--repeats 2]

Three costs: frozen stems (stems forward only, head forward + backward), trainable stems (everything
forward + backward, the paper's end-to-end training) and head only (AF/MF cached, the CPU default).
Times depend on what else the machine runs; the median of `repeats` timed steps after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import MiHFTr, ModelConfig, build_loss  # noqa: E402


def _step_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    n = args.batch
    apex, flow = torch.rand(n, 3, 224, 224), 2 * torch.randn(n, 2, 224, 224)
    landmarks = torch.cat([40 + 144 * torch.rand(n, 51, 2)] * 2, dim=-1)
    labels = torch.arange(n) % 3
    loss_fn = build_loss("cw-focal", 2.0, [32, 90, 28])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {n}, 224x224, paper settings")

    for name, frozen in (("frozen stems", True), ("trainable stems", False)):
        model = MiHFTr(ModelConfig(freeze_stems=frozen), num_classes=3).train()

        def step(model=model) -> None:
            model.zero_grad(set_to_none=True)
            loss_fn(model(apex, flow, landmarks), labels).backward()

        s = _step_seconds(step, args.repeats)
        print(f"{name:<18} forward+backward {s / n:.4f} s/sample ({s:.3f} s/batch)")
        if frozen:
            with torch.no_grad():
                af, mf = model.stems(apex, flow)

            def head_step(model=model, af=af, mf=mf) -> None:
                model.zero_grad(set_to_none=True)
                loss_fn(model.head(af, mf, landmarks), labels).backward()

            s = _step_seconds(head_step, max(args.repeats, 5))
            print(f"{'head only (cached)':<18} forward+backward {s / n:.4f} s/sample ({s:.3f} s/batch)")
            with torch.no_grad():
                s = _step_seconds(lambda model=model: model.stems(apex, flow), args.repeats)
            print(f"{'stems (cache once)':<18} forward          {s / n:.4f} s/sample ({s:.3f} s/batch)")


if __name__ == "__main__":
    main()
