"""LOSO training stage: MEGC2019 metrics, subject-disjoint splits, determinism, and the DVC stage."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import run
from sklearn.metrics import accuracy_score, f1_score, recall_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from mer import metrics
from mer.common import PipelineError, load_params, read_h5, stage_paths
from model import fold_batch, loso, training

CLASSES = ["negative", "positive", "surprise", "other"]



# ---- metrics -------------------------------------------------------------------------------------

def hand_made() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4 classes; `other` (3) is never predicted, `surprise` (2) never true but predicted once."""
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 3, 3, 0, 1, 1])
    y_pred = np.array([0, 0, 1, 2, 1, 1, 0, 0, 1, 0, 1, 0])
    folds = np.array(["a", "a", "a", "a", "a", "b", "b", "b", "b", "c", "c", "c"])
    return y_true, y_pred, folds


def test_pooled_scores_equal_sklearn_macro_over_all_classes():
    y_true, y_pred, _ = hand_made()
    labels = list(range(len(CLASSES)))
    got = metrics.pooled_scores(y_true, y_pred, CLASSES)
    uf1 = f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    uar = recall_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    assert got["uf1"] == pytest.approx(uf1, abs=1e-12)
    assert got["uar"] == pytest.approx(uar, abs=1e-12)
    assert got["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    f1s = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    recalls = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    for c, name in enumerate(CLASSES):
        assert got["per_class"][name]["f1"] == pytest.approx(f1s[c])
        assert got["per_class"][name]["recall"] == pytest.approx(recalls[c])
        assert got["per_class"][name]["support"] == int((y_true == c).sum())
    assert got["per_class"]["other"]["f1"] == 0.0  # never predicted: counts as 0, not skipped
    assert got["uf1"] < f1_score(y_true, y_pred, labels=[0, 1], average="macro")
    np.testing.assert_array_equal(metrics.confusion_matrix(y_true, y_pred, 4),
                                  sk_confusion_matrix(y_true, y_pred, labels=labels))


def test_per_fold_mean_is_not_the_pooled_score():
    y_true, y_pred, folds = hand_made()
    pooled = metrics.pooled_scores(y_true, y_pred, CLASSES)
    mean = metrics.per_fold_mean(y_true, y_pred, folds)
    expected = {"uf1": [], "uar": []}
    for f in np.unique(folds):
        t, p = y_true[folds == f], y_pred[folds == f]
        expected["uf1"].append(f1_score(t, p, average="macro", zero_division=0))
        expected["uar"].append(recall_score(t, p, average="macro", zero_division=0))
    assert mean["uf1"] == pytest.approx(np.mean(expected["uf1"]))
    assert mean["uar"] == pytest.approx(np.mean(expected["uar"]))
    assert abs(mean["uf1"] - pooled["uf1"]) > 0.01 and abs(mean["uar"] - pooled["uar"]) > 0.01


def test_round_floats_is_stable():
    data = {"a": np.float32(1 / 3), "b": [-0.0000001, np.int64(3)], "c": {"d": 2.5}}
    assert json.dumps(metrics.round_floats(data)) == '{"a": 0.333333, "b": [0.0, 3], "c": {"d": 2.5}}'


# ---- splits and determinism ----------------------------------------------------------------------

def test_loso_folds_never_train_on_the_test_subject(processed_h5: Path):
    arrays, _ = read_h5(processed_h5, ["subject"])
    subjects = arrays["subject"]
    folds = training.loso_splits(subjects, seed=0)
    assert len(folds) == len(set(subjects))
    tested = np.concatenate([f.test for f in folds])
    assert sorted(tested) == list(range(len(subjects)))  # every sample tested exactly once
    for fold in folds:
        assert set(subjects[fold.test]) == {fold.subject}
        assert fold.subject not in set(subjects[fold.train])
        assert len(fold.train) + len(fold.test) == len(subjects)
    assert len({f.seed for f in folds}) == len(folds)


def test_a_single_subject_is_refused():
    with pytest.raises(PipelineError, match="at least 2 subjects"):
        training.loso_splits(np.array(["s1", "s1"]))


def test_bad_train_params_are_one_line_errors():
    with pytest.raises(PipelineError, match="unknown train key"):
        training.TrainConfig.from_params({"epoch": 3})
    with pytest.raises(PipelineError, match="train.batch_size"):
        training.TrainConfig.from_params({"batch_size": 0})
    for key, value in (("fold_batch", -1), ("fold_batch", 1.5), ("amp", "fp16"), ("channels_last", "no"),
                       ("deterministic", "yes"), ("deterministic", 1)):
        with pytest.raises(PipelineError, match=f"train.{key} must be"):
            training.TrainConfig.from_params({key: value})
    with pytest.raises(PipelineError, match="fold_batch must be 1 with model.global_fusion: lstm"):
        training.configure({"train": {"fold_batch": 0, "device": "cpu"}, "model": {"global_fusion": "lstm"}})
    with pytest.raises(PipelineError, match="flow_jitter with frozen pretrained stems"):
        training.configure({"train": {"flow_jitter": 0.2, "device": "cpu"},
                            "model": {"pretrained": "imagenet", "freeze_stems": True}})
    training.configure({"train": {"flow_jitter": 0.2, "device": "cpu"}, "model": {"freeze_stems": True}})


def test_batches_cover_the_fold_once_without_singletons():
    rng = np.random.default_rng(0)
    batches = training.epoch_batches(np.arange(65), 64, rng)
    assert [len(b) for b in batches] == [33, 32]
    assert sorted(np.concatenate(batches)) == list(range(65))


def tiny_state(subjects: np.ndarray, frozen: bool, **train_params) -> training.FoldData:
    """FoldData for run_folds on random data: cached stem maps (frozen; of each sample and of its
    mirror image) or raw inputs through the whole model (trainable), tiny head (d 16, blocks 2 x 2)."""
    from model import ModelConfig

    g = torch.Generator().manual_seed(0)
    n = len(subjects)
    cfg = training.TrainConfig(**{"device": "cpu", "epochs": 1, "batch_size": 4, "lr_step": 1,
                                  **train_params})
    state = dict(train=cfg, model=ModelConfig(dim=16, block=2, freeze_stems=frozen),
                 device=torch.device("cpu"), labels=np.arange(n) % 3, num_classes=3, cached=frozen,
                 features_device=torch.device("cpu"),
                 stem_state={}, n=n, width=224, landmarks=torch.rand(2 * n, 51, 4, generator=g) * 224)
    if frozen:
        state.update(af=torch.randn(2 * n, 256, 56, 56, generator=g),
                     mf=torch.randn(2 * n, 256, 56, 56, generator=g))
    else:
        rng = np.random.default_rng(0)
        state.update(apex=torch.from_numpy(rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)),
                     flow=torch.from_numpy(rng.normal(0, 1, (n, 224, 224, 2)).astype(np.float32)),
                     landmarks=state["landmarks"][:n])
    return training.FoldData(**state)


