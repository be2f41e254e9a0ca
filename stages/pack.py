"""Stage `pack` (dvc.yaml): the intermediate files -> one processed HDF5 per dataset (docs/hdf5.md).

The algorithm lives in mer/processed.py; this module reads params and paths, calls it, writes the outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mer.common import load_params, run_main, stage_paths, write_h5
from mer.processed import pack


def main(argv: Sequence[str] | None = None) -> None:
    paths = stage_paths("pack", ["frames", "magnified", "flow", "landmarks", "out"], argv)
    params = load_params()
    arrays, attrs = pack(paths.frames, paths.magnified, paths.flow, paths.landmarks, params)
    write_h5(paths.out, arrays, attrs)
    counts = np.bincount(arrays["label"], minlength=len(attrs["classes"]))
    print(f"pack: {len(arrays['label'])} samples, {len(set(arrays['subject']))} subjects, "
          + ", ".join(f"{c} {n}" for c, n in zip(attrs["classes"], counts)) + f" -> {paths.out}")


if __name__ == "__main__":
    run_main(main)
