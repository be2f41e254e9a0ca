"""The preprocessing report: which preprocessing keeps the most of this dataset's signal, before
any training.

For every variant of `preprocessing_report.variants` (overrides of the `magnify` and `flow` params
sections; what a variant leaves out is params.yaml's), the aligned onset / apex crops of `frames` are
magnified and turned into TV-L1 flow as the `magnify` and `flow` stages would, and the two linear
probes of `baselines` (`flow_cells`, `flow_landmarks`) are scored on that flow over the same LOSO
folds. One JSON table (`metrics/preprocessing.json`: variant -> probe -> uf1 / uar, and the variant's
overrides) and one bar chart. Variants that come to the same params are computed once. Cost: one
TV-L1 pass per sample and distinct variant (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from mer.common import (
    PipelineError,
    new_figure,
)
from mer.flow import compute_flow
from mer.magnify import magnify_all
from mer.probes import run_baselines

SECTIONS = ("magnify", "flow")  # what a variant may override


def variant_params(params: dict[str, Any], overrides: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """The `magnify` and `flow` sections of one variant: params.yaml's, with the variant's keys set."""
    unknown = sorted(set(overrides or {}) - set(SECTIONS))
    bad_keys = [f"{s}.{k}" for s in SECTIONS for k in (overrides or {}).get(s, {}) if k not in params[s]]
    if unknown or bad_keys:
        raise PipelineError(f"preprocessing_report.variants.{name}: unknown {unknown + bad_keys}; a variant "
                            f"sets keys of {list(SECTIONS)} that params.yaml has")
    return {s: {**params[s], **(overrides or {}).get(s, {})} for s in SECTIONS}


def preprocessing_report(arrays: dict[str, np.ndarray], classes: list[str], params: dict[str, Any],
                         workers: int) -> dict[str, dict[str, Any]]:
    """{variant: {probe: {uf1, uar}, "params": its magnify / flow overrides}} for
    the frames arrays (`onset`, `apex`, `label`, `subject`) and `landmarks` (N x 51 x 4)."""
    variants = params["preprocessing_report"]["variants"]
    if not variants:
        raise PipelineError("preprocessing_report.variants is empty: name at least one ({} = the defaults)")
    magnified: dict[str, np.ndarray] = {}  # by magnify params: variants that share one compute it once
    report: dict[str, dict[str, Any]] = {}
    scored: dict[str, dict[str, Any]] = {}  # by magnify + flow params (e.g. `default` = `phase`)
    for name, overrides in variants.items():
        sections = variant_params(params, overrides, name)
        start = time.perf_counter()  # printed, not written: the JSON stays the same bytes run to run
        key = json.dumps(sections["magnify"], sort_keys=True)
        both = json.dumps(sections, sort_keys=True)
        if both not in scored:
            if key not in magnified:
                magnified[key] = magnify_all(arrays["onset"], arrays["apex"], sections["magnify"], workers)
            flow = compute_flow(arrays["onset"], magnified[key], sections["flow"], workers)
            scored[both] = run_baselines({**arrays, "flow": flow}, classes, params["baselines"])
        scores = scored[both]
        report[name] = {**{probe: {k: s[k] for k in ("uf1", "uar")} for probe, s in scores.items()},
                        "params": overrides or {}}
        summary = ", ".join(f"{probe} UF1 {s['uf1']:.3f}" for probe, s in scores.items())
        print(f"preprocessing_report: {name}: {summary} ({time.perf_counter() - start:.0f} s)")
    return report


def plot_report(report: dict[str, dict[str, Any]], dataset: str) -> Any:
    """Grouped horizontal bars: UF1 of each probe for each variant."""
    names = list(report)
    probes = [k for k in report[names[0]] if k != "params"]
    fig, ax = new_figure(figsize=(7, 1 + 0.5 * len(names)))
    height = 0.8 / len(probes)
    for i, probe in enumerate(probes):
        values = [report[n][probe]["uf1"] for n in names]
        bars = ax.barh(np.arange(len(names)) + i * height, values, height, label=probe)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_yticks(np.arange(len(names)) + height * (len(probes) - 1) / 2, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("LOSO pooled UF1 of the linear probe")
    ax.set_title(f"{dataset}: signal kept by each preprocessing variant")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig
