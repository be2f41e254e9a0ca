"""Stage `flow` (dvc.yaml): TV-L1 optical flow from the onset crop to the (magnified) apex crop.

The algorithm lives in mer/flow.py; this module reads params and paths, calls it, writes the outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

from mer.common import load_params, package_versions, read_h5, run_main, stage_paths, write_h5
from mer.flow import compute_flow


def main(argv: Sequence[str] | None = None) -> None:
    paths = stage_paths("flow", ["frames", "magnified", "out"], argv)
    params = load_params()
    frames, _ = read_h5(paths.frames, ["onset", "sample"])
    magnified, _ = read_h5(paths.magnified, ["apex_magnified"])
    flow = compute_flow(frames["onset"], magnified["apex_magnified"], params["flow"], params["workers"])
    write_h5(paths.out, {"flow": flow, "sample": frames["sample"]},
             {"params": {"flow": params["flow"]}, "versions": package_versions()})
    print(f"flow: {len(flow)} TV-L1 fields -> {paths.out}")


if __name__ == "__main__":
    run_main(main)
