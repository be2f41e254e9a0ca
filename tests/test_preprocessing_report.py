"""Stage `preprocessing_report` through `dvc repro` on the embedded data: one table of the probes on
each preprocessing variant's flow, consistent with the `baselines` stage on the pipeline's own flow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import run

from mer.common import PipelineError, load_params
from mer.preprocessing_report import variant_params

VARIANTS = {"default": {}, "phase_x3": {"magnify": {"method": "phase"}},
            "same_as_default": {"flow": {"illumination_min": 1.0}}}


@pytest.fixture(scope="module")
def report_project(tiny_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = tmp_path_factory.mktemp("report") / "project"
    shutil.copytree(tiny_project, project, symlinks=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["flow"]["illumination_min"] == 1.0, "same_as_default restates the default"
    params["preprocessing_report"]["variants"] = VARIANTS
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro", "baselines", "preprocessing_report"], project)
    return project


def test_report_scores_every_variant_and_draws_them(report_project: Path) -> None:
    report = json.loads((report_project / "metrics" / "preprocessing.json").read_text())
    assert list(report) == sorted(VARIANTS)
    for name, row in report.items():
        assert row["params"] == VARIANTS[name]
        for probe in ("flow_cells", "flow_landmarks"):
            assert 0.0 <= row[probe]["uf1"] <= 1.0 and 0.0 <= row[probe]["uar"] <= 1.0
    assert report["same_as_default"] == {**report["default"], "params": VARIANTS["same_as_default"]}
    assert (report_project / "metrics" / "preprocessing.png").read_bytes()[:4] == b"\x89PNG"


def test_default_variant_is_the_pipelines_own_flow(report_project: Path) -> None:
    """The report's `default` recomputes what magnify + flow + pack hand the model: its probes score
    exactly what stage `baselines` scores on the processed file."""
    report = json.loads((report_project / "metrics" / "preprocessing.json").read_text())
    baselines = json.loads((report_project / "metrics" / "baselines.json").read_text())
    for probe in ("flow_cells", "flow_landmarks"):
        assert report["default"][probe] == {k: baselines[probe][k] for k in ("uf1", "uar")}


def test_report_is_byte_identical_on_rerun(report_project: Path) -> None:
    path = report_project / "metrics" / "preprocessing.json"
    before = path.read_bytes()
    run(["dvc", "repro", "--force", "--single-item", "preprocessing_report"], report_project)
    assert path.read_bytes() == before


def test_unknown_variant_key_is_one_line_naming_it() -> None:
    with pytest.raises(PipelineError, match=r"variants\.typo: unknown \['flow\.lamda'\]"):
        variant_params(load_params(), {"flow": {"lamda": 0.1}}, "typo")
