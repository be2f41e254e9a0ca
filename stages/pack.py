"""Stage `pack`: the intermediate files → one HDF5 per dataset, `data/processed/<dataset>.h5`.

Array names, shapes and meanings: docs/hdf5.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mer.common import PipelineError, load_params, package_versions, read_h5, run_main, stage_paths, write_h5

PREPROCESSING_SECTIONS = ("data", "frames", "magnify", "flow", "landmarks")


def pack(frames_h5: Path, magnified_h5: Path, flow_h5: Path, landmarks_h5: Path,
         params: dict) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays and attributes of the processed file, from the four intermediate files."""
    frames, frame_attrs = read_h5(frames_h5)
    magnified, _ = read_h5(magnified_h5, ["apex_magnified", "sample"])
    flow, _ = read_h5(flow_h5, ["flow", "sample"])
    landmarks, _ = read_h5(landmarks_h5, ["landmarks", "sample"])
    for path, part in ((magnified_h5, magnified), (flow_h5, flow), (landmarks_h5, landmarks)):
        if not np.array_equal(part["sample"], frames["sample"]):
            raise PipelineError(f"{path} holds other samples than {frames_h5}: "
                                "it is stale, rerun `dvc repro`")
    magnify = params["magnify"]
    arrays = {
        "onset": frames["onset"],
        "apex": magnified["apex_magnified"],
        "flow": flow["flow"],
        "landmarks": landmarks["landmarks"],
        "label": frames["label"],
        "subject": frames["subject"],
        "sample": frames["sample"],
        "emotion": frames["emotion"],
        "detector": frames["detector"],  # the face-finding step of `frames` (docs/hdf5.md)
    }
    attrs = {
        "dataset": frame_attrs["dataset"],
        "classes": json.loads(frame_attrs["classes"]),
        "label_fixes": json.loads(frame_attrs["label_fixes"]),
        "apex_frame": f"magnified apex: method={magnify['method']}, alpha={magnify['alpha']}; onset as is",
        "params": {section: params[section] for section in PREPROCESSING_SECTIONS},
        "versions": package_versions(),
    }
    return arrays, attrs


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
