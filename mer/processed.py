"""The processed HDF5: the intermediate files packed into one file per dataset, `data/processed/<dataset>.h5`,
and read back for training.

Array names, shapes and meanings: docs/hdf5.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mer.common import PipelineError, class_names, package_versions, read_h5, round_uint8

PREPROCESSING_SECTIONS = ("frames", "magnify", "flow", "landmarks")  # params that make the file (and `data`)
TRAINING_ARRAYS = ("apex", "flow", "landmarks", "label", "subject", "sample")


def check_same_samples(path: Path, samples: np.ndarray, frames_h5: Path, frame_samples: np.ndarray) -> None:
    """An intermediate file at `path` holds the samples of the frames file, in its order; else it is
    stale (written from another frames file)."""
    if not np.array_equal(samples, frame_samples):
        raise PipelineError(f"{path} holds other samples than {frames_h5}: it is stale, rerun `dvc repro`")


def pack(frames_h5: Path, magnified_h5: Path, flow_h5: Path, landmarks_h5: Path,
         params: dict) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays and attributes of the processed file, from the four intermediate files."""
    frames, frame_attrs = read_h5(frames_h5)
    magnified, _ = read_h5(magnified_h5, ["apex_magnified", "sample"])
    flow, _ = read_h5(flow_h5, ["flow", "sample"])
    landmarks, _ = read_h5(landmarks_h5, ["landmarks", "sample"])
    for path, part in ((magnified_h5, magnified), (flow_h5, flow), (landmarks_h5, landmarks)):
        check_same_samples(path, part["sample"], frames_h5, frames["sample"])
    magnify = params["magnify"]
    arrays = {
        "onset": round_uint8(frames["onset"]),  # the crops stay float up to here (docs/pipeline.md)
        "apex": round_uint8(magnified["apex_magnified"]),
        "flow": flow["flow"],
        "landmarks": landmarks["landmarks"],
        "label": frames["label"],
        "subject": frames["subject"],
        "sample": frames["sample"],
        "emotion": frames["emotion"],
        "detector": frames["detector"],  # the face-finding step of `frames` (docs/hdf5.md)
        "frame_numbers": frames["frame_numbers"],  # onset, apex as numbered in the frame files
    }
    attrs = {
        "dataset": frame_attrs["dataset"],
        "classes": json.loads(frame_attrs["classes"]),
        "label_fixes": json.loads(frame_attrs["label_fixes"]),
        "apex_frame": f"magnified apex: method={magnify['method']}, alpha={magnify['alpha']}; onset as is",
        "params": {section: params[section] for section in ("data", *PREPROCESSING_SECTIONS)},
        "versions": package_versions(),
    }
    return arrays, attrs


def load_processed(h5_path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any], list[str]]:
    """(arrays the model trains on, attrs, class names) of the processed HDF5; an empty file is an error."""
    arrays, attrs = read_h5(h5_path, TRAINING_ARRAYS)
    classes = class_names(attrs)
    if len(arrays["label"]) == 0:
        raise PipelineError(f"{h5_path} holds no samples")
    return arrays, attrs, classes
