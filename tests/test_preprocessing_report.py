"""Stage `preprocessing_report` through `dvc repro` on the embedded data: one table of the probes on
each preprocessing variant's flow, consistent with the `baselines` stage on the pipeline's own flow;
a variant with `frames` keys re-crops the raw frames as the `frames` and `landmarks` stages would."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run

from mer.common import PipelineError, class_names, load_params, read_h5
from mer.preprocessing_report import preprocessing_report, raw_frames, recrop, variant_params

VARIANTS = {"default": {}, "phase_x3": {"magnify": {"method": "phase"}},
            "same_as_default": {"flow": {"illumination_min": 1.0}},
            # a `frames` key that changes no crop: re-crops the raw frames, must give the pipeline's own
            "recropped_as_default": {"frames": {"on_no_face": "skip"}},
            "wider_crop": {"frames": {"margin": 0.15}}}


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
    for same in ("same_as_default", "recropped_as_default"):
        assert report[same] == {**report["default"], "params": VARIANTS[same]}
    for changed in ("phase_x3", "wider_crop"):  # their params reach the flow: other scores
        assert report[changed] != {**report["default"], "params": VARIANTS[changed]}
    assert (report_project / "metrics" / "preprocessing.png").read_bytes()[:4] == b"\x89PNG"


def test_default_variant_is_the_pipelines_own_flow(report_project: Path) -> None:
    """The report's `default` recomputes what magnify + flow + pack hand the model: its probes score
    exactly what stage `baselines` scores on the processed file."""
    report = json.loads((report_project / "metrics" / "preprocessing.json").read_text())
    baselines = json.loads((report_project / "metrics" / "baselines.json").read_text())
    for probe in ("flow_cells", "flow_landmarks"):
        assert report["default"][probe] == {k: baselines[probe][k] for k in ("uf1", "uar")}


def test_variants_of_the_pipelines_crop_need_no_raw_frames(report_project: Path) -> None:
    """Only a variant with `frames` keys of its own re-crops: the others run on the frames file alone
    (`raw` not given) and score what the stage wrote."""
    params = yaml.safe_load((report_project / "params.yaml").read_text())
    params["preprocessing_report"]["variants"] = {"default": {}}
    frames, attrs = read_h5(report_project / "data/interim/frames.h5", ["onset", "apex", "label", "subject"])
    landmarks, _ = read_h5(report_project / "data/interim/landmarks.h5", ["landmarks"])
    arrays = {**frames, "landmarks": landmarks["landmarks"]}
    report = preprocessing_report(arrays, class_names(attrs), params, workers=2)
    written = json.loads((report_project / "metrics" / "preprocessing.json").read_text())
    for probe in ("flow_cells", "flow_landmarks"):
        assert report["default"][probe]["uf1"] == pytest.approx(written["default"][probe]["uf1"], abs=1e-6)
    params["preprocessing_report"]["variants"] = {"wider_crop": VARIANTS["wider_crop"]}
    with pytest.raises(PipelineError, match=r"variants\.wider_crop sets `frames` keys"):
        preprocessing_report(arrays, class_names(attrs), params, workers=2)


def test_report_is_byte_identical_on_rerun(report_project: Path) -> None:
    path = report_project / "metrics" / "preprocessing.json"
    before = path.read_bytes()
    run(["dvc", "repro", "--force", "--single-item", "preprocessing_report"], report_project)
    assert path.read_bytes() == before


def test_unknown_variant_key_is_one_line_naming_it() -> None:
    with pytest.raises(PipelineError, match=r"variants\.typo: unknown \['flow\.lamda'\]"):
        variant_params(load_params(), {"flow": {"lamda": 0.1}}, "typo")


def test_recrop_is_the_frames_and_landmarks_stages_at_the_variants_margin(report_project: Path) -> None:
    """Re-cropped at the pipeline's margin: the `frames` crops and `landmarks` points to the byte.
    At margin 0.15 the face box spans 1 / 1.3 of the crop: the landmarks lie that much closer to
    its centre."""
    params = yaml.safe_load((report_project / "params.yaml").read_text())
    params["data"]["root"] = str(report_project / params["data"]["root"])
    frames, _ = read_h5(report_project / "data/interim/frames.h5", ["onset", "apex", "subject", "sample"])
    landmarks, _ = read_h5(report_project / "data/interim/landmarks.h5", ["landmarks"])
    raw = raw_frames(params, frames["subject"], frames["sample"])
    same = recrop(raw, params["frames"], "same", workers=2)
    for key in ("onset", "apex"):
        np.testing.assert_array_equal(same[key], frames[key])
    np.testing.assert_array_equal(same["landmarks"], landmarks["landmarks"])

    wider = recrop(raw, params["frames"] | {"margin": 0.15}, "wider", workers=2)
    centre = params["frames"]["size"] / 2
    spread = np.median(np.abs(wider["landmarks"] - centre) / np.abs(landmarks["landmarks"] - centre + 1e-6))
    assert wider["onset"].shape == frames["onset"].shape and 0.72 < spread < 0.82  # 1 / 1.3 = 0.77
