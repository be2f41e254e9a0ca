"""Reports: ARa / AEr, the paired Wilcoxon test, and the train stage's per-fold scores and features."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run
from scipy.stats import wilcoxon

from mer import metrics
from mer import reports as report
from mer.common import PipelineError, read_h5

# ---- ARa / AEr ------------------------------------------------------------------------------------


def test_class_distances_on_a_hand_made_point_set():
    """Class 0: a square of side 2 centred at (0, 0) (every point sqrt(2) from the centre); class 1:
    two points 2 apart centred at (6, 8) (each 1 from the centre); centres 10 apart."""
    points = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1], [5, 8], [7, 8]], dtype=float)
    labels = np.array([0, 0, 0, 0, 1, 1])
    got = report.class_distances(points, labels)
    assert got["intra"] == {0: pytest.approx(math.sqrt(2)), 1: pytest.approx(1.0)}
    assert got["ara"] == pytest.approx((math.sqrt(2) + 1) / 2)  # mean over classes, not samples
    assert got["aer"] == pytest.approx(10.0)

    # a third class at (0, 8): inter-class distances 10, 8, 6 -> AEr 8
    three = report.class_distances(np.vstack([points, [[0, 8]]]), np.append(labels, 2))
    assert three["aer"] == pytest.approx(8.0) and three["intra"][2] == 0.0

    # unit RMS radius: scale and translation free
    scaled = report.class_distances(report.unit_rms(points * 7.5 + 3), labels)
    base = report.class_distances(report.unit_rms(points), labels)
    assert scaled["ara"] == pytest.approx(base["ara"]) and scaled["aer"] == pytest.approx(base["aer"])
    centred = report.unit_rms(points)
    assert np.mean(np.sum(centred**2, axis=1)) == pytest.approx(1.0)
    assert np.allclose(np.linalg.norm(report.l2_rows(points * 3), axis=1), 1.0)

    with pytest.raises(PipelineError, match="at least 2 classes"):
        report.class_distances(points[:4], labels[:4])


# ---- Wilcoxon -------------------------------------------------------------------------------------


def write_per_fold(path: Path, rows: list[tuple[str, int, float, float]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["subject", "n", "uf1", "uar", "accuracy"])
        for subject, n, uf1, uar in rows:
            writer.writerow([subject, n, f"{uf1:.6f}", f"{uar:.6f}", "0.5"])
    return path


A_ROWS = [("s1", 5, 0.50, 0.40), ("s2", 3, 0.60, 0.55), ("s3", 8, 0.30, 0.35), ("s4", 4, 0.90, 0.80),
          ("s5", 6, 0.45, 0.50), ("s6", 2, 0.70, 0.65), ("s7", 7, 0.20, 0.30)]
B_UF1 = {"s1": 0.62, "s2": 0.58, "s3": 0.51, "s4": 0.93, "s5": 0.70, "s6": 0.69, "s7": 0.44}
B_UAR = {"s1": 0.50, "s2": 0.60, "s3": 0.36, "s4": 0.80, "s5": 0.61, "s6": 0.75, "s7": 0.41}


def test_wilcoxon_equals_scipy_matched_by_subject(tmp_path: Path, capsys: pytest.CaptureFixture):
    a = write_per_fold(tmp_path / "a.csv", A_ROWS)
    # B in another row order: pairs are matched by subject, not by row
    b = write_per_fold(tmp_path / "b.csv", [(s, n, B_UF1[s], B_UAR[s]) for s, n, _, _ in reversed(A_ROWS)])
    got = report.paired_wilcoxon(report.read_per_fold(a), report.read_per_fold(b))
    assert got["n"] == 7 and got["subjects"] == [r[0] for r in A_ROWS]
    for metric, b_values, col in (("uf1", B_UF1, 2), ("uar", B_UAR, 3)):
        x = np.array([r[col] for r in A_ROWS])
        y = np.array([b_values[r[0]] for r in A_ROWS])
        expected = wilcoxon(y, x)
        assert got[metric]["statistic"] == pytest.approx(float(expected.statistic))
        assert got[metric]["pvalue"] == pytest.approx(float(expected.pvalue))
        assert got[metric]["mean_diff"] == pytest.approx(float(np.mean(y - x)))
        assert got[metric]["b_better"] + got[metric]["ties"] + got[metric]["a_better"] == 7
    assert got["uar"]["ties"] == 1  # s4: zero difference, dropped by zero_method="wilcox"

    report.main(["wilcoxon", str(a), str(b), "--json", str(tmp_path / "w.json")])
    out = capsys.readouterr().out
    assert "n = 7 folds" in out and f"p = {got['uf1']['pvalue']:.4g}" in out
    written = json.loads((tmp_path / "w.json").read_text())
    assert written["uf1"]["pvalue"] == pytest.approx(got["uf1"]["pvalue"])


def test_wilcoxon_refuses_different_subjects_or_sizes(tmp_path: Path):
    a = report.read_per_fold(write_per_fold(tmp_path / "a.csv", A_ROWS))
    other = report.read_per_fold(write_per_fold(tmp_path / "b.csv", [("s9", *A_ROWS[0][1:]), *A_ROWS[1:]]))
    with pytest.raises(PipelineError, match=r"different subjects \(only in A: \['s1'\], only in B: \['s9'\]"):
        report.paired_wilcoxon(a, other)
    sizes = report.read_per_fold(write_per_fold(tmp_path / "c.csv", [("s1", 6, 0.5, 0.4), *A_ROWS[1:]]))
    with pytest.raises(PipelineError, match="different numbers of samples"):
        report.paired_wilcoxon(a, sizes)
    (tmp_path / "bad.csv").write_text("subject,uf1\ns1,0.5\n")
    with pytest.raises(PipelineError, match="lacks column"):
        report.read_per_fold(tmp_path / "bad.csv")


# ---- the train stage's outputs and the t-SNE command ----------------------------------------------

@pytest.fixture(scope="module")
def report_project(tiny_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny project with `dvc repro` run through training and the t-SNE report."""
    project = tmp_path_factory.mktemp("report") / "project"
    shutil.copytree(tiny_project, project, symlinks=True)
    result = run(["dvc", "repro"], project)
    assert "Running stage 'tsne'" in result.stdout, result.stdout
    return project


