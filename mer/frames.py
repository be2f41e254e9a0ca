"""Frame reading and face alignment: label spreadsheet → onset and apex frames → aligned face crops.

The face is found with dlib on the onset frame only and its 68 points fitted there; the same
similarity transform (eyes levelled, the square the points set plus margin scaled to `frames.size`)
is applied to the apex frame, so the only difference between the two crops is the facial motion itself.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from mer import face
from mer.common import (
    PipelineError,
    parallel_map,
)
from mer.datasets import MicroExpressionDataset, Sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrameJob:
    name: str  # subject/sample, for messages
    onset_path: Path
    apex_path: Path


def read_rgb(path: Path, name: str) -> np.ndarray:
    """Frame as H×W×3 uint8 RGB (grey frames repeated on the three channels)."""
    if not path.is_file():  # before imread, which would also print a warning of its own
        raise PipelineError(f"{name}: frame {path} does not exist: check the path, or restore the file")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise PipelineError(f"{name}: frame {path} is not a readable image (damaged, or a format OpenCV "
                            "does not read as 8 or 16 bits, e.g. float TIFF): replace the file or convert it "
                            "to PNG")
    if jpeg_cut_short(path.read_bytes()):  # OpenCV decodes it, the missing rows grey: a false motion
        raise PipelineError(f"{name}: frame {path} is a JPEG cut short (no end marker after its image data; "
                            "an interrupted copy or download): copy the file again from the dataset")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def jpeg_cut_short(data: bytes) -> bool:
    """True for a JPEG file with no end-of-image marker after its last scan. Inside scan data a 0xFF
    byte is always followed by 0x00 or a restart marker, so neither marker can appear there by chance;
    bytes after the end marker (some cameras pad) are allowed."""
    if not data.startswith(b"\xff\xd8"):
        return False
    last_scan = data.rfind(b"\xff\xda")
    return last_scan >= 0 and data.find(b"\xff\xd9", last_scan) < 0


# The crop's framing in units of the 51 kept points' RMS distance from their centroid (eyes levelled):
# the mean framing of dlib's HOG box over 26 faces (2 real photos, 24 synthetic onsets). The points
# hold it within 2% whichever detector found the face (7 of 8 faces measured; 5% on the eighth),
# where the box varies by 7% from face to face (HOG's pyramid steps) and the CNN's is up to 23%
# smaller than HOG's (docs/pipeline.md "The crop").
FACE_SIDE = 3.3  # crop side at margin 0
FACE_DROP = 0.08  # crop centre below the points' centroid
OUTSIDE_WARN = 0.1  # share of a crop past the frame's edge that `extract_frames` warns of


def alignment_matrix(points: np.ndarray, size: int, margin: float) -> np.ndarray:
    """2×3 similarity from the 68 landmarks `points`: rotate about the face so the eyes are level,
    scale the face (FACE_SIDE × the kept points' RMS radius, grown by `margin` per side) to `size`,
    centre it."""
    left_eye, right_eye = points[face.LEFT_EYE].mean(0), points[face.RIGHT_EYE].mean(0)
    angle = np.arctan2(right_eye[1] - left_eye[1], right_eye[0] - left_eye[0])
    kept = points[face.KEPT]
    centroid = kept.mean(0)
    radius = np.sqrt(((kept - centroid) ** 2).sum(1).mean())
    centre = centroid + FACE_DROP * radius * np.array([-np.sin(angle), np.cos(angle)])  # face's "down"
    side = FACE_SIDE * radius * (1 + 2 * margin)
    matrix = cv2.getRotationMatrix2D(tuple(map(float, centre)), float(np.degrees(angle)), size / side)
    matrix[:, 2] += np.array([size / 2, size / 2]) - centre
    return matrix


def warp(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Apply `matrix`, first halving the image while the scale is below 1/2 (no aliasing)."""
    matrix = matrix.copy()
    while np.hypot(*matrix[0, :2]) < 0.5:
        image = cv2.pyrDown(image)
        matrix[:, :2] *= 2
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)


