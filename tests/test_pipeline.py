"""The preprocessing stages end to end through `dvc repro`, and what they write."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import skimage.data
import yaml
from conftest import run

from mer import face
from mer.common import round_uint8
from mer.datasets import get_dataset
from mer.flow import flow_pair, match_illumination
from mer.frames import FrameJob, crop_sample, extract_frames

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
        # the spreadsheet's onset and apex of each sample
        sheet = get_dataset("synthetic", processed_h5.parents[2] / "data" / "raw" / "synthetic").samples()
        expected = {(s.subject, s.sample): (s.onset, s.apex) for s in sheet}
        numbers = f["frame_numbers"][()]
        assert numbers.dtype == np.int64 and (numbers[:, 1] > numbers[:, 0]).all()
        keys = zip(subjects, f["sample"].asstr()[()])
        assert [tuple(pair) for pair in numbers] == [expected[key] for key in keys]
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
    face = magnitude[:, 40:-40, 40:-40]  # the middle of the face
    assert face.mean(axis=(1, 2)).min() > 0.05, "every sample moves (expression + head drift)"
    static = np.hypot(*flow_pair((onset, onset), params).transpose(2, 0, 1))
    assert static.max() < 0.02


def test_flow_ignores_a_lighting_change_between_onset_and_apex(processed_h5: Path) -> None:
    """A known movement, then the apex lit brighter on one side: the matched flow recovers the movement."""
    with h5py.File(processed_h5) as f:
        onset = cv2.cvtColor(f["onset"][0], cv2.COLOR_RGB2GRAY).astype(np.float32)
        params = json.loads(f.attrs["params"])["flow"]
    x, y = np.meshgrid(np.arange(SIZE, dtype=np.float32), np.arange(SIZE, dtype=np.float32))
    bump = 2.0 * np.exp(-((x - 112) ** 2 + (y - 150) ** 2) / (2 * 15.0**2))  # 2 px to the right
    moved = cv2.remap(onset, x - bump, y, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101)
    light = 1.0 + 0.08 * x / SIZE + 0.04 * np.exp(-((x - 60) ** 2 + (y - 60) ** 2) / (2 * 50.0**2))
    lit = np.clip(np.rint(moved * light), 0, 255).astype(np.uint8)

    def error(mode: str) -> float:
        flow = flow_pair((onset.astype(np.uint8), lit), {**params, "illumination": mode})
        flow -= np.median(flow.reshape(-1, 2), axis=0)
        return float(np.sqrt(((flow[..., 0] - bump) ** 2 + flow[..., 1] ** 2).mean()))

    unmatched, matched = error("none"), error("quadratic")
    print(f"flow RMS error: no match {unmatched:.3f} px, quadratic match {matched:.3f} px")
    assert unmatched > 0.3, "the lighting change alone should fake flow without the match"
    assert matched < unmatched / 4 and matched < 0.15


def test_lighting_match_is_not_pulled_by_a_blink() -> None:
    """A darker, offset apex with one closed eye: the robust fit restores the light elsewhere, the
    plain least-squares fit (no reweighting) is pulled off by the eye."""
    reference = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2GRAY)[:224, 100:324]
    image = np.clip(0.9 * reference.astype(np.float64) + 8, 0, 255)
    image[60:100, 60:120] = 20  # the blink
    outside = np.ones(reference.shape, bool)
    outside[60:100, 60:120] = False

    def error(passes: int) -> float:
        matched = match_illumination(reference, np.rint(image).astype(np.uint8), degree=0, passes=passes)
        return float(np.abs(matched.astype(np.float64) - reference)[outside].mean())

    assert error(3) < 0.5
    assert error(0) > 3


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
    assert np.array_equal(round_uint8(arrays["onset"]), expected_onset)  # same crops, whoever reads the sheet


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
