"""Stage `eval_magnification` (dvc.yaml): every magnify method against known motion ->
metrics/magnification.json + plot.

The algorithm lives in mer/magnification_eval.py; this module reads params and paths, calls it, writes the
outputs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from mer.common import (
    atomic_path,
    load_params,
    run_main,
    stage_paths,
)
from mer.magnification_eval import evaluate, plot


def main(argv: Sequence[str] | None = None) -> None:
    paths = stage_paths("eval_magnification", ["weights", "out", "plot"], argv)
    params = load_params()
    start = time.perf_counter()
    result = evaluate(params["flow"], params["workers"], paths.weights)
    with atomic_path(paths.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    plot(result["methods"], paths.plot)
    means = ", ".join(f"{m} ratio {v['mean']['ratio']:.2f} ssim {v['mean']['ssim']:.3f}"
                      for m, v in result["methods"].items())
    identity = result["learned_alpha1_ssim_vs_input"]["mean"]
    print(f"eval_magnification: {means}; learned α=1 SSIM {identity:.3f} "
          f"({time.perf_counter() - start:.0f} s) -> {paths.out}")


if __name__ == "__main__":
    run_main(main)
