"""Tests of mer/metrics.py's per-dataset scores (MEGC2019 composite table)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, recall_score

from mer.metrics import per_dataset_scores, pooled_scores, subject_datasets

CLASSES = ["negative", "positive", "surprise"]


def test_subject_datasets() -> None:
    assert subject_datasets(["casme2_sub01", "samm_006", "smic_s01"]).tolist() == ["casme2", "samm", "smic"]


def test_per_dataset_scores_pooled_per_dataset() -> None:
    rng = np.random.default_rng(0)
    subjects = np.array(["casme2_sub01"] * 30 + ["casme2_sub02"] * 20 + ["samm_006"] * 25 + ["smic_s01"] * 15)
    y_true = rng.integers(0, 3, len(subjects))
    y_pred = np.where(rng.random(len(subjects)) < 0.6, y_true, rng.integers(0, 3, len(subjects)))
    y_true[75:] = np.where(y_true[75:] == 2, 0, y_true[75:])  # smic: no surprise at all
    got = per_dataset_scores(y_true, y_pred, subjects, CLASSES)
    assert list(got) == ["casme2", "samm", "smic"]
    assert {name: s["n"] for name, s in got.items()} == {"casme2": 50, "samm": 25, "smic": 15}
    for name, start, stop in (("casme2", 0, 50), ("samm", 50, 75), ("smic", 75, 90)):
        t, p = y_true[start:stop], y_pred[start:stop]
        pooled = pooled_scores(t, p, CLASSES)
        assert got[name] == pytest.approx({"uf1": pooled["uf1"], "uar": pooled["uar"], "n": stop - start})
        # the MEGC definition: macro over ALL classes, an absent class counts (0)
        everything = {"labels": [0, 1, 2], "average": "macro", "zero_division": 0}
        assert got[name]["uf1"] == pytest.approx(f1_score(t, p, **everything))
        assert got[name]["uar"] == pytest.approx(recall_score(t, p, **everything))


def test_per_dataset_scores_one_dataset_and_errors() -> None:
    assert per_dataset_scores([0, 1], [0, 1], ["casme2_sub01", "casme2_sub02"], CLASSES) == {}
    with pytest.raises(ValueError, match="3 subjects for 2 predictions"):
        per_dataset_scores([0, 1], [0, 1], ["a_1", "b_1", "b_2"], CLASSES)
