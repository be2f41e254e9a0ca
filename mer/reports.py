"""Reports of the paper beyond the LOSO scores: t-SNE with ARa / AEr (stage `tsne`, stages/tsne.py) and, from
the command line, `python -m mer.reports {wilcoxon,seeds} ...`.

tsne (paper §4.3, Figure 4): t-SNE of the out-of-fold fused features F_ME written by the train stage
(`data/features.h5`: every sample embedded by the model of the fold that held its subject out),
coloured by true class, with the paper's ARa (average intra-class distance) and AEr (average
inter-class distance). The paper does not define them; here, for points x_i with classes c:

    mu_c = mean of the points of class c
    ARa  = mean over classes of ( mean over i in c of ||x_i - mu_c|| )     (compactness, lower is better)
    AEr  = mean over class pairs a < b of ||mu_a - mu_b||                  (separation, higher is better)

(classes without samples are left out). t-SNE coordinates have no scale of their own, so `ara` /
`aer` are computed on the 2-D embedding centred and scaled to unit RMS radius
(sqrt(mean ||y_i - mean||^2) = 1): comparable between variants, e.g. two or three modalities.
`feature_ara` / `feature_aer` are the same on the d-dim F_ME, each row L2-normalised (no t-SNE:
independent of its perplexity and seed). t-SNE: sklearn, PCA init, seed 0, exact gradient
up to 2000 samples (deterministic), Barnes-Hut above. Writes `--out` (png) and the same path with
`.json`: sorted keys, 6 decimals.

wilcoxon (paper §4.4, ablations): paired Wilcoxon signed-rank test (scipy.stats.wilcoxon,
two-sided) of two variants' per-fold scores (`metrics/per_fold.csv` of two runs), one pair per
test subject, for UF1 and UAR. The two files must hold the same subjects with the same numbers of
samples (the same dataset and splits), otherwise nothing is tested. Zero differences (a subject
scored the same by both) are dropped by the default `--zero-method wilcox`, as in scipy.

seeds (run-to-run spread): the `metrics/predictions.csv` of runs that differ only in `train.seed`
(same dataset and splits): each run's pooled UF1 / UAR, their mean and standard deviation (ddof 1),
and the pooled scores of the runs' mean class probabilities (an ensemble of the runs' fold models).
On ~100 samples one run's UF1 moves by several hundredths with the seed (docs/experiments.md): compare
recipes by the mean over seeds, not by one run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import warnings
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from mer.common import PipelineError, class_names, new_figure, read_h5, run_main, save_figure
from mer.metrics import PER_FOLD_COLUMNS, pooled_scores, write_json

EXACT_TSNE_MAX = 2000


# ---- ARa / AEr ------------------------------------------------------------------------------------

def unit_rms(points: np.ndarray) -> np.ndarray:
    """Points centred and scaled so that the RMS distance to their mean is 1."""
    points = np.asarray(points, dtype=np.float64)
    centred = points - points.mean(axis=0)
    radius = math.sqrt(float(np.mean(np.sum(centred**2, axis=1)))) if len(points) else 0.0
    return centred / radius if radius > 0 else centred


def l2_rows(points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    norms = np.linalg.norm(points, axis=1, keepdims=True)
    return np.divide(points, norms, out=np.zeros_like(points), where=norms > 0)


def class_distances(points: np.ndarray, labels: Sequence[int] | np.ndarray) -> dict[str, Any]:
    """ARa, AEr (module docstring) of points N x k with class labels, as given (no scaling)."""
    points, labels = np.asarray(points, dtype=np.float64), np.asarray(labels)
    if len(points) != len(labels):
        raise ValueError(f"{len(points)} points but {len(labels)} labels")
    present = np.unique(labels)
    if len(present) < 2:
        raise PipelineError(f"ARa / AEr need at least 2 classes, the samples hold {len(present)}")
    centres = {c: points[labels == c].mean(axis=0) for c in present}
    intra = {c: float(np.linalg.norm(points[labels == c] - centres[c], axis=1).mean()) for c in present}
    inter = [float(np.linalg.norm(centres[a] - centres[b])) for a, b in combinations(present, 2)]
    return {"ara": float(np.mean(list(intra.values()))), "aer": float(np.mean(inter)),
            "intra": {c.item() if hasattr(c, "item") else c: d for c, d in intra.items()}}


# ---- t-SNE ----------------------------------------------------------------------------------------

TSNE_PERPLEXITY = 30.0  # scikit-learn's default; clipped below the number of samples
TSNE_SEED = 0


def tsne_embedding(features: np.ndarray) -> tuple[np.ndarray, float]:
    """2-D t-SNE of the rows; (embedding, the perplexity used)."""
    from sklearn.manifold import TSNE

    n = len(features)
    if n < 3:
        raise PipelineError(f"t-SNE needs at least 3 samples, the features file holds {n}")
    perplexity = float(min(TSNE_PERPLEXITY, (n - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=TSNE_SEED, method="exact" if n <= EXACT_TSNE_MAX else "barnes_hut")
    return tsne.fit_transform(np.asarray(features, dtype=np.float64)), perplexity


def tsne_view(features_path: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray, dict[str, Any]]:
    """(ARa / AEr numbers, unit-RMS t-SNE points, labels, the file's attrs) of one features file.
    `subject_ara`: ARa with the subjects as the groups (how tightly each subject's points sit
    together, on the same scale)."""
    arrays, attrs = read_h5(features_path, ["features", "label", "subject"])
    features, labels = arrays["features"], arrays["label"].astype(np.int64)
    classes = class_names(attrs)
    if features.ndim != 2 or len(features) != len(labels):
        raise PipelineError(f"{features_path}: features {features.shape} do not match {len(labels)} labels")
    embedding, used_perplexity = tsne_embedding(features)
    points = unit_rms(embedding)
    on_tsne = class_distances(points, labels)
    on_features = class_distances(l2_rows(features), labels)
    subjects = np.unique(np.asarray(arrays["subject"]).astype(str), return_inverse=True)[1]
    report = {
        "ara": on_tsne["ara"],
        "aer": on_tsne["aer"],
        "feature_ara": on_features["ara"],
        "feature_aer": on_features["aer"],
        "subject_ara": class_distances(points, subjects)["ara"] if subjects.max() > 0 else 0.0,
        "ara_per_class": {classes[c]: d for c, d in on_tsne["intra"].items()},
        "n_samples": int(len(labels)),
        "dim": int(features.shape[1]),
        "perplexity": used_perplexity,
        "seed": TSNE_SEED,
    }
    return report, points, labels, attrs


def tsne_report(features_path: Path, out_png: Path, one_model_path: Path | None = None) -> dict[str, Any]:
    """The out-of-fold view (features_path: each subject through the fold model that held it out,
    each fold model its own feature space) and, with `one_model_path`, the one-model view (every
    sample through the final model, in-sample) under `one_model`; one panel each in `out_png`."""
    report, points, labels, attrs = tsne_view(features_path)
    classes = class_names(attrs)
    model = json.loads(attrs["model"]) if "model" in attrs else {}
    name = (f"{attrs.get('dataset', features_path.stem)}"
            + (f" ({' + '.join(model['modalities'])})" if model.get("modalities") else ""))
    panels = [(points, labels, f"{name}: out-of-fold F_ME (one model per fold)", report)]
    if one_model_path is not None:
        one, one_points, one_labels, _ = tsne_view(one_model_path)
        report["one_model"] = one
        panels.append((one_points, one_labels, f"{name}: one model (stage fit), in-sample F_ME", one))
    fig, axes = new_figure(1, len(panels), figsize=(6 * len(panels), 5.5), squeeze=False)
    for ax, (xy, y, title, numbers) in zip(axes[0], panels):
        plot_tsne(ax, xy, y, classes, f"{title}\nt-SNE: ARa {numbers['ara']:.3f}, AEr {numbers['aer']:.3f}, "
                  f"by subject ARa {numbers['subject_ara']:.3f} (unit RMS radius)")
    fig.tight_layout()
    save_figure(fig, out_png)
    write_json(out_png.with_suffix(".json"), report)
    return report


def plot_tsne(ax: Any, points: np.ndarray, labels: np.ndarray, classes: list[str], title: str) -> None:
    from matplotlib import colormaps

    colours = colormaps["tab10"]
    for c, name in enumerate(classes):
        mask = labels == c
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=14, color=colours(c % 10), label=f"{c} {name}",
                       alpha=0.8, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, loc="best")
    ax.set_title(title, fontsize=9)


# ---- Wilcoxon -------------------------------------------------------------------------------------

def read_per_fold(path: Path) -> dict[str, dict[str, float]]:
    """subject -> {n, uf1, uar, accuracy} of a metrics/per_fold.csv."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path} is missing (per-fold scores: metrics/per_fold.csv of a train run)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in PER_FOLD_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise PipelineError(f"{path} lacks column(s) {missing}: not a per_fold.csv of the train stage")
        table: dict[str, dict[str, float]] = {}
        for row in reader:
            if row["subject"] in table:
                raise PipelineError(f"{path}: subject {row['subject']} appears twice")
            try:
                table[row["subject"]] = {c: float(row[c]) for c in PER_FOLD_COLUMNS[1:]}
            except ValueError as err:
                raise PipelineError(f"{path}, subject {row['subject']}: {err}") from err
    if not table:
        raise PipelineError(f"{path} holds no folds")
    return table


def paired_wilcoxon(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]],
                    metrics: Sequence[str] = ("uf1", "uar"), zero_method: str = "wilcox") -> dict[str, Any]:
    """Two-sided paired Wilcoxon signed-rank test of b vs a per metric, pairs matched by subject."""
    from scipy.stats import wilcoxon

    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise PipelineError(f"the two per-fold tables hold different subjects (only in A: {only_a}, "
                            f"only in B: {only_b}): not the same LOSO splits, no paired test")
    subjects = sorted(a)
    sizes = [s for s in subjects if a[s]["n"] != b[s]["n"]]
    if sizes:
        raise PipelineError(f"subject(s) {sizes} have different numbers of samples in the two tables: "
                            "not the same dataset, no paired test")
    out: dict[str, Any] = {"n": len(subjects), "subjects": subjects, "zero_method": zero_method}
    for metric in metrics:
        x = np.array([a[s][metric] for s in subjects])
        y = np.array([b[s][metric] for s in subjects])
        diff = y - x
        with warnings.catch_warnings():  # all-zero differences: scipy warns and returns p = 1 or nan
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.simplefilter("ignore", UserWarning)
            result = wilcoxon(y, x, zero_method=zero_method, alternative="two-sided")
        out[metric] = {
            "statistic": float(result.statistic),
            "pvalue": float(result.pvalue),
            "mean_a": float(x.mean()),
            "mean_b": float(y.mean()),
            "mean_diff": float(diff.mean()),
            "median_diff": float(np.median(diff)),
            "n_used": int(len(diff) - (diff == 0).sum()) if zero_method == "wilcox" else len(diff),
            "b_better": int((diff > 0).sum()),
            "ties": int((diff == 0).sum()),
            "a_better": int((diff < 0).sum()),
        }
    return out