def run_tiny(data: training.FoldData, folds: list, workers: int = 1) -> list:
    return loso.run_folds(data, folds, workers)


@pytest.mark.parametrize("frozen, fold_batch", [(True, 1), (False, 1), (True, 2)])
def test_results_do_not_depend_on_the_number_of_workers(frozen: bool, fold_batch: int):
    """3 subjects, 1 epoch, cached stem maps (frozen) or raw inputs through the whole model (trainable):
    1 worker and 2 workers give the same bytes, folds alone or in groups of 2 (each group in one
    single-thread process)."""
    subjects = np.array(["s1", "s2", "s3"] * 3)
    state = tiny_state(subjects, frozen, fold_batch=fold_batch)
    folds = training.loso_splits(subjects, seed=3)
    outs = [run_tiny(state, folds, workers) for workers in (1, 2)]
    for a, b in zip(*outs):
        assert a.probs.tobytes() == b.probs.tobytes() and a.losses == b.losses


@pytest.mark.parametrize("frozen", [True, False])
def test_fold_batched_training_is_each_fold_trained_alone(frozen: bool, monkeypatch):
    """All folds trained as one stacked model give each fold's predictions, features and losses of
    the fold trained alone: its own initialisation, batches (folds of 4 / 5 training samples: 2 or 3
    batches of 1-2, so padding and folds that wait), mirror / flow-jitter / landmark-jitter draws,
    class weights, Adam state, input scales, the GCN's displacement units and (trainable stems)
    batch-norm statistics. The transformer's dropout is off: it is the one draw made for the whole
    group at once."""
    monkeypatch.setattr("model.gcmif.DROPOUT", 0.0)
    subjects = np.array(["s1", "s2", "s3", "s1", "s2", "s3", "s1"])
    params = dict(epochs=2 if frozen else 1, batch_size=2, mirror=True, flow_jitter=0.1, balance_inputs=True,
                  balance_geometry=True)
    folds = training.loso_splits(subjects, seed=3)
    alone = run_tiny(tiny_state(subjects, frozen, fold_batch=1, **params), folds)
    together = run_tiny(tiny_state(subjects, frozen, fold_batch=0, **params), folds)
    for a, b in zip(alone, together):
        assert a.index == b.index and a.lrs == b.lrs
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-4)
        np.testing.assert_allclose(a.features, b.features, atol=1e-3)
        np.testing.assert_allclose(a.losses, b.losses, atol=1e-5)


