"""Stage `synthesize` (dvc.yaml): the embedded synthetic dataset, in CASME II's on-disk format ->
data/raw/synthetic.

The algorithm lives in mer/synthetic.py; this module reads params and paths, calls it, writes the outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

from mer.common import load_params, run_main, stage_paths
from mer.synthetic import THREE_CLASS, synthesize


def main(argv: Sequence[str] | None = None) -> None:
    paths = stage_paths("synthesize", ["out"], argv)
    params = load_params()
    table = synthesize(paths.out, params["synthetic"], params["workers"])
    kept = table["Estimated Emotion"].map(THREE_CLASS).value_counts().to_dict()
    print(f"synthesize: {len(table)} samples, {table['Subject'].nunique()} subjects "
          f"(3-class: {kept}) -> {paths.out}")


if __name__ == "__main__":
    run_main(main)
