"""dlib face detector and 68-point shape predictor, loaded once per process."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import dlib
import numpy as np

from stages.common import PipelineError

PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
JAW = slice(0, 17)  # dlib points 0-16: the face contour, unrelated to micro-expressions (paper §3.1)
KEPT = slice(17, 68)  # the 51 points the model uses: brows, nose, eyes, mouth
LEFT_EYE = slice(36, 42)  # image-left eye (the subject's right)
RIGHT_EYE = slice(42, 48)


def default_predictor_path() -> Path:
    """The 68-point model shipped in PyPI `face-recognition-models` (located, not imported:
    importing it needs pkg_resources, which new setuptools no longer has)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(
            "dlib's 68-point predictor not found: `pip install face-recognition-models` "
            "or set landmarks.predictor to a shape_predictor_68_face_landmarks.dat file"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models" / PREDICTOR_FILE


def predictor_path(configured: str | None) -> Path:
    path = Path(configured) if configured else default_predictor_path()
    if not path.is_file():
        raise PipelineError(
            f"dlib predictor file {path} does not exist: set landmarks.predictor to the path of "
            f"{PREDICTOR_FILE} (or leave it empty to use face-recognition-models')"
        )
    return path


@functools.cache
def detector() -> dlib.fhog_object_detector:
    return dlib.get_frontal_face_detector()


@functools.cache
def predictor(path: Path) -> dlib.shape_predictor:
    try:
        return dlib.shape_predictor(str(path))
    except RuntimeError as err:
        raise PipelineError(f"dlib could not read predictor {path} ({err}): point landmarks.predictor "
                            f"at a valid {PREDICTOR_FILE}") from err


def detect_largest_face(image: np.ndarray, detect_width: int, upsample: int) -> np.ndarray | None:
    """Largest frontal face as (left, top, right, bottom) in `image` pixels, or None.

    The detector runs on a copy downscaled to `detect_width` (HOG cost grows with pixels,
    and a micro-expression face fills a good part of the frame)."""
    import cv2

    scale = min(1.0, detect_width / image.shape[1])
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image
    rects = detector()(small, upsample)
    if not rects:
        return None
    rect = max(rects, key=lambda r: r.width() * r.height())
    return np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], dtype=np.float64) / scale


def landmarks68(image: np.ndarray, box: np.ndarray, predictor_file: Path) -> np.ndarray:
    """68×2 float32 (x, y) landmarks of the face in `box` (left, top, right, bottom)."""
    left, top, right, bottom = (int(round(v)) for v in box)
    shape = predictor(predictor_file)(image, dlib.rectangle(left, top, right, bottom))
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
