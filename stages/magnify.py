"""Stage `magnify` (dvc.yaml): magnify the onset → apex motion of every crop pair (`magnify` params).

The algorithm lives in mer/magnify.py (`magnify_file`, which writes `--out`); this module reads params and
paths and calls it.
"""

from __future__ import annotations

from collections.abc import Sequence

from mer.common import (
    load_params,
    run_main,
    stage_paths,
)
from mer.magnify import magnify_file


def main(argv: Sequence[str] | None = None) -> None:
    paths = stage_paths("magnify", ["frames", "out"], argv)
    params = load_params()
    n = magnify_file(paths.frames, paths.out, params["magnify"], params["workers"])
    m = params["magnify"]
    print(f"magnify: {n} apex crops, {m['method']} x{m['alpha']} -> {paths.out}")


if __name__ == "__main__":
    run_main(main)