def format_wilcoxon(result: dict[str, Any], name_a: str, name_b: str) -> str:
    lines = [f"paired Wilcoxon signed-rank test (two-sided, zero_method={result['zero_method']}) over "
             f"n = {result['n']} folds (subjects)", f"  A = {name_a}", f"  B = {name_b}"]
    for metric in ("uf1", "uar", "accuracy"):
        if metric in result:
            r = result[metric]
            lines.append(f"{metric.upper():>8}: mean A {r['mean_a']:.4f}, mean B {r['mean_b']:.4f}, "
                         f"difference B - A: mean {r['mean_diff']:+.4f}, median {r['median_diff']:+.4f}; "
                         f"B better / tie / A better: {r['b_better']}/{r['ties']}/{r['a_better']}")
            lines.append(f"          W = {r['statistic']:.4g} over {r['n_used']} non-zero pairs, "
                         f"p = {r['pvalue']:.4g}")
            if r["n_used"] < 6:
                lines.append(f"          note: with {r['n_used']} non-zero pairs a two-sided p-value cannot "
                             f"go below {2 / 2 ** r['n_used']:.4g}")
    return "\n".join(lines)


# ---- spread over training seeds -------------------------------------------------------------------

def read_predictions(path: Path) -> tuple[list[tuple[str, str]], list[str], list[str], np.ndarray, list[str]]:
    """(subject, sample) per row, true and predicted class names, class probabilities (rows x C) and
    the class names of a metrics/predictions.csv, rows sorted by (subject, sample)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path} is missing (predictions: metrics/predictions.csv of a train run)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        classes = [c[2:] for c in columns if c.startswith("p_")]
        if not classes or any(c not in columns for c in ("subject", "sample", "true", "pred")):
            raise PipelineError(f"{path} is not a predictions.csv of the train stage (columns {columns})")
        rows = sorted(reader, key=lambda r: (r["subject"], r["sample"]))
    if not rows:
        raise PipelineError(f"{path} holds no predictions")
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    return ([(r["subject"], r["sample"]) for r in rows], [r["true"] for r in rows], [r["pred"] for r in rows],
            probs, classes)


def seed_spread(paths: Sequence[Path]) -> dict[str, Any]:
    """Each run's pooled UF1 / UAR, their mean and sd, and the pooled scores of the mean probabilities."""
    if len(paths) < 2:
        raise PipelineError("seeds needs the predictions.csv of at least 2 runs")
    tables = [read_predictions(path) for path in paths]
    keys, true, _, _, classes = tables[0]
    y = [classes.index(t) for t in true]
    runs, probs = [], []
    for path, (k, t, pred, p, c) in zip(paths, tables):
        if (k, t, c) != (keys, true, classes):
            raise PipelineError(f"{path} holds other samples, labels or classes than {paths[0]}: "
                                "not a run of the same dataset")
        runs.append({"path": str(path), **pooled_scores(y, [classes.index(x) for x in pred], classes)})
        probs.append(p)
    out: dict[str, Any] = {"n_runs": len(paths), "n_samples": len(keys), "runs": runs}
    for metric in ("uf1", "uar"):
        values = np.array([r[metric] for r in runs])
        out[metric] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)),
                       "min": float(values.min()), "max": float(values.max())}
    out["ensemble"] = pooled_scores(y, np.mean(probs, axis=0).argmax(axis=1), classes)
    return out