def check_not_blank(image: np.ndarray, name: str, what: str) -> np.ndarray:
    """`image`, refused when it holds one grey level (±1): a dropped or black frame has no face, and as
    an apex it would give a flow of zero and a confident class."""
    low, high = int(image.min()), int(image.max())
    if high - low <= 2:
        raise PipelineError(f"{name}: {what} is blank (grey levels {low}–{high} only): a dropped frame? "
                            "give another frame number or replace the file")
    return image


def read_pair(job: FrameJob) -> tuple[np.ndarray, np.ndarray]:
    """The onset and apex frames of `job`, RGB uint8, checked to share a size and not to be blank."""
    onset = check_not_blank(read_rgb(job.onset_path, job.name), job.name, f"onset frame {job.onset_path}")
    apex = check_not_blank(read_rgb(job.apex_path, job.name), job.name, f"apex frame {job.apex_path}")
    if onset.shape != apex.shape:
        raise PipelineError(f"{job.name}: onset {job.onset_path.name} is {onset.shape[1]}×{onset.shape[0]} "
                            f"but apex {job.apex_path.name} is {apex.shape[1]}×{apex.shape[0]}: "
                            "frames of one sample must share a size")
    return onset, apex


def outside_share(matrix: np.ndarray, size: int, frame_shape: tuple[int, ...]) -> float:
    """Share of a `size`² crop made with `matrix` that lies past the frame's edge (filled there by
    repeating the edge's pixels), on a 32 × 32 grid of the crop."""
    grid = (np.arange(32) + 0.5) * size / 32
    xs, ys = np.meshgrid(grid, grid)
    inverse = cv2.invertAffineTransform(matrix)
    x, y = (inverse[:, :2] @ np.stack([xs.ravel(), ys.ravel()]) + inverse[:, 2:])
    height, width = frame_shape[:2]
    return float(((x < -0.5) | (x > width - 0.5) | (y < -0.5) | (y > height - 0.5)).mean())


def align_pair(onset: np.ndarray, apex: np.ndarray, size: int, margin: float, detect_width: int,
               upsample: int, predictor_file: Path, detectors: Sequence[str] = face.DETECTORS,
               cnn_file: Path | None = None) -> dict[str, Any] | None:
    """Aligned onset and apex crops (float32 grey levels, not rounded: `tests/test_do_no_harm.py`) of two
    same-size RGB uint8 frames, the face box in crop pixels
    (`face_box`) and as detected in the frame (`frame_box`), the chain step that found the face
    (`detector`, see `face.find_face`), the share of the crop past the frame's edge (`outside`);
    None when no face is found."""
    found = face.find_face(onset, detect_width, upsample, detectors, cnn_file)
    if found is None:
        return None
    box, detector = found
    matrix = alignment_matrix(face.landmarks68(onset, box, predictor_file), size, margin)
    corners = np.array([[box[0], box[1], 1], [box[2], box[3], 1]]) @ matrix.T
    centre, half = corners.mean(0), np.hypot(*matrix[0, :2]) * (box[2] - box[0]) / 2
    return {
        # Float: interpolating a sub-pixel movement gives fractions of a grey level, which rounding would
        # turn into one-level contours that TV-L1 reads as flow (docs/pipeline.md "The crop").
        "onset": warp(onset.astype(np.float32), matrix, size),
        "apex": warp(apex.astype(np.float32), matrix, size),
        "face_box": np.array([*(centre - half), *(centre + half)], dtype=np.float32),
        "frame_box": box.astype(np.float32),  # not stored by the stage; `predict` reports it
        "detector": detector,
        "outside": outside_share(matrix, size, onset.shape),  # not stored; a warning above OUTSIDE_WARN
    }


def crop_sample(job: FrameJob, size: int, margin: float, detect_width: int, upsample: int,
                predictor_file: Path, detectors: Sequence[str] = face.DETECTORS,
                cnn_file: Path | None = None) -> dict[str, Any] | None:
    """align_pair on the frames of `job`."""
    return align_pair(*read_pair(job), size, margin, detect_width, upsample, predictor_file, detectors,
                      cnn_file)


