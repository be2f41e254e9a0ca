"""Leave-One-Subject-Out with MiHF-Tr: every fold trained and its held-out subject predicted, the
predictions pooled and scored (MEGC2019, mer/metrics.py), the outputs written; and the final model
on all subjects (stage `fit`). Stage `train` calls `evaluate`, stage `fit` calls `fit_final`.

One fold per subject (sklearn `LeaveOneGroupOut` over the `subject` array): a fresh model is
trained on the other subjects for a FIXED number of epochs (`train.epochs`) and the model of the
last epoch predicts the held-out subject. Nothing (epoch, checkpoint, threshold) is ever chosen on
the test subject. How one fold trains: model/training.py; folds trained together
(`train.fold_batch`): model/fold_batch.py.

On CPU folds (or groups of folds) run in `workers` forked processes (top-level `workers`, 0 = all
cores), one thread each (the serial path uses one thread too, so 1 worker and N workers give the
same bytes; one group of folds alone runs on `workers` threads); on CUDA (`train.device: auto` picks
it when available) one after the other, with deterministic algorithms when
`train.deterministic: true` (auto: the fastest ones). Same params + seed on the same machine ->
byte-identical `metrics/loso.json`, `metrics/predictions.csv`, `metrics/per_fold.csv` and
`data/features.h5`.

Outputs (atomic):
- `metrics/loso.json`: `uf1`, `uar` (pooled), `accuracy`, `per_class`, `per_fold_mean`, `n_samples`,
  `n_subjects`, `n_folds`, `n_params`, and for a composite (megc2019) `per_dataset`:
  {dataset: {uf1, uar, n}}; sorted keys, floats rounded to 6 decimals (deterministic).
- `metrics/timing.json`: wall-clock seconds (stems, training, total), samples/s, device, workers,
  fold_batch.
  Not deterministic, hence a file of its own (dvc.yaml: cache: false).
- `metrics/predictions.csv`: `subject`, `sample`, `true`, `pred` (class names), `p_<class>`.
- `metrics/per_fold.csv`: `subject`, `n`, `uf1`, `uar`, `accuracy` of each fold (test subject) alone
  (`mer.metrics.fold_scores`), one row per subject in fold order: the paired samples of the Wilcoxon
  test between two variants (`python -m mer.reports wilcoxon`).
- `data/features.h5` (mer.common.write_h5, deterministic): the out-of-fold fused feature F_ME of
  every sample (`features`, N x d float32: the held-out subject through its fold's final model, eval
  mode, the same forward that gives the probabilities) with `subject`, `sample`, `label`, `pred`
  (class indices), rows in the order of predictions.csv; attrs `classes`, `dataset`, `model` (JSON).
  Input of stage `tsne` (t-SNE, ARa / AEr, paper §4.3).
- `metrics/train_loss.csv`: `epoch`, `loss` (mean over folds of the fold's mean training loss), `lr`.
- `metrics/confusion.png`: the pooled confusion matrix (and one per dataset for a composite).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import queue
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mer.common import (
    PipelineError,
    atomic_path,
    new_figure,
    save_figure,
    single_threaded,
    thread_count,
    worker_count,
    write_h5,
)
from mer.metrics import (
    PER_FOLD_COLUMNS,
    confusion_matrix,
    fold_scores,
    per_dataset_scores,
    per_fold_mean,
    pooled_scores,
    subject_datasets,
    write_json,
)
from mer.processed import load_processed
from model.fold_batch import fit_group
from model.mihf_tr import MiHFTr
from model.training import Fold, FoldData, FoldResult, configure, derive_seed, fit_net, loso_splits, predict

OUTPUTS = ("loso", "timing", "predictions", "per_fold", "features", "loss", "confusion")
CARD_SECTIONS = ("data", "frames", "magnify", "flow", "landmarks", "model", "train")


# ---- the folds ------------------------------------------------------------------------------------

def held_out(fold: Fold) -> Fold:
    """The fold, once checked: none of its test samples (the held-out subject's) is a training sample."""
    if np.intersect1d(fold.train, fold.test).size:
        raise RuntimeError(f"fold {fold.index}: test subject {fold.subject} is in its training samples")
    return fold


def fold_result(data: FoldData, fold: Fold, net: MiHFTr, losses: list[float], lrs: list[float]) -> FoldResult:
    probs, features = predict(data, net, fold.test, data.generator(fold.seed, 2))
    return FoldResult(fold.index, probs, losses, lrs, features)


def train_group(data: FoldData, folds: list[Fold],
                tick: Callable[[int], Any] | None = None) -> list[FoldResult]:
    """Each fold of a group trained on its training samples for the fixed number of epochs and its
    test subject predicted: one at a time (`train.fold_batch: 1`), or trained together."""
    if data.train.fold_batch == 1:
        return [fold_result(data, fold, *fit_net(data, held_out(fold).train, fold.seed, tick))
                for fold in folds]
    fitted = fit_group(data, [held_out(fold) for fold in folds], tick)
    return [fold_result(data, fold, *result) for fold, result in zip(folds, fitted)]


def _worker(data: FoldData, groups: list[list[Fold]], todo: Any, done: Any, ticks: Any) -> None:
    """A forked process: `data` is inherited, not copied; trains the groups whose index it is given
    until it gets None, on one thread."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    for g in iter(todo.get, None):
        try:
            done.put((g, train_group(data, groups[g], ticks.put)))
        except BaseException as err:  # noqa: BLE001 - handed to the parent, which raises it
            done.put((g, err))
            return


def run_folds(data: FoldData, folds: list[Fold], workers: int) -> list[FoldResult]:
    """All folds, in groups of `train.fold_batch` (1: each fold alone; 0: one group) trained together.
    On CPU the groups go to forked single-thread worker processes, or, one group or one worker, run
    in this process (a group trained together on `workers` threads, a fold alone on one: same
    arithmetic as in a worker, same bytes); on CUDA one after the other."""
    bar = tqdm(total=len(folds) * data.train.epochs, desc="train (folds x epochs)", unit="epoch",
               file=sys.stderr, dynamic_ncols=True)
    size = data.train.fold_batch or len(folds)
    groups = [folds[start:start + size] for start in range(0, len(folds), size)]
    workers = min(worker_count(workers), len(folds))
    try:
        if data.device.type != "cpu" or min(workers, len(groups)) == 1:
            threads = (thread_count(torch.get_num_threads, torch.set_num_threads, 1 if size == 1 else workers)
                       if data.device.type == "cpu" else contextlib.nullcontext())
            with threads:
                return [result for group in groups for result in train_group(data, group, bar.update)]
        workers = min(workers, len(groups))
        ctx = get_context("fork")  # the workers inherit `data` (inputs, cached features) without copying
        todo, done, ticks = ctx.Queue(), ctx.Queue(), ctx.Queue()
        for g in [*range(len(groups)), *[None] * workers]:
            todo.put(g)
        processes = [ctx.Process(target=_worker, args=(data, groups, todo, done, ticks), daemon=True)
                     for _ in range(workers)]
        for process in processes:
            process.start()
        by_group: dict[int, list[FoldResult]] = {}
        while len(by_group) < len(groups):
            while not ticks.empty():
                bar.update(ticks.get())
            try:
                g, result = done.get(timeout=0.2)
            except queue.Empty:
                if not any(p.is_alive() for p in processes) and done.empty():
                    raise PipelineError("a training worker stopped without a result (out of memory?): "
                                        "set workers: 1 in params.yaml") from None
                continue
            if isinstance(result, BaseException):
                raise result
            by_group[g] = result
        for process in processes:
            process.join()
        while not ticks.empty():  # ticks still in the queue
            bar.update(ticks.get())
        return [result for g in range(len(groups)) for result in by_group[g]]
    finally:
        bar.close()


# ---- the run and its outputs ----------------------------------------------------------------------

def evaluate(params: dict, out: Any) -> dict[str, Any]:
    """Run LOSO on the processed file `out.processed` with these params; write every output to its
    path in `out` (attributes named as OUTPUTS: loso, timing, predictions, per_fold, features, loss,
    confusion); return the metrics."""
    t_start = time.perf_counter()
    cfg, model_cfg, device = configure(params)
    arrays, attrs, classes = load_processed(out.processed)
    name = attrs.get("dataset", Path(out.processed).stem)
    labels, subjects = arrays["label"].astype(np.int64), np.asarray(arrays["subject"])
    folds = loso_splits(subjects, cfg.seed)

    t_stems = time.perf_counter()
    data = FoldData.build(cfg, model_cfg, device, arrays, len(classes))
    t_train = time.perf_counter()
    results = run_folds(data, folds, params.get("workers", 0))
    t_end = time.perf_counter()
    n_params = data.n_params
    del data

    probs = np.zeros((len(labels), len(classes)), dtype=np.float64)
    features = np.zeros((len(labels), results[0].features.shape[1]), dtype=np.float32)
    for fold, result in zip(folds, results):
        probs[fold.test] = result.probs
        features[fold.test] = result.features
    y_pred = probs.argmax(axis=1)
    scores = pooled_scores(labels, y_pred, classes)
    metrics = {
        **scores,
        "per_fold_mean": per_fold_mean(labels, y_pred, subjects),
        "n_samples": int(len(labels)),
        "n_subjects": int(len(np.unique(subjects))),
        "n_folds": len(folds),
        "n_params": int(n_params),
    }
    per_dataset = per_dataset_scores(labels, y_pred, subjects, classes)
    if per_dataset:  # a composite (megc2019): each dataset pooled over its folds, as MEGC2019 reports
        metrics["per_dataset"] = per_dataset
    write_json(out.loso, metrics)
    write_predictions(out.predictions, subjects, np.asarray(arrays["sample"]), labels, probs, classes)
    write_per_fold(out.per_fold, labels, y_pred, folds)
    write_h5(out.features, feature_table(features, subjects, np.asarray(arrays["sample"]), labels, y_pred),
             {"classes": classes, "dataset": str(name), "model": asdict(model_cfg)})
    write_loss_curve(out.loss, results)
    panels = [(confusion_matrix(labels, y_pred, len(classes)),
               f"{name} LOSO, pooled: UF1 {scores['uf1']:.4f}, UAR {scores['uar']:.4f}")]
    datasets = subject_datasets(subjects)
    for member, score in metrics.get("per_dataset", {}).items():
        rows = datasets == member
        panels.append((confusion_matrix(labels[rows], y_pred[rows], len(classes)),
                       f"{member} ({score['n']}): UF1 {score['uf1']:.4f}, UAR {score['uar']:.4f}"))
    plot_confusion(out.confusion, panels, classes)
    trained = sum(len(f.train) for f in folds) * cfg.epochs
    timing = {
        "device": str(device),
        "workers": min(worker_count(params.get("workers", 0)), len(folds)) if device.type == "cpu" else 1,
        "fold_batch": cfg.fold_batch,
        "stems_s": round(t_train - t_stems, 3) if model_cfg.freeze_stems else 0.0,
        "train_s": round(t_end - t_train, 3),
        "total_s": round(time.perf_counter() - t_start, 3),
        "train_samples_per_s": round(trained / max(t_end - t_train, 1e-9), 3),
    }
    write_json(out.timing, timing)
    return metrics


def write_predictions(path: Path, subjects: np.ndarray, samples: np.ndarray, y_true: np.ndarray,
                      probs: np.ndarray, classes: list[str]) -> None:
    y_pred = probs.argmax(axis=1)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["subject", "sample", "true", "pred", *(f"p_{c}" for c in classes)])
        for subject, sample, t, p, row in zip(subjects, samples, y_true, y_pred, probs):
            writer.writerow([subject, sample, classes[t], classes[p], *(f"{v:.6f}" for v in row)])


def write_per_fold(path: Path, y_true: np.ndarray, y_pred: np.ndarray, folds: list[Fold]) -> None:
    """One row per fold: the test subject, its sample count, UF1 / UAR (mer.metrics.fold_scores:
    macro over the classes in that fold) and accuracy, 6 decimals."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(PER_FOLD_COLUMNS)
        for fold in folds:
            t, p = y_true[fold.test], y_pred[fold.test]
            uf1, uar = fold_scores(t, p)
            accuracy = float(np.mean(t == p))
            writer.writerow([fold.subject, len(fold.test), *(f"{v:.6f}" for v in (uf1, uar, accuracy))])


def feature_table(features: np.ndarray, subjects: np.ndarray, samples: np.ndarray, y_true: np.ndarray,
                  y_pred: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays of a features file (`data/features.h5`, `data/fit_features.h5`)."""
    return {"features": features.astype(np.float32), "subject": np.asarray(subjects).astype(str),
            "sample": np.asarray(samples).astype(str), "label": y_true.astype(np.int64),
            "pred": y_pred.astype(np.int64)}


def write_loss_curve(path: Path, results: list[FoldResult]) -> None:
    losses = np.mean([r.losses for r in results], axis=0)
    lrs = results[0].lrs
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["epoch", "loss", "lr"])
        for epoch, (loss, lr) in enumerate(zip(losses, lrs), start=1):
            writer.writerow([epoch, f"{loss:.6f}", f"{lr:.6g}"])


def plot_confusion(path: Path, panels: list[tuple[np.ndarray, str]], classes: list[str]) -> None:
    """One confusion matrix per (matrix, title) panel, side by side (the composite, then each dataset)."""
    side = 1.2 * len(classes) + 2.5
    fig, axes = new_figure(1, len(panels), figsize=(side * len(panels), side - 0.5), squeeze=False)
    for ax, (cm, title) in zip(axes[0], panels):
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=9)
        top = cm.max() if cm.size else 0
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > top / 2 else "black")
    fig.tight_layout()
    save_figure(fig, path)


# ---- the final model (stage `fit`) ----------------------------------------------------------------

def params_hash(params: dict[str, Any]) -> str:
    """sha256 of the params sections that made the model (sorted JSON)."""
    text = json.dumps({s: params.get(s) for s in CARD_SECTIONS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class FinalModel:
    net: MiHFTr
    card: dict[str, Any]  # the model card, without the LOSO metrics
    classes: list[str]
    features: dict[str, np.ndarray]  # feature_table of every training sample through this one model
    features_attrs: dict[str, Any]


def fit_final(params: dict[str, Any], h5_path: Path) -> FinalModel:
    """The final model, trained on ALL subjects with the LOSO recipe (same params, fixed epochs,
    augmentation and shared stems as every fold; the head seeded from (train.seed, 2), a stream no
    fold uses; nothing chosen on any score), with the fused feature F_ME it gives every sample
    (in-sample, eval mode: one feature space for all subjects, the t-SNE's one-model view)."""
    cfg, model_cfg, device = configure(params)
    arrays, attrs, classes = load_processed(h5_path)
    data = FoldData.build(cfg, model_cfg, device, arrays, len(classes))
    everyone, seed = np.arange(len(arrays["label"])), derive_seed(cfg.seed, 2)
    # One thread, as the LOSO folds: the same bytes on any machine.
    with single_threaded(torch.get_num_threads, torch.set_num_threads):
        net, losses, _ = fit_net(data, everyone, seed)
        probs, features = predict(data, net, everyone, data.generator(seed, 2))
    labels = arrays["label"].astype(np.int64)
    dataset = str(attrs.get("dataset", h5_path.stem))
    card = {
        "dataset": dataset,
        "n_samples": int(len(labels)),
        "n_subjects": int(len(np.unique(arrays["subject"]))),
        "class_counts": {c: int((labels == i).sum()) for i, c in enumerate(classes)},
        "classes": classes,
        "epochs": cfg.epochs,
        "final_train_loss": round(float(losses[-1]), 6),
        "params_sha256": params_hash(params),
    }
    table = feature_table(features, arrays["subject"], arrays["sample"], labels, probs.argmax(axis=1))
    features_attrs = {"classes": classes, "dataset": dataset, "model": asdict(model_cfg),
                      "view": "the final model (stage fit), in-sample"}
    return FinalModel(net.cpu(), card, classes, table, features_attrs)