def test_per_fold_csv_matches_the_predictions(report_project: Path):
    project = report_project
    with open(project / "metrics/predictions.csv") as f:
        predictions = list(csv.DictReader(f))
    with open(project / "metrics/per_fold.csv") as f:
        per_fold = list(csv.DictReader(f))
    subjects = sorted({r["subject"] for r in predictions})
    assert [r["subject"] for r in per_fold] == subjects  # one row per subject, fold (sorted) order
    _, attrs = read_h5(project / "data/processed/synthetic.h5", [])
    index = {c: i for i, c in enumerate(json.loads(attrs["classes"]))}
    for row in per_fold:
        mine = [r for r in predictions if r["subject"] == row["subject"]]
        t = [index[r["true"]] for r in mine]
        p = [index[r["pred"]] for r in mine]
        uf1, uar = metrics.fold_scores(t, p)
        assert int(row["n"]) == len(mine)
        assert float(row["uf1"]) == pytest.approx(uf1, abs=1e-6)
        assert float(row["uar"]) == pytest.approx(uar, abs=1e-6)
        assert float(row["accuracy"]) == pytest.approx(np.mean(np.array(t) == np.array(p)), abs=1e-6)
    loso = json.loads((project / "metrics/loso.json").read_text())
    mean_uf1 = np.mean([float(r["uf1"]) for r in per_fold])
    assert loso["per_fold_mean"]["uf1"] == pytest.approx(mean_uf1, abs=1e-5)

    # the file is a valid input of the Wilcoxon command (against itself: no differences, p = 1)
    same = report.paired_wilcoxon(report.read_per_fold(project / "metrics/per_fold.csv"),
                                  report.read_per_fold(project / "metrics/per_fold.csv"))
    assert same["n"] == len(subjects) and same["uf1"]["mean_diff"] == 0.0


def test_seed_spread_scores_each_run_and_the_mean_probabilities(report_project: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture):
    """`report seeds` on the train stage's predictions.csv and a second run made from it (rows in
    another order, probabilities changed): each run scored by its own `pred`, the ensemble by the
    argmax of the mean probabilities; a file of other samples is refused."""
    first = report_project / "metrics/predictions.csv"
    with open(first) as f:
        rows = list(csv.DictReader(f))
    classes = [c[2:] for c in rows[0] if c.startswith("p_")]
    rng = np.random.default_rng(0)
    second = []
    for row in reversed(rows):
        p = rng.dirichlet(np.ones(len(classes)))
        probs = {f"p_{c}": f"{v:.6f}" for c, v in zip(classes, p)}
        second.append({**row, "pred": classes[int(p.argmax())], **probs})
    path = tmp_path / "second.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(second)

    got = report.seed_spread([first, path])
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["subject"], rows[i]["sample"]))
    y = [classes.index(rows[i]["true"]) for i in order]
    keys = [(rows[i]["subject"], rows[i]["sample"]) for i in order]
    by_key = [{(r["subject"], r["sample"]): r for r in table} for table in (rows, second)]
    scores = [metrics.pooled_scores(y, [classes.index(table[k]["pred"]) for k in keys], classes)["uf1"]
              for table in by_key]
    assert [r["uf1"] for r in got["runs"]] == pytest.approx(scores)
    assert got["uf1"]["mean"] == pytest.approx(np.mean(scores))
    assert got["uf1"]["sd"] == pytest.approx(np.std(scores, ddof=1))
    mean_p = [[(float(by_key[0][k][f"p_{c}"]) + float(by_key[1][k][f"p_{c}"])) / 2 for c in classes]
              for k in keys]
    expected = metrics.pooled_scores(y, np.argmax(mean_p, axis=1), classes)
    assert got["ensemble"]["uf1"] == pytest.approx(expected["uf1"])
    assert got["ensemble"]["uar"] == pytest.approx(expected["uar"])

    report.main(["seeds", str(first), str(path), "--json", str(tmp_path / "s.json")])
    assert f"UF1 {expected['uf1']:.4f}" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["n_runs"] == 2
    short = tmp_path / "short.csv"
    short.write_text("".join(open(first).readlines()[:-1]))
    with pytest.raises(PipelineError, match="other samples"):
        report.seed_spread([first, short])