def format_seed_spread(result: dict[str, Any]) -> str:
    lines = [f"{result['n_runs']} runs, {result['n_samples']} samples, pooled LOSO"]
    lines += [f"  UF1 {r['uf1']:.4f}  UAR {r['uar']:.4f}  {r['path']}" for r in result["runs"]]
    for metric in ("uf1", "uar"):
        m = result[metric]
        lines.append(f"{metric.upper()}: mean {m['mean']:.4f}, sd {m['sd']:.4f} (min {m['min']:.4f}, "
                     f"max {m['max']:.4f})")
    e = result["ensemble"]
    lines.append(f"mean probabilities of the runs (ensemble): UF1 {e['uf1']:.4f}, UAR {e['uar']:.4f}")
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mer.reports", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wilcoxon", help="paired Wilcoxon test of two per_fold.csv (A vs B)")
    w.add_argument("a", type=Path, help="per_fold.csv of variant A (e.g. the baseline)")
    w.add_argument("b", type=Path, help="per_fold.csv of variant B")
    w.add_argument("--metric", action="append", choices=["uf1", "uar", "accuracy"],
                   help="repeatable; default uf1 and uar")
    w.add_argument("--zero-method", default="wilcox", choices=["wilcox", "pratt", "zsplit"])
    w.add_argument("--json", type=Path, help="also write the results here")
    r = sub.add_parser("seeds", help="spread of runs that differ in train.seed, and their ensemble")
    r.add_argument("predictions", type=Path, nargs="+", help="metrics/predictions.csv of each run")
    r.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "seeds":
        result = seed_spread(args.predictions)
        print(format_seed_spread(result))
    else:
        result = paired_wilcoxon(read_per_fold(args.a), read_per_fold(args.b), args.metric or ("uf1", "uar"),
                                 args.zero_method)
        print(format_wilcoxon(result, str(args.a), str(args.b)))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    run_main(main)
