"""Stage `baselines` (dvc.yaml): linear probes on the model's own input, same LOSO folds as `train` ->
metrics/baselines.json.

The algorithm lives in mer/probes.py; this module reads params and paths, calls it, writes the outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

from mer.common import class_names, load_params, read_h5, run_main, stage_paths
from mer.metrics import write_json
from mer.probes import run_baselines


def main(argv: Sequence[str] | None = None) -> None:
    paths = stage_paths("baselines", ["processed", "out"], argv)
    params = load_params()
    arrays, attrs = read_h5(paths.processed, ["flow", "landmarks", "label", "subject"])
    scores = run_baselines(arrays, class_names(attrs), params["baselines"])
    write_json(paths.out, scores)
    summary = ", ".join(f"{name} UF1 {s['uf1']:.4f} UAR {s['uar']:.4f}" for name, s in scores.items())
    print(f"baselines (logistic regression, LOSO, pooled): {summary} -> {paths.out}")


if __name__ == "__main__":
    run_main(main)
