"""Every bad input gives one `error:` line naming the sample and the fix, and writes nothing."""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import cv2
import h5py
import matplotlib
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, faceless_frame, merge, stage_argv

from mer.common import atomic_path, run_main
from mer.frames import jpeg_cut_short
from stages import frames, landmarks

SAMPLE_DIR = "sub01"
FRAMES_H5 = "data/interim/frames.h5"  # what the frames stage writes (dvc.yaml; checked below)


def run_frames() -> None:
    """The frames stage's main() with dvc.yaml's arguments."""
    argv = stage_argv("frames")
    assert argv[argv.index("--out") + 1] == FRAMES_H5
    frames.main(argv)


@pytest.fixture
def workdir(tiny_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch project dir: params.yaml and a private copy of the tiny synthetic dataset."""
    shutil.copytree(tiny_project / "data" / "raw" / "synthetic", tmp_path / "data" / "raw" / "synthetic")
    shutil.copy(tiny_project / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def set_params(workdir: Path, update: dict) -> None:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    (workdir / "params.yaml").write_text(yaml.safe_dump(merge(params, update)))


def error_line(main: Callable[[], None], capsys: pytest.CaptureFixture) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(main)
    assert exit_info.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def some_sample(workdir: Path) -> tuple[Path, list[Path]]:
    """A sample folder of the 3-class set and its frames, sorted by number."""
    for xlsx in (workdir / "data/raw/synthetic").glob("*.xlsx"):
        table = pd.read_excel(xlsx, dtype={"Subject": str})
        row = table[table["Estimated Emotion"] != "others"].iloc[0]
        folder = workdir / "data/raw/synthetic" / f"sub{row['Subject']}" / row["Filename"]
        return folder, [folder / f"img{row['OnsetFrame']}.jpg", folder / f"img{row['ApexFrame']}.jpg"]
    raise AssertionError("no spreadsheet")


def assert_nothing_written(workdir: Path) -> None:
    assert not (workdir / FRAMES_H5).exists()
    assert not list((workdir / "data").rglob(".*.tmp-*"))


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        ({"data": {"root": "data/raw/nowhere"}}, ["data/raw/nowhere", "data.root"]),
        ({"data": {"dataset": "casme3"}}, ["casme3", "casme2", "megc2019", "samm", "smic", "synthetic"]),
        ({"data": {"dataset": "megc2019"}}, ["data.labels", "combined_3class_gt.csv"]),
        ({"data": {"dataset": "smic"}}, ["no SMIC subject folders", "data.root", "HS"]),
        ({"data": {"labels": "data/raw/missing.xlsx"}}, ["missing.xlsx", "data.labels"]),
        ({"data": {"dataset": "samm"}}, ["MICRO_ONLY"]),
        ({"landmarks": {"predictor": "models/none.dat"}}, ["models/none.dat", "landmarks.predictor"]),
        ({"frames": {"on_no_face": "ignore"}}, ["frames.on_no_face", "fail or skip"]),
        ({"frames": {"detectors": ["cnn", "hog"]}}, ["frames.detectors", "in that order"]),
        ({"landmarks": {"cnn_detector": "models/none.dat"}}, ["models/none.dat", "landmarks.cnn_detector"]),
    ],
)
def test_bad_params_name_the_fix(workdir: Path, capsys: pytest.CaptureFixture, update: dict,
                                 expected: list[str]) -> None:
    set_params(workdir, update)
    line = error_line(run_frames, capsys)
    for text in expected:
        assert text in line
    assert_nothing_written(workdir)


def test_missing_apex_frame_names_the_sample_and_the_frames_present(workdir: Path, capsys) -> None:
    folder, (_, apex) = some_sample(workdir)
    apex.unlink()
    line = error_line(run_frames, capsys)
    assert folder.name in line and apex.stem.removeprefix("img") in line and "frames present" in line
    assert_nothing_written(workdir)


def test_unreadable_frame_names_the_file(workdir: Path, capsys) -> None:
    folder, (onset, _) = some_sample(workdir)
    onset.write_bytes(b"not a jpeg")
    line = error_line(run_frames, capsys)
    assert folder.name in line and onset.name in line and "replace the file" in line
    assert_nothing_written(workdir)


def test_jpeg_cut_short_names_the_file(workdir: Path, capsys) -> None:
    folder, (_, apex) = some_sample(workdir)
    data = apex.read_bytes()
    apex.write_bytes(data[: len(data) * 2 // 3])  # OpenCV still decodes it, the lower third grey
    assert cv2.imread(str(apex)) is not None
    line = error_line(run_frames, capsys)
    assert folder.name in line and apex.name in line and "cut short" in line and "copy the file again" in line
    assert_nothing_written(workdir)


def test_jpeg_end_check_on_whole_files() -> None:
    grace = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    data = grace.read_bytes()
    assert not jpeg_cut_short(data) and not jpeg_cut_short(data + b"\x00" * 64)  # padding after the end
    assert jpeg_cut_short(data[:-2]) and jpeg_cut_short(data[: len(data) // 2])
    _, progressive = cv2.imencode(".jpg", cv2.imread(str(grace)), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert not jpeg_cut_short(progressive.tobytes())
    assert jpeg_cut_short(progressive.tobytes()[:-100])
    _, png = cv2.imencode(".png", cv2.imread(str(grace)))
    assert not jpeg_cut_short(png.tobytes()[:-100])  # not a JPEG: left to OpenCV


def faceless_onset(workdir: Path) -> str:
    folder, (onset, _) = some_sample(workdir)
    cv2.imwrite(str(onset), faceless_frame())
    return folder.name


def test_blank_apex_names_the_sample_and_the_fix(workdir: Path, capsys) -> None:
    folder, (_, apex) = some_sample(workdir)
    cv2.imwrite(str(apex), np.zeros((480, 640, 3), np.uint8))  # a dropped frame
    line = error_line(run_frames, capsys)
    assert folder.name in line and apex.name in line and "blank" in line and "another frame number" in line
    assert_nothing_written(workdir)


def test_no_face_fails_with_the_list(workdir: Path, capsys) -> None:
    sample = faceless_onset(workdir)
    line = error_line(run_frames, capsys)
    assert "no face" in line and sample in line and "frames.on_no_face=skip" in line
    assert_nothing_written(workdir)


def test_no_face_skip_reports_in_json(workdir: Path) -> None:
    sample = faceless_onset(workdir)
    set_params(workdir, {"frames": {"on_no_face": "skip"}})
    run_frames()
    skipped = json.loads((workdir / "data/interim/no_face.json").read_text())["skipped_no_face"]
    assert len(skipped) == 1 and skipped[0].endswith(sample)
    with h5py.File(workdir / FRAMES_H5) as f:
        assert sample not in set(f["sample"].asstr()[()])


def test_landmarks_stage_without_frames_says_what_to_run(workdir: Path, capsys) -> None:
    line = error_line(functools.partial(landmarks.main, stage_argv("landmarks")), capsys)
    assert "frames.h5" in line and "dvc repro" in line


def test_interrupted_write_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "out.h5"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert not target.exists() and not list(tmp_path.iterdir())


def test_repo_has_no_copy_of_the_shared_label_files() -> None:
    assert not list(REPO.glob("**/CASME2-coding-2019*.xlsx"))
