"""Stage `train_magnifier` (pipeline magnification/dvc.yaml): the learned magnifier's weights.

Trains mer/magnifier.py's network with the `magnifier` params and writes the weights to `--out`
(`magnify.weights`, what `magnify.method: learned` loads): same params, same bytes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from mer.common import load_params, run_main, stage_paths
from mer.magnifier import save_weights, train_magnifier


def main(argv: Sequence[str] | None = None) -> None:
    paths = stage_paths("train_magnifier", ["out"], argv)
    p = load_params()["magnifier"]
    start = time.perf_counter()
    state = train_magnifier(p)
    save_weights(state, paths.out)
    n = sum(v.numel() for v in state.values())
    print(f"train_magnifier: {n} parameters, {p['steps']} steps x {p['batch']} patches of {p['patch']}² "
          f"in {time.perf_counter() - start:.0f} s -> {paths.out}")


if __name__ == "__main__":
    run_main(main)
