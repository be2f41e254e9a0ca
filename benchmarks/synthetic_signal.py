"""Is the synthetic dataset's class signal in the motion, not in the appearance?

Trains the same simple classifier (standardised features, logistic regression, LOSO over
subjects, predictions pooled over folds, MEGC2019 UF1/UAR) on the 3-class samples with

(a) dense optical flow onset -> apex (Farneback on the grey face crop, the median flow removed
    to cancel head drift, averaged over an 8×8 grid of cells), and
(b) the apex frame alone (grey face crop, 32×32 pixels).

Flow must win clearly; apex-only should be near chance (1/3). Also counts dlib faces in every
frame (`--faces`). Usage:

    python -m benchmarks.synthetic_signal [data/raw/synthetic] [--faces]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from mer.common import load_params
from mer.metrics import pooled_scores
from mer.probes import cell_features, drift_free, probe_predictions
from mer.synthetic import LABELS_NAME, THREE_CLASS, detect_faces

CROP = 160  # face crop side for the flow, px
GRID = 8
APEX_SIDE = 32
MARGIN = 0.15
CLASSES = ["negative", "positive", "surprise"]


def read_frame(root: Path, subject: str, filename: str, frame: int) -> np.ndarray:
    image = cv2.imread(str(root / f"sub{subject}" / filename / f"img{frame}.jpg"), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise FileNotFoundError(f"sub{subject}/{filename}/img{frame}.jpg")
    return image


def face_crop(image: np.ndarray, box: tuple[int, int, int, int], side: int) -> np.ndarray:
    left, top, right, bottom = box
    grow = MARGIN * (right - left)
    x0, x1 = int(max(0, left - grow)), int(min(image.shape[1], right + grow))
    y0, y1 = int(max(0, top - grow)), int(min(image.shape[0], bottom + grow))
    return cv2.resize(image[y0:y1, x0:x1], (side, side), interpolation=cv2.INTER_AREA).astype(np.float32)


def farneback(onset: np.ndarray, apex: np.ndarray) -> np.ndarray:
    """H×W×2 dense flow onset -> apex (pixels of the images given)."""
    return cv2.calcOpticalFlowFarneback(onset, apex, None, 0.5, 3, 15, 5, 5, 1.1, 0)


def features(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(flow features, apex features, labels, subject groups) of the 3-class samples."""
    table = pd.read_excel(root / LABELS_NAME, dtype=object)
    table = table[table["Estimated Emotion"].isin(THREE_CLASS)]
    flows, apexes, labels, groups = [], [], [], []
    for row in table.itertuples(index=False):
        subject, filename, onset_frame, apex_frame = row[0], row[1], int(row[3]), int(row[4])
        onset = read_frame(root, subject, filename, onset_frame)
        apex = read_frame(root, subject, filename, apex_frame)
        faces = detect_faces(onset)
        if len(faces) != 1:
            raise RuntimeError(f"sub{subject}/{filename}: {len(faces)} faces in the onset frame")
        a, b = face_crop(onset, faces[0], CROP), face_crop(apex, faces[0], CROP)
        flows.append(farneback(a, b))
        apexes.append(face_crop(apex, faces[0], APEX_SIDE).ravel())
        labels.append(CLASSES.index(THREE_CLASS[row[8]]))
        groups.append(subject)
    flow_cells = cell_features(drift_free(np.stack(flows)), GRID)  # the median removed: head drift
    return flow_cells, np.array(apexes), np.array(labels), np.array(groups)


def loso_scores(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[float, float]:
    """(UF1, UAR) of the baselines' probe (mer/probes.py, C 0.1), LOSO, predictions pooled over folds."""
    scores = pooled_scores(y, probe_predictions(x, y, groups, 0.1), CLASSES)
    return scores["uf1"], scores["uar"]


def signal_check(root: Path) -> dict[str, tuple[float, float]]:
    """{'flow': (UF1, UAR), 'apex': (UF1, UAR)} on the dataset at `root`."""
    flow, apex, labels, groups = features(root)
    return {"flow": loso_scores(flow, labels, groups), "apex": loso_scores(apex, labels, groups)}


def face_counts(root: Path) -> dict[int, int]:
    """How many frames have 0, 1, 2... dlib faces (full resolution, no upsampling)."""
    counts: dict[int, int] = {}
    for path in sorted(root.glob("sub*/*/img*.jpg")):
        n = len(detect_faces(cv2.imread(str(path))))
        counts[n] = counts.get(n, 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, help="dataset folder (default: params.yaml data.root)")
    parser.add_argument("--faces", action="store_true", help="also count dlib faces in every frame")
    args = parser.parse_args()
    args.root = args.root or Path(load_params()["data"]["root"])
    for name, (uf1, uar) in signal_check(args.root).items():
        print(f"{name:>5}: UF1 {uf1:.3f}  UAR {uar:.3f}")
    if args.faces:
        print(f"faces per frame: {face_counts(args.root)}")


if __name__ == "__main__":
    main()
