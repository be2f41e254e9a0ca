"""The baselines' linear probes on the model's own input, same HDF5, same LOSO folds as `train`.

A model that cannot beat a logistic regression on the flow it is given has not learned what is in
the data. Two probes, each a class-balanced logistic regression on standardised features
(scikit-learn), trained per fold on the training subjects only and scored with the same pooled
MEGC2019 definition as `train` (`metrics/baselines.json`, next to `metrics/loso.json` in
`dvc metrics show`):

- `flow_cells`: the TV-L1 flow of the HDF5 (onset -> magnified apex), each sample's median u and
  v removed (head drift, as the model's flow stem does), averaged over a `cells` x `cells` grid:
  2 cells^2 features.
- `flow_landmarks`: the same median-removed flow averaged in a `window_px` square around each of
  the 51 apex landmarks (the region a LAMiF block covers: B x B cells of the 56 map = 16 px of
  the 224 crop): 102 features.

`C` (inverse regularisation) is one value for both, set in params.yaml.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import LeaveOneGroupOut
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mer.metrics import pooled_scores


def drift_free(flow: np.ndarray) -> np.ndarray:
    """N x H x W x 2 flow minus each sample's median (u, v)."""
    return flow - np.median(flow.reshape(len(flow), -1, 2), axis=1)[:, None, None, :]


def cell_features(flow: np.ndarray, cells: int) -> np.ndarray:
    """N x H x W x 2 -> N x (cells * cells * 2): mean flow per grid cell (edges cut to a multiple)."""
    n, h, w, _ = flow.shape
    grid = flow[:, : h - h % cells, : w - w % cells].reshape(n, cells, h // cells, cells, w // cells, 2)
    return grid.mean(axis=(2, 4)).reshape(n, -1)


def landmark_features(flow: np.ndarray, landmarks: np.ndarray, window_px: int) -> np.ndarray:
    """N x H x W x 2 flow, N x 51 x 4 landmarks -> N x 102: mean flow in a window at each apex point."""
    n, h, w, _ = flow.shape
    # integral image: any window mean in O(1)
    integral = np.zeros((n, h + 1, w + 1, 2), dtype=np.float64)
    integral[:, 1:, 1:] = flow.cumsum(axis=1).cumsum(axis=2)
    half = window_px / 2
    x, y = landmarks[..., 2], landmarks[..., 3]  # apex, crop pixels
    x0 = np.clip(np.round(x - half), 0, w - 1).astype(int)
    x1 = np.clip(np.round(x + half), x0 + 1, w).astype(int)
    y0 = np.clip(np.round(y - half), 0, h - 1).astype(int)
    y1 = np.clip(np.round(y + half), y0 + 1, h).astype(int)
    i = np.arange(n)[:, None]
    total = integral[i, y1, x1] - integral[i, y0, x1] - integral[i, y1, x0] + integral[i, y0, x0]
    area = ((x1 - x0) * (y1 - y0))[..., None]
    return (total / area).reshape(n, -1)


def probe_predictions(features: np.ndarray, labels: np.ndarray, subjects: np.ndarray, c: float) -> np.ndarray:
    """Out-of-fold class predictions of a standardised, class-balanced logistic regression (LOSO)."""
    predicted = np.empty_like(labels)
    # LeaveOneGroupOut over the subjects: the folds of model/training.py's loso_splits
    for train, test in LeaveOneGroupOut().split(features, labels, groups=subjects):
        probe = make_pipeline(StandardScaler(),
                              LogisticRegression(C=c, class_weight="balanced", max_iter=5000))
        probe.fit(features[train], labels[train])
        predicted[test] = probe.predict(features[test])
    return predicted


def run_baselines(arrays: dict[str, np.ndarray], classes: list[str], section: dict[str, Any]) -> dict:
    """{probe name: pooled scores} for the processed arrays `flow`, `landmarks`, `label`, `subject`."""
    flow = drift_free(arrays["flow"].astype(np.float32))
    labels = arrays["label"].astype(np.int64)
    subjects = np.asarray(arrays["subject"])
    features = {
        "flow_cells": cell_features(flow, int(section["cells"])),
        "flow_landmarks": landmark_features(flow, arrays["landmarks"], int(section["window_px"])),
    }
    return {name: pooled_scores(labels, probe_predictions(x, labels, subjects, float(section["C"])), classes)
            for name, x in features.items()}
