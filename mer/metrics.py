"""Scores of a Leave-One-Subject-Out evaluation (MEGC2019 definition), on scikit-learn. No I/O.

Pooled (the reported numbers, paper eq. 9): the predictions of ALL folds are put together, then
per class c of the C classes (every class of the dataset, predicted or not)

    F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)        recall_c = TP_c / n_c

(0 where the denominator is 0: a class never predicted and never true scores 0), and
UF1 = mean_c F1_c, UAR = mean_c recall_c, accuracy = sum_c TP_c / N: scikit-learn's f1_score and
recall_score with labels = every class, average=None, zero_division=0, then the plain mean.

Per-fold mean (`per_fold_mean`, reported for comparison only, NOT comparable with published
pooled numbers): UF1 / UAR of each fold (test subject) alone, macro over the classes that occur in
that fold's true or predicted labels (what `sklearn.metrics.f1_score(average="macro")` does per
fold), then the plain mean over folds. It is lower and noisier than the pooled score.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import metrics as skm

from mer.common import atomic_path

DECIMALS = 6
PER_FOLD_COLUMNS = ("subject", "n", "uf1", "uar", "accuracy")  # metrics/per_fold.csv


def _checked(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
             num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Both label arrays as int64, same shape, every index in 0..num_classes-1 (scikit-learn would
    silently leave an index outside `labels` out of every count)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} holds a class index outside 0..{num_classes - 1}")
    return y_true, y_pred


def confusion_matrix(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                     num_classes: int) -> np.ndarray:
    """C x C int64 counts, rows = true class, columns = predicted class."""
    y_true, y_pred = _checked(y_true, y_pred, num_classes)
    if not y_true.size:
        return np.zeros((num_classes, num_classes), dtype=np.int64)
    return skm.confusion_matrix(y_true, y_pred, labels=np.arange(num_classes)).astype(np.int64)


def pooled_scores(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                  classes: Sequence[str]) -> dict[str, Any]:
    """MEGC2019 scores of predictions pooled over all folds (see the module docstring): UF1, UAR,
    accuracy and per-class f1 / recall / support over ALL the classes."""
    names = list(classes)
    y_true, y_pred = _checked(y_true, y_pred, len(names))
    labels = np.arange(len(names))
    if not (y_true.size and len(names)):
        zeros = np.zeros(len(names))
        f1, recall = zeros, zeros
    else:
        f1 = skm.f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
        recall = skm.recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    support = np.bincount(y_true, minlength=len(names))
    return {
        "uf1": float(f1.mean()) if len(names) else 0.0,
        "uar": float(recall.mean()) if len(names) else 0.0,
        "accuracy": float(skm.accuracy_score(y_true, y_pred)) if y_true.size else 0.0,
        "per_class": {
            name: {"f1": float(f), "recall": float(r), "support": int(n)}
            for name, f, r, n in zip(names, f1, recall, support)
        },
    }


def subject_datasets(subjects: Sequence[str] | np.ndarray) -> np.ndarray:
    """The dataset of each subject id, its prefix ("casme2_sub01" -> "casme2", "smic_s01" -> "smic")."""
    return np.array([str(s).split("_", 1)[0] for s in subjects])


def per_dataset_scores(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                       subjects: Sequence[str] | np.ndarray,
                       classes: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """{dataset: {uf1, uar, n}} as MEGC2019 reports a composite: each dataset's predictions pooled
    over all its folds, scored like `pooled_scores` over ALL the classes (a class absent from a
    dataset scores 0 there). {} when every subject comes from one dataset (nothing to split)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    datasets = subject_datasets(subjects)
    if len(datasets) != len(y_true):
        raise ValueError(f"{len(datasets)} subjects for {len(y_true)} predictions")
    names = np.unique(datasets)
    if len(names) < 2:
        return {}
    out: dict[str, dict[str, float | int]] = {}
    for name in names:
        mask = datasets == name
        scores = pooled_scores(y_true[mask], y_pred[mask], classes)
        out[str(name)] = {"uf1": scores["uf1"], "uar": scores["uar"], "n": int(mask.sum())}
    return out


def fold_scores(y_true: Sequence[int] | np.ndarray,
                y_pred: Sequence[int] | np.ndarray) -> tuple[float, float]:
    """(UF1, UAR) of one fold, macro over the classes in its true or predicted labels."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.size == 0:
        raise ValueError("a fold with no samples has no score")
    return (float(skm.f1_score(y_true, y_pred, average="macro", zero_division=0)),
            float(skm.recall_score(y_true, y_pred, average="macro", zero_division=0)))


def per_fold_mean(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                  folds: Sequence[Any] | np.ndarray) -> dict[str, float]:
    """Mean over folds of the per-fold UF1 / UAR (not the pooled score: see the module docstring)."""
    y_true, y_pred, folds = np.asarray(y_true), np.asarray(y_pred), np.asarray(folds)
    per_fold = [fold_scores(y_true[folds == f], y_pred[folds == f]) for f in np.unique(folds)]
    uf1s, uars = zip(*per_fold) if per_fold else ((), ())
    return {"uf1": float(np.mean(uf1s)) if uf1s else 0.0, "uar": float(np.mean(uars)) if uars else 0.0}


def round_floats(obj: Any, decimals: int = DECIMALS) -> Any:
    """Floats (nested in dicts / lists) rounded, so that a JSON dump is stable across platforms."""
    if isinstance(obj, dict):
        return {k: round_floats(v, decimals) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, decimals) for v in obj]
    if isinstance(obj, (float, np.floating)):
        value = round(float(obj), decimals)
        return 0.0 if value == 0 else value  # no "-0.0"
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(path: Path | str, data: Any) -> None:
    """`data` as JSON, atomically: floats rounded, keys sorted, two-space indent (stable diffs)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(round_floats(data), sort_keys=True, indent=2) + "\n")