def test_fold_batched_batches_hold_only_each_folds_training_samples(monkeypatch):
    """The rows of every fold-batched step (padding included) are the fold's training samples, never
    its test subject's; every training sample is used once per epoch with weight 1 / its batch size."""
    subjects = np.array(["s1", "s2", "s3", "s4"] * 2 + ["s1", "s2", "s1"])
    folds = training.loso_splits(subjects, seed=0)
    steps = []
    step_batches = fold_batch.step_batches

    def recorded(*args):
        out = step_batches(*args)
        steps.append(out[:2])
        return out

    monkeypatch.setattr(fold_batch, "step_batches", recorded)
    run_tiny(tiny_state(subjects, True, fold_batch=0, batch_size=3, epochs=2), folds)
    assert len(steps) == 2 * 3  # the longest fold: 9 training samples in 3 batches, per epoch
    for k, fold in enumerate(folds):
        rows = np.stack([r[k] for r, _ in steps])
        weights = np.stack([w[k] for _, w in steps])
        assert fold.subject not in set(subjects[rows.ravel()]) and set(rows.ravel()) <= set(fold.train)
        used = rows[weights > 0]
        assert sorted(used) == sorted(np.tile(fold.train, 2))  # each sample once per epoch
        assert np.allclose(weights.sum(axis=1)[weights.sum(axis=1) > 0], 1.0)
    bad = training.Fold(0, "s1", np.arange(4), np.array([3]), 0)
    with pytest.raises(RuntimeError, match="test subject s1 is in its training samples"):
        loso.held_out(bad)


def test_masked_adamw_is_torch_adamw_per_fold():
    """Two folds stacked, steps where only some are active: each fold's parameters follow
    torch.optim.AdamW stepped only when that fold is active (weight decay, bias correction with the
    fold's own step count), and an inactive fold keeps its parameters and moments."""
    torch.manual_seed(0)
    alone = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)]
    stacked = torch.nn.Parameter(torch.stack([p.detach().clone() for p in alone]))
    optimisers = [torch.optim.AdamW([p], lr=0.01, weight_decay=0.1) for p in alone]
    masked = fold_batch.MaskedAdamW([stacked], 2, lr=0.01, weight_decay=0.1)
    for active in ([True, True], [True, False], [False, True], [True, True], [False, True]):
        grads = torch.randn(2, 5, 3)
        for k in range(2):
            if active[k]:
                alone[k].grad = grads[k].clone()
                optimisers[k].step()
        stacked.grad = grads * torch.tensor(active, dtype=torch.float32)[:, None, None]
        masked.step(np.array(active))
        for k in range(2):
            torch.testing.assert_close(stacked[k].detach(), alone[k].detach(), rtol=0, atol=1e-6)
    assert masked.steps.tolist() == [3, 4]


