"""One clip's preprocessing in memory: the per-sample functions that stages frames, magnify, flow and
landmarks run (mer/frames.py, magnify.py, flow.py, landmarks.py), in the stages' order with the same
params sections.

The stages run one step over every sample at a time (one HDF5 file per step); `predict` and the
benchmarks need every step for one sample. Both call the same functions, so a clip preprocessed here
equals its row of the processed HDF5 (tests/test_predict.py checks it byte for byte).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mer import face
from mer.common import PipelineError, round_uint8
from mer.flow import flow_pair
from mer.frames import align_pair
from mer.landmarks import landmarks_pair
from mer.magnify import magnify_item


@dataclass(frozen=True)
class FaceModels:
    """The dlib files and detector chain that stages frames and landmarks resolve from params."""

    predictor_file: Path
    detectors: tuple[str, ...]
    cnn_file: Path


def face_models(params: dict[str, Any]) -> FaceModels:
    """Resolved and checked as the stages' main() do; the predictor and HOG detector loaded now (the
    CNN only when HOG misses, as in the stages)."""
    models = FaceModels(face.predictor_path(params["landmarks"]["predictor"]),
                        face.check_detectors(params["frames"]["detectors"], "frames.detectors"),
                        face.cnn_detector_path(params["landmarks"]["cnn_detector"]))
    face.detector()
    face.predictor(models.predictor_file)
    return models


def preprocess_pair(onset: np.ndarray, apex: np.ndarray, params: dict[str, Any], models: FaceModels,
                    name: str) -> tuple[dict[str, Any], dict[str, float]]:
    """Two same-size H×W×3 RGB uint8 frames → (sample, milliseconds per step).

    sample: `onset` and `apex` (magnified) crops, `flow` and `landmarks` as in the processed HDF5,
    `face_box` in crop pixels, `frame_box` in onset-frame pixels, `detector`, the chain step that
    found the face, and `outside`, the share of the crop past the frame's edge. `name` is the input as
    the user gave it, for the error when no face is found.
    """
    fp = params["frames"]
    times = [time.perf_counter()]
    crop = align_pair(onset, apex, fp["size"], fp["margin"], fp["detect_width"], fp["upsample"],
                      models.predictor_file, models.detectors, models.cnn_file)
    if crop is None:
        raise PipelineError(f"{name}: no face found in the onset frame: give frames in which one "
                            "frontal, unoccluded face fills a good part of the image")
    times.append(time.perf_counter())
    magnified = magnify_item((crop["onset"], crop["apex"]), params["magnify"])
    times.append(time.perf_counter())
    flow = flow_pair((crop["onset"], magnified), params["flow"])
    times.append(time.perf_counter())
    landmarks = landmarks_pair((crop["onset"], crop["apex"], crop["face_box"]), models.predictor_file,
                               models.cnn_file)
    times.append(time.perf_counter())
    sample = {"onset": round_uint8(crop["onset"]), "apex": round_uint8(magnified), "flow": flow,
              "landmarks": landmarks, "face_box": crop["face_box"], "frame_box": crop["frame_box"],
              "detector": crop["detector"], "outside": crop["outside"]}
    steps = ("face_alignment", "magnification", "tvl1", "landmarks")
    return sample, {step: 1000 * (b - a) for step, a, b in zip(steps, times, times[1:])}
