"""Stage `pack`: the intermediate files → one HDF5 per dataset, `data/processed/<dataset>.h5`.

Array names, shapes and meanings are those of `contracts.md` (README, "The processed HDF5").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stages.common import PipelineError, load_params, package_versions, read_h5, run_main, write_h5

INTERIM = Path("data/interim")
PROCESSED = Path("data/processed")
PREPROCESSING_SECTIONS = ("data", "frames", "magnify", "flow", "landmarks")


def pack(interim: Path, params: dict) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays and attributes of the processed file, from the four intermediate files."""
    frames, frame_attrs = read_h5(interim / "frames.h5")
    magnified, _ = read_h5(interim / "magnified.h5", ["apex_magnified", "sample"])
    flow, _ = read_h5(interim / "flow.h5", ["flow", "sample"])
    landmarks, _ = read_h5(interim / "landmarks.h5", ["landmarks", "sample"])
    for name, part in (("magnified", magnified), ("flow", flow), ("landmarks", landmarks)):
        if not np.array_equal(part["sample"], frames["sample"]):
            raise PipelineError(f"{interim / name}.h5 holds other samples than frames.h5: "
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
        "detector": frames["detector"],  # the face-finding step of `frames` (README, "Face finding")
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


def main() -> None:
    params = load_params()
    arrays, attrs = pack(INTERIM, params)
    out = PROCESSED / f"{params['data']['dataset']}.h5"
    write_h5(out, arrays, attrs)
    counts = np.bincount(arrays["label"], minlength=len(attrs["classes"]))
    print(f"pack: {len(arrays['label'])} samples, {len(set(arrays['subject']))} subjects, "
          + ", ".join(f"{c} {n}" for c, n in zip(attrs["classes"], counts)) + f" -> {out}")


if __name__ == "__main__":
    run_main(main)