@pytest.mark.parametrize("mirror", [False, True])
def test_fold_model_runs_end_to_end_like_the_cached_forward(mirror: bool):
    """A fold model holds the stems that made the cached AF / MF: its end-to-end forward on the
    HDF5 arrays equals the cached-feature forward that scored the fold."""
    from model import ModelConfig, prepare_batch
    from model.gcn import DISPLACEMENT_SCALE_PX, displacements

    rng = np.random.default_rng(0)
    n = 6
    arrays = {"apex": rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8),
              "flow": rng.normal(0, 1, (n, 224, 224, 2)).astype(np.float32),
              "landmarks": rng.uniform(20, 200, (n, 51, 4)).astype(np.float32),
              "label": np.array([0, 1, 2, 0, 1, 2])}
    cfg = training.TrainConfig(device="cpu", epochs=1, batch_size=4, lr_step=1, mirror=mirror,
                               flow_jitter=0.1, balance_inputs=mirror, balance_geometry=mirror)
    model_cfg = ModelConfig(dim=16, block=2, freeze_stems=True, dropout=0.1, mirror_test=mirror)
    data = training.FoldData.build(cfg, model_cfg, torch.device("cpu"), arrays, 3)
    assert len(data.af) == (2 * n if mirror else n)
    net, losses, _ = training.fit_net(data, np.arange(4), seed=7)
    probs, _ = training.predict(data, net, np.arange(n))
    assert np.isfinite(losses).all()
    scales = [float(net.align[m].input_scale) for m in ("appearance", "motion")]
    assert (scales[0] != 1.0 and scales[1] != 1.0) if mirror else scales == [1.0, 1.0]
    # the GCN's displacement unit: the training samples' RMS displacement of the head's landmarks
    train_disp = displacements(data.landmarks[:4])  # the flow-tracked points, as the head gets them
    expected = 1 / float(train_disp.double().pow(2).mean().sqrt()) if mirror else 1 / DISPLACEMENT_SCALE_PX
    assert float(net.gcn.displacement_scale) == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        logits = net(*prepare_batch(arrays["apex"], arrays["flow"], arrays["landmarks"], "cpu"))
    np.testing.assert_allclose(torch.softmax(logits.double(), -1).numpy(), probs, atol=1e-5)


def test_composite_gets_per_dataset_scores_and_panels(tmp_path, monkeypatch):
    """Subjects of two datasets (as megc2019 prefixes them): loso.json has `per_dataset`, pooled
    per dataset, and the confusion figure a panel per dataset."""
    from PIL import Image

    from mer.common import write_h5

    rng = np.random.default_rng(1)
    subjects = np.array(["casme2_sub01", "casme2_sub02", "smic_s1", "smic_s2"] * 2)
    n = len(subjects)
    write_h5(tmp_path / "mix.h5", {
        "apex": rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8),
        "flow": rng.normal(0, 1, (n, 224, 224, 2)).astype(np.float32),
        "landmarks": rng.uniform(20, 200, (n, 51, 4)).astype(np.float32),
        "label": np.array([0, 1, 2, 0, 1, 2, 0, 1]), "subject": subjects,
        "sample": np.array([f"clip{i}" for i in range(n)])}, {"classes": ["negative", "positive", "surprise"],
                                                               "dataset": "megc2019"})
    monkeypatch.chdir(tmp_path)
    params = {"workers": 1, "model": {"dim": 16, "block": 2},
              "train": {"device": "cpu", "epochs": 1, "batch_size": 4, "lr_step": 1}}
    files = {"processed": "mix.h5", "loso": "metrics/loso.json", "timing": "metrics/timing.json",
             "predictions": "metrics/predictions.csv", "per_fold": "metrics/per_fold.csv",
             "features": "metrics/features.h5", "loss": "metrics/train_loss.csv",
             "confusion": "metrics/confusion.png"}
    out = stage_paths("train", list(files), [f"--{name.replace('_', '-')}={tmp_path / file}"
                                                   for name, file in files.items()])
    scores = loso.evaluate(params, out)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    pred = np.array([r["pred"] for r in csv.DictReader(open(out.predictions))])
    classes = ["negative", "positive", "surprise"]
    for member in ("casme2", "smic"):
        rows = np.char.startswith(subjects, member)
        expected = metrics.pooled_scores(y[rows], [classes.index(p) for p in pred[rows]], classes)
        assert scores["per_dataset"][member]["n"] == 4
        assert scores["per_dataset"][member]["uf1"] == pytest.approx(expected["uf1"])
    width = Image.open(tmp_path / "metrics/confusion.png").size[0]
    assert width > 2.5 * 100 * (1.2 * 3 + 2.5)  # three panels: composite, casme2, smic


# ---- the DVC stage, end to end --------------------------------------------------------------------

