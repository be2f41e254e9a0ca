"""Stage `landmarks`: dlib 68 points on the onset and apex crops, the 51 non-jaw points kept.

The face is re-detected on the onset crop (the predictor fits best from a box of the
detector at the crop's own scale; the box `frames` found, mapped into the crop, is the
fallback), and the apex is fitted from the same box, so onset and apex start alike.
dlib returns whole-pixel points.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from stages import face
from stages.common import load_params, package_versions, parallel_map, read_h5, run_main, write_h5

FRAMES = Path("data/interim/frames.h5")
OUT = Path("data/interim/landmarks.h5")


def landmarks_pair(job: tuple[np.ndarray, np.ndarray, np.ndarray], predictor_file: Path) -> np.ndarray:
    """51×4 float32: x_onset, y_onset, x_apex, y_apex in crop pixels."""
    onset, apex, frames_box = job
    box = face.detect_largest_face(onset, detect_width=onset.shape[1], upsample=1)
    box = frames_box if box is None else box
    points = [face.landmarks68(image, box, predictor_file)[face.KEPT] for image in (onset, apex)]
    return np.concatenate(points, axis=1)


def detect_landmarks(onset: np.ndarray, apex: np.ndarray, boxes: np.ndarray, predictor_file: Path,
                     workers: int) -> np.ndarray:
    """N×51×4 landmarks for N onset/apex crop pairs and their N×4 face boxes."""
    face.predictor(predictor_file)  # load once here; forked workers inherit it
    work = functools.partial(landmarks_pair, predictor_file=predictor_file)
    return np.stack(parallel_map(work, list(zip(onset, apex, boxes)), workers, desc="landmarks"))


def main() -> None:
    params = load_params()
    predictor_file = face.predictor_path(params["landmarks"]["predictor"])
    frames, _ = read_h5(FRAMES, ["onset", "apex", "face_box", "sample"])
    landmarks = detect_landmarks(frames["onset"], frames["apex"], frames["face_box"], predictor_file,
                                 params["workers"])
    write_h5(OUT, {"landmarks": landmarks, "sample": frames["sample"]},
             {"params": {"landmarks": params["landmarks"]}, "versions": package_versions()})
    print(f"landmarks: {len(landmarks)} × 51 points on onset and apex -> {OUT}")


if __name__ == "__main__":
    run_main(main)
