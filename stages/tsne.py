"""Stage `tsne` (dvc.yaml): t-SNE of the fused features F_ME with ARa / AEr (paper §4.3): the out-of-fold
view (one model per fold) and, with `--one-model`, the final model's view (one feature space).

The algorithm lives in mer/reports.py (`tsne_report`, which writes `--out`, a png, and the same path
with `.json`); this module reads the paths and calls it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from mer.common import PipelineError, run_main
from mer.reports import tsne_report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.tsne", description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=Path, required=True, help="out-of-fold features (train's output)")
    parser.add_argument("--one-model", type=Path, help="the final model's in-sample features (fit's output)")
    parser.add_argument("--out", type=Path, required=True,
                        help="png to write, the numbers go beside it as .json (dvc.yaml: metrics/tsne.png)")
    args = parser.parse_args(argv)
    if args.out.suffix != ".png":
        raise PipelineError(f"--out must be a .png path, got {args.out}")
    report = tsne_report(args.features, args.out, args.one_model)
    print(f"tsne: {report['n_samples']} samples, t-SNE ARa {report['ara']:.4f}, AEr {report['aer']:.4f}; "
          f"L2-normalised F_ME ARa {report['feature_ara']:.4f}, AEr {report['feature_aer']:.4f} "
          f"-> {args.out}, {args.out.with_suffix('.json')}")
    if "one_model" in report:
        one = report["one_model"]
        print(f"tsne: one model (in-sample) ARa {one['ara']:.4f}, AEr {one['aer']:.4f}, by subject ARa "
              f"{one['subject_ara']:.4f} (out-of-fold: {report['subject_ara']:.4f})")


if __name__ == "__main__":
    run_main(main)