def frame_jobs(dataset: MicroExpressionDataset, samples: list[Sample]) -> list[FrameJob]:
    """Resolve every onset/apex file up front, so a missing frame fails before any work."""
    jobs = []
    for s in samples:
        present = dataset.frame_files(s)  # one directory listing per sample
        jobs.append(FrameJob(f"{s.subject}/{s.sample}", dataset.frame_path(s, s.onset, present, "onset"),
                             dataset.frame_path(s, s.apex, present, "apex")))
    return jobs


def crop_jobs(jobs: list[FrameJob], frames_params: dict[str, Any], predictor_file: Path, workers: int,
              cnn_file: Path | None = None, desc: str = "frames") -> list[dict[str, Any] | None]:
    """crop_sample on every job with the `frames` params, on `workers` processes."""
    face.predictor(predictor_file)  # load once in this process; forked workers inherit it
    work = functools.partial(crop_sample, size=frames_params["size"], margin=frames_params["margin"],
                             detect_width=frames_params["detect_width"], upsample=frames_params["upsample"],
                             predictor_file=predictor_file, detectors=frames_params["detectors"],
                             cnn_file=cnn_file)
    return parallel_map(work, jobs, workers, desc=desc)


def warn_past_edge(names: Sequence[str], outside: Sequence[float], what: str = "") -> None:
    """Warn where over OUTSIDE_WARN of a crop (`outside`: shares, one per sample of `names`) lies past
    its frame's edge; `what` names the crops (e.g. a report variant)."""
    past_edge = [(share, name) for share, name in zip(outside, names) if share > OUTSIDE_WARN]
    if past_edge:
        share, worst = max(past_edge)
        log.warning("%s%d sample(s) have over %.0f%% of their crop past the frame's edge, filled by "
                    "repeating the edge's pixels (most: %s, %.0f%%): frames cut tightly around the face; use "
                    "uncropped frames if the dataset has them",
                    what, len(past_edge), 100 * OUTSIDE_WARN, worst, 100 * share)


def extract_frames(dataset: MicroExpressionDataset, frames_params: dict[str, Any], predictor_file: Path,
                   workers: int, cnn_file: Path | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Crops of every sample as stacked arrays (`detector`: which chain step found each face), and
    the samples where no face was found."""
    samples = dataset.samples()
    if not samples:
        raise PipelineError(f"{dataset.name}: the label spreadsheet gives no samples of the "
                            f"{len(dataset.classes)}-class set: check data.labels and data.classes")
    crops = crop_jobs(frame_jobs(dataset, samples), frames_params, predictor_file, workers, cnn_file)
    no_face = [f"{s.subject}/{s.sample}" for s, c in zip(samples, crops) if c is None]
    if no_face and frames_params["on_no_face"] != "skip":
        raise PipelineError(f"no face found in the onset frame of {len(no_face)} sample(s): "
                            f"{', '.join(no_face)}: check those frames, or set frames.on_no_face=skip")
    kept = [(s, c) for s, c in zip(samples, crops) if c is not None]
    warn_past_edge([f"{s.subject}/{s.sample}" for s, _ in kept], [c["outside"] for _, c in kept])
    arrays = {key: np.stack([c[key] for _, c in kept]) for key in ("onset", "apex", "face_box")}
    arrays |= {
        "label": np.array([s.label for s, _ in kept], dtype=np.int64),
        "subject": np.array([s.subject for s, _ in kept]),
        "sample": np.array([s.sample for s, _ in kept]),
        "emotion": np.array([s.emotion for s, _ in kept]),
        "detector": np.array([c["detector"] for _, c in kept]),
        # the frames read, as numbered in the files (after label fixes; SMIC: the apex policy's choice)
        "frame_numbers": np.array([(s.onset, s.apex) for s, _ in kept], dtype=np.int64).reshape(-1, 2),
    }
    return arrays, no_face