def test_features_are_aligned_with_the_predictions(report_project: Path):
    project = report_project
    arrays, attrs = read_h5(project / "data/features.h5")
    with open(project / "metrics/predictions.csv") as f:
        predictions = list(csv.DictReader(f))
    classes = json.loads(attrs["classes"])
    features = arrays["features"]
    assert features.dtype == np.float32 and features.shape == (len(predictions), model_dim(project))
    assert np.isfinite(features).all() and features.std(axis=0).max() > 0
    assert list(arrays["sample"]) == [r["sample"] for r in predictions]
    assert list(arrays["subject"]) == [r["subject"] for r in predictions]
    assert [classes[i] for i in arrays["label"]] == [r["true"] for r in predictions]
    assert [classes[i] for i in arrays["pred"]] == [r["pred"] for r in predictions]
    assert json.loads(attrs["model"])["dim"] == features.shape[1]


def model_dim(project: Path) -> int:
    return int(yaml.safe_load((project / "params.yaml").read_text())["model"]["dim"])


def test_tsne_stage_writes_png_and_json(report_project: Path):
    project = report_project
    assert (project / "metrics/tsne.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((project / "metrics/tsne.json").read_text())
    assert {"ara", "aer", "feature_ara", "feature_aer", "ara_per_class", "n_samples", "perplexity",
            "seed"} <= set(data)
    assert data["n_samples"] == len(read_h5(project / "data/features.h5", ["label"])[0]["label"])
    assert 0 < data["ara"] and 0 < data["aer"]
    # on F_ME itself, recomputed here: rows at unit length, ARa = mean over classes of the mean distance
    # to the class centre, AEr = mean distance between class centres
    features, _ = read_h5(project / "data/features.h5", ["features", "label"])
    rows = features["features"] / np.linalg.norm(features["features"], axis=1, keepdims=True)
    groups = [rows[features["label"] == c] for c in np.unique(features["label"])]
    centres = [group.mean(axis=0) for group in groups]
    ara = np.mean([np.linalg.norm(group - centre, axis=1).mean() for group, centre in zip(groups, centres)])
    aer = np.mean([np.linalg.norm(centres[a] - centres[b]) for a in range(len(groups))
                   for b in range(a + 1, len(groups))])
    assert data["feature_ara"] == pytest.approx(ara, abs=2e-6)
    assert data["feature_aer"] == pytest.approx(aer, abs=2e-6)
    # the one-model view: every sample through the final model (stage fit), same keys, same samples
    one = data["one_model"]
    assert set(one) == set(data) - {"one_model"} and one["n_samples"] == data["n_samples"]
    assert 0 < one["subject_ara"] and 0 < data["subject_ara"] and one["aer"] > 0
    assert read_h5(project / "data/fit_features.h5", [])[1]["view"].startswith("the final model")
    shown = run(["dvc", "metrics", "show", "--json"], project).stdout
    assert "metrics/tsne.json" in shown and "aer" in shown

    # the command by hand: another path, same seed -> the same numbers
    out = project / "reports" / "again.png"
    result = run(["python", "-m", "stages.tsne", "--features", "data/features.h5",
                  "--one-model", "data/fit_features.h5", "--out", str(out)], project)
    assert "ARa" in result.stdout and out.read_bytes()[:4] == b"\x89PNG"
    assert json.loads(out.with_suffix(".json").read_text()) == data
    assert ran_nothing(run(["dvc", "repro"], project).stdout)


def ran_nothing(stdout: str) -> bool:
    return "Running stage" not in stdout