def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.fixture(scope="module")
def train_project(tiny_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny pipeline project (tiny params) where preprocessing and the magnifier ran."""
    project = tmp_path_factory.mktemp("train") / "project"
    shutil.copytree(tiny_project, project, symlinks=True)
    run(["dvc", "repro", "magnification/dvc.yaml"], project)  # the opt-in pipeline, tiny params
    return project


def test_train_stage_end_to_end(train_project: Path):
    project = train_project
    first = run(["dvc", "repro"], project)
    expected = ["baselines", "fit", "preprocessing_report", "train", "tsne"]
    assert sorted(ran_stages(first.stdout)) == expected, first.stdout
    scores = json.loads((project / "metrics/loso.json").read_text())
    assert {"uf1", "uar", "accuracy", "per_class", "per_fold_mean", "n_samples", "n_subjects", "n_folds",
            "n_params"} <= set(scores)
    arrays, attrs = read_h5(project / "data/processed/synthetic.h5", ["label", "subject", "sample"])
    classes = json.loads(attrs["classes"])
    assert scores["n_samples"] == len(arrays["label"])
    assert scores["n_folds"] == scores["n_subjects"] == len(set(arrays["subject"]))
    assert set(scores["per_class"]) == set(classes) and set(scores["per_fold_mean"]) == {"uf1", "uar"}
    assert scores["n_params"] > 0

    # pooled UF1 / UAR recomputed independently from the predictions CSV
    with open(project / "metrics/predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["subject", "sample", "true", "pred", *(f"p_{c}" for c in classes)]
    assert [r["sample"] for r in rows] == list(arrays["sample"])
    assert [r["true"] for r in rows] == [classes[i] for i in arrays["label"]]
    for r in rows:
        probs = [float(r[f"p_{c}"]) for c in classes]
        assert sum(probs) == pytest.approx(1, abs=1e-5) and r["pred"] == classes[int(np.argmax(probs))]
    y_true, y_pred = [r["true"] for r in rows], [r["pred"] for r in rows]
    assert scores["uf1"] == pytest.approx(f1_score(y_true, y_pred, labels=classes, average="macro",
                                                 zero_division=0), abs=1e-6)
    assert scores["uar"] == pytest.approx(recall_score(y_true, y_pred, labels=classes, average="macro",
                                                     zero_division=0), abs=1e-6)
    with open(project / "metrics/train_loss.csv") as f:
        curve = list(csv.DictReader(f))
    train_params = yaml.safe_load((project / "params.yaml").read_text())["train"]
    assert [int(r["epoch"]) for r in curve] == [1, 2]  # lr_step 1: the second epoch runs at lr x lr_gamma
    assert float(curve[1]["lr"]) == pytest.approx(train_params["lr"] * train_params["lr_gamma"])
    timing = json.loads((project / "metrics/timing.json").read_text())
    assert timing["train_s"] > 0 and "wall" not in (project / "metrics/loso.json").read_text()
    assert (project / "metrics/confusion.png").read_bytes()[:4] == b"\x89PNG"

    # same params + seed: byte-identical metrics and predictions
    before = {name: (project / "metrics" / name).read_bytes() for name in ("loso.json", "predictions.csv")}
    again = run(["dvc", "repro", "-f", "-s", "train"], project)
    assert ran_stages(again.stdout) == ["train"]
    for name, data in before.items():
        assert (project / "metrics" / name).read_bytes() == data, name

    # nothing changed: nothing runs; metrics and plots are declared
    assert ran_stages(run(["dvc", "repro"], project).stdout) == []
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    assert "metrics/loso.json" in json.dumps(shown)
    plots = run(["dvc", "plots", "show", "--json"], project)
    assert "confusion" in plots.stdout and "train_loss.csv" in plots.stdout

    # commit, then an experiment changing a training param reruns only `train`
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "train baseline"], project)
    exp = run(["dvc", "exp", "run", "-S", "train.lr=0.01"], project)
    assert sorted(ran_stages(exp.stdout)) == ["fit", "train", "tsne"], exp.stdout
    params_diff = json.loads(run(["dvc", "params", "diff", "--json"], project).stdout)
    lr = params_diff["params.yaml"]["train.lr"]
    assert (lr["old"], lr["new"]) == (train_params["lr"], 0.01)
    metrics_diff = json.loads(run(["dvc", "metrics", "diff", "--all", "--json"], project).stdout)
    assert "uf1" in metrics_diff["metrics/loso.json"]


def test_baselines_stage_scores_linear_probes_on_the_same_folds(train_project: Path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from mer.probes import cell_features, drift_free, landmark_features, probe_predictions

    run(["dvc", "repro", "baselines"], train_project)
    scores = json.loads((train_project / "metrics/baselines.json").read_text())
    assert set(scores) == {"flow_cells", "flow_landmarks"}
    arrays, _ = read_h5(train_project / "data/processed/synthetic.h5", ["flow", "label", "subject"])
    labels, subjects = arrays["label"].astype(int), np.asarray(arrays["subject"])
    for probe in scores.values():
        assert sum(c["support"] for c in probe["per_class"].values()) == len(labels)
    # flow_cells recomputed here: each subject predicted by a probe fitted on the other subjects only
    section = yaml.safe_load((train_project / "params.yaml").read_text())["baselines"]
    x = cell_features(drift_free(arrays["flow"]), section["cells"])
    predicted = np.empty_like(labels)
    for subject in np.unique(subjects):
        test = subjects == subject
        regression = LogisticRegression(C=section["C"], class_weight="balanced", max_iter=5000)
        probe = make_pipeline(StandardScaler(), regression).fit(x[~test], labels[~test])
        predicted[test] = probe.predict(x[test])
    uf1 = f1_score(labels, predicted, labels=range(len(scores["flow_cells"]["per_class"])), average="macro",
                   zero_division=0)
    assert scores["flow_cells"]["uf1"] == pytest.approx(uf1, abs=1e-6)
    # no leak: a held-out subject's own labels do not change its predictions
    held_out = subjects == subjects[0]
    relabelled = labels.copy()
    relabelled[held_out] = (relabelled[held_out] + 1) % 3
    before = probe_predictions(x, labels, subjects, section["C"])[held_out]
    assert np.array_equal(probe_predictions(x, relabelled, subjects, section["C"])[held_out], before)
    # the features: cell means and landmark-window means of a known flow
    flow = np.zeros((1, 224, 224, 2), np.float32)
    flow[0, :112, :, 0] = 1.0  # top half moves right
    cells = cell_features(flow, 8).reshape(8, 8, 2)
    assert (cells[:4, :, 0] == 1).all() and (cells[4:] == 0).all()
    landmarks = np.zeros((1, 51, 4), np.float32)
    landmarks[0, :, 2:] = [[50, 40]] * 25 + [[50, 180]] * 26  # apex x, y
    at = landmark_features(flow, landmarks, 16).reshape(51, 2)
    assert (at[:25, 0] == 1).all() and (at[25:] == 0).all()


def test_fit_stage_writes_a_final_model_that_predicts_like_its_card_says(train_project: Path):
    from model import prepare_batch
    from model.checkpoint import load_checkpoint

    run(["dvc", "repro", "fit"], train_project)
    net, info = load_checkpoint(train_project / "models/mihf_tr.pt")
    card = json.loads((train_project / "models/mihf_tr.json").read_text())
    arrays, attrs = read_h5(train_project / "data/processed/synthetic.h5",
                            ["apex", "flow", "landmarks", "label", "subject"])
    assert info["classes"] == card["classes"] == json.loads(attrs["classes"])
    assert card["n_samples"] == len(arrays["label"]) and card["n_subjects"] == len(set(arrays["subject"]))
    scores = json.loads((train_project / "metrics/loso.json").read_text())
    assert card["loso"]["uf1"] == scores["uf1"] and len(card["params_sha256"]) == 64
    assert info["params"]["magnify"] == load_params()["magnify"] and "frames" in info["params"]
    with torch.no_grad():
        probs = torch.softmax(net(*prepare_batch(arrays["apex"], arrays["flow"], arrays["landmarks"],
                                                 "cpu")), -1)
    assert probs.shape == (len(arrays["label"]), len(info["classes"])) and torch.isfinite(probs).all()
    # its in-sample F_ME (the one-model t-SNE view): every sample, in order, predicted as the model does
    fitted, fit_attrs = read_h5(train_project / "data/fit_features.h5")
    assert list(fitted["subject"]) == list(arrays["subject"]) and np.isfinite(fitted["features"]).all()
    top2 = torch.topk(probs, 2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1] > 1e-4).numpy()
    assert clear.any() and (fitted["pred"][clear] == probs.argmax(-1).numpy()[clear]).all()
    assert json.loads(fit_attrs["classes"]) == info["classes"]
    # a predict-only change (no params of fit) reruns nothing; retraining gives the same bytes
    before = (train_project / "models/mihf_tr.pt").read_bytes()
    assert "fit" not in ran_stages(run(["dvc", "repro", "fit"], train_project).stdout)
    run(["dvc", "repro", "-f", "-s", "fit"], train_project)
    assert (train_project / "models/mihf_tr.pt").read_bytes() == before
