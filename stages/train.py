"""Stage `train` (dvc.yaml): Leave-One-Subject-Out training and evaluation of MiHF-Tr.

Reads the processed HDF5 (docs/hdf5.md); every path comes from dvc.yaml's command line. The LOSO
engine lives in model/loso.py (the run, its outputs), model/training.py (one fold) and
model/fold_batch.py (folds trained together); this module reads params and paths, calls it, and
prints the pooled scores.
"""

from __future__ import annotations

from collections.abc import Sequence

from mer.common import load_params, run_main, stage_paths
from model.loso import OUTPUTS, evaluate


def main(argv: Sequence[str] | None = None) -> None:
    out = stage_paths("train", ["processed", *OUTPUTS], argv)
    metrics = evaluate(load_params(), out)
    print(f"train: LOSO over {metrics['n_folds']} subjects, {metrics['n_samples']} samples: pooled UF1 "
          f"{metrics['uf1']:.4f}, UAR {metrics['uar']:.4f}, accuracy {metrics['accuracy']:.4f} "
          f"(per-fold mean, not comparable: UF1 {metrics['per_fold_mean']['uf1']:.4f}, "
          f"UAR {metrics['per_fold_mean']['uar']:.4f}) -> {out.loso}")
    for member, score in metrics.get("per_dataset", {}).items():
        print(f"  {member}: {score['n']} samples, UF1 {score['uf1']:.4f}, UAR {score['uar']:.4f}")


if __name__ == "__main__":
    run_main(main)
