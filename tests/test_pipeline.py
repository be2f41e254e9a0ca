"""The preprocessing stages end to end through `dvc repro`, and what they write."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from conftest import run

from mer import face
from mer.datasets import get_dataset
from stages.flow import flow_pair
from stages.frames import FrameJob, crop_sample, extract_frames

SIZE = 224


def running_stages(dvc_output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", dvc_output))


def set_params(project: Path, **updates: object) -> None:
    """`section.key=value` updates to the project's params.yaml (what `dvc exp run -S` does)."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    for dotted, value in updates.items():
        section, key = dotted.split("__")
        params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_processed_file_has_the_contract_arrays(processed_h5: Path) -> None:
    with h5py.File(processed_h5) as f:
        n = len(f["label"])
        assert f["onset"].shape == f["apex"].shape == (n, SIZE, SIZE, 3)
        assert f["onset"].dtype == f["apex"].dtype == np.uint8
        assert f["flow"].shape == (n, SIZE, SIZE, 2) and f["flow"].dtype == np.float32
        assert f["landmarks"].shape == (n, 51, 4) and f["landmarks"].dtype == np.float32
        assert f["label"].dtype == np.int64
        classes = f.attrs["classes"]
        assert json.loads(classes) == ["negative", "positive", "surprise"]
        assert set(f["label"][()]) <= {0, 1, 2}
        subjects = f["subject"].asstr()[()]
        assert all(s.startswith("synthetic_sub") for s in subjects)
        assert len(set(zip(subjects, f["sample"].asstr()[()]))) == n  # every clip once
        assert set(f["emotion"].asstr()[()]) <= {"happiness", "disgust", "repression", "surprise"}
        assert "magnified" in f.attrs["apex_frame"]
        assert "opencv-contrib-python-headless" in f.attrs["versions"]
        assert '"flow"' in f.attrs["params"]
        landmarks = f["landmarks"][()]
        assert landmarks.min() >= 0 and landmarks.max() < SIZE
        # onset and apex points describe one face: they move by micro-expression amounts only
        assert np.abs(landmarks[..., :2] - landmarks[..., 2:]).mean() < 3.0


def test_flow_is_nonzero_on_motion_and_zero_on_a_static_pair(processed_h5: Path) -> None:
    with h5py.File(processed_h5) as f:
        flow, onset = f["flow"][()], f["onset"][0]
        params = json.loads(f.attrs["params"])["flow"]
    magnitude = np.hypot(flow[..., 0], flow[..., 1])
    face = magnitude[:, 40:-40, 40:-40]  # the face, inside the crop margin
    assert face.mean(axis=(1, 2)).min() > 0.05, "every sample moves (expression + head drift)"
    static = np.hypot(*flow_pair((onset, onset), params).transpose(2, 0, 1))
    assert static.max() < 0.02


def test_second_repro_runs_nothing(tiny_project: Path) -> None:
    result = run(["dvc", "repro", "pack"], tiny_project)
    assert running_stages(result.stdout) == set()
    assert "up to date" in run(["dvc", "status", "pack"], tiny_project).stdout


@pytest.fixture(scope="module")
def project_copy(tiny_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("copy") / "project"
    shutil.copytree(tiny_project, copy, symlinks=True)
    return copy


def test_forced_rerun_is_byte_identical(project_copy: Path) -> None:
    outputs = sorted((project_copy / "data").glob("*/*.h5"))
    before = {p: digest(p) for p in outputs}
    lock_before = (project_copy / "dvc.lock").read_text()
    run(["dvc", "repro", "--force", "pack"], project_copy)
    assert {p: digest(p) for p in outputs} == before
    assert (project_copy / "dvc.lock").read_text() == lock_before


def test_flow_param_reruns_only_flow_and_what_follows(project_copy: Path) -> None:
    set_params(project_copy, flow__warps=3)
    assert running_stages(run(["dvc", "repro", "pack"], project_copy).stdout) == {"flow", "pack"}


def test_casme2_reader_runs_the_frames_stage_on_a_casme2_format_tree(tiny_project: Path) -> None:
    """The synthetic set is written in CASME II's format: the casme2 reader must take it as is."""
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    root = tiny_project / "data" / "raw" / "synthetic"
    dataset = get_dataset("casme2", root)
    arrays, no_face = extract_frames(dataset, params["frames"], face.predictor_path(""), workers=1)
    with h5py.File(tiny_project / "data" / "processed" / "synthetic.h5") as f:
        expected_samples = f["sample"].asstr()[()]
        expected_onset = f["onset"][()]
    assert no_face == [] and list(arrays["sample"]) == list(expected_samples)
    assert all(s.startswith("casme2_sub") for s in arrays["subject"])
    assert np.array_equal(arrays["onset"], expected_onset)  # same crops, whoever reads the sheet


def test_grey_frames_give_three_equal_channels(tiny_project: Path, tmp_path: Path) -> None:
    """SAMM's frames are grey: the crops repeat them on R, G and B."""
    import cv2

    dataset = get_dataset("synthetic", tiny_project / "data" / "raw" / "synthetic")
    sample = dataset.samples()[0]
    paths = []
    for number in (sample.onset, sample.apex):
        grey = cv2.imread(str(dataset.frame_path(sample, number)), cv2.IMREAD_GRAYSCALE)
        paths.append(tmp_path / f"{number}.png")
        cv2.imwrite(str(paths[-1]), grey)
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())["frames"]
    crop = crop_sample(FrameJob("grey", *paths), params["size"], params["margin"], params["detect_width"],
                       params["upsample"], face.predictor_path(""))
    assert crop is not None
    for key in ("onset", "apex"):
        assert crop[key].shape == (SIZE, SIZE, 3)
        assert np.array_equal(crop[key][..., 0], crop[key][..., 1])
        assert np.array_equal(crop[key][..., 0], crop[key][..., 2])
