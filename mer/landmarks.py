"""Landmarks: dlib 68 points on the onset and apex crops, the 51 non-jaw points kept.

The face is re-detected on the onset crop (the predictor fits best from a box of the
detector at the crop's own scale) by the detector chain of `face.find_face`, the box `frames`
found, mapped into the crop, being the last fallback; the apex is fitted from the same box, so
onset and apex start alike. dlib returns whole-pixel points.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from mer import face
from mer.common import parallel_map, round_uint8


def fit_pair(job: tuple[np.ndarray, np.ndarray, np.ndarray], predictor_file: Path,
             cnn_file: Path | None = None) -> tuple[np.ndarray, str]:
    """51×4 float32 (x_onset, y_onset, x_apex, y_apex in crop pixels) and the source of the box they
    were fitted from: a `face.DETECTORS` step, or `frames_box` when none finds the face."""
    onset, apex = (round_uint8(image) for image in job[:2])  # dlib reads 8-bit images
    frames_box = job[2]
    found = face.find_face(onset, detect_width=onset.shape[1], upsample=1, cnn_file=cnn_file)
    box, source = (frames_box, "frames_box") if found is None else found
    points = [face.landmarks68(image, box, predictor_file)[face.KEPT] for image in (onset, apex)]
    return np.concatenate(points, axis=1), source


def landmarks_pair(job: tuple[np.ndarray, np.ndarray, np.ndarray], predictor_file: Path,
                   cnn_file: Path | None = None) -> np.ndarray:
    """51×4 float32: x_onset, y_onset, x_apex, y_apex in crop pixels."""
    return fit_pair(job, predictor_file, cnn_file)[0]


def detect_landmarks(onset: np.ndarray, apex: np.ndarray, boxes: np.ndarray, predictor_file: Path,
                     workers: int, cnn_file: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """N×51×4 landmarks for N onset/apex crop pairs and their N×4 face boxes, and the N sources of
    the boxes fitted from (see `fit_pair`)."""
    face.predictor(predictor_file)  # load once here; forked workers inherit it
    work = functools.partial(fit_pair, predictor_file=predictor_file, cnn_file=cnn_file)
    fitted = parallel_map(work, list(zip(onset, apex, boxes)), workers, desc="landmarks")
    return np.stack([points for points, _ in fitted]), np.array([source for _, source in fitted])
