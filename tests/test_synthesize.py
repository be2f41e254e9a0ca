"""The synthetic dataset: CASME II's on-disk format, deterministic, one face per frame, and
action-unit motion in the right places."""

from __future__ import annotations

import os
import re
from pathlib import Path

import cv2
import numpy as np
import openpyxl
import pandas as pd
import pytest

from mer import face
from mer import synthetic as syn
from mer.common import PipelineError

REPO = Path(__file__).resolve().parents[1]
# Seed 3: the happiness and surprise samples have no blink (their flow is then AU motion only).
PARAMS = {"seed": 3, "subjects": 3, "samples": 18, "onset_to_apex": 3, "apex_to_offset": 2,
          "amplitude_px": [1.5, 2.0]}
REAL_SHEET = Path(os.environ.get("MER_LABELS_DIR", REPO.parent / "shared" / "fixtures" / "labels")) / \
    "CASME2-coding-20190701.xlsx"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("synthetic") / "synthetic"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    table = syn.synthesize(out, PARAMS, workers=2)
    return out, table


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_coding_sheet_has_the_casme2_layout(dataset: tuple[Path, pd.DataFrame]) -> None:
    root, table = dataset
    assert sorted(p.name for p in root.iterdir()) == [syn.LABELS_NAME, "sub01", "sub02", "sub03"]
    sheet = openpyxl.load_workbook(root / syn.LABELS_NAME).active
    assert sheet.title == "Sheet1"
    header = [c.value for c in sheet[1]]
    assert header == ["Subject", "Filename", None, "OnsetFrame", "ApexFrame", "OffsetFrame", None,
                      "Action Units", "Estimated Emotion", "Objective Classes"]
    if REAL_SHEET.exists():
        real = openpyxl.load_workbook(REAL_SHEET, read_only=True).active
        assert header == [c.value for c in next(real.iter_rows(max_row=1))]
    assert sheet["A2"].value == "01" and sheet["A2"].data_type == "s"
    assert all(sheet.cell(row, col).value is None for row in range(2, sheet.max_row + 1) for col in (3, 7))

    read = pd.read_excel(root / syn.LABELS_NAME, dtype=object)
    assert list(read.columns) == syn.COLUMNS
    assert len(read) == PARAMS["samples"] == len(table)
    pd.testing.assert_frame_equal(read, table, check_dtype=False)
    assert set(read["Estimated Emotion"]) <= set(syn.EMOTION_COUNTS)
    assert read["Estimated Emotion"].value_counts().to_dict() == syn.emotion_counts(PARAMS["samples"])
    for aus, klass in zip(read["Action Units"], read["Objective Classes"]):
        assert re.fullmatch(r"[LR]?\d+(\+[LR]?\d+)*", str(aus))
        assert isinstance(klass, int) and 1 <= klass <= 7
    units = list(read["Action Units"])
    assert any(isinstance(a, int) for a in units) and any("+" in str(a) for a in units)  # 12 vs "4+9"


def test_frames_are_casme2_folders_and_files(dataset: tuple[Path, pd.DataFrame]) -> None:
    root, table = dataset
    names = list(table["Filename"])
    assert all(re.fullmatch(r"EP\d{2}(_\d{1,2}){0,2}f?", n) for n in names)
    assert any(re.fullmatch(r"EP\d{2}_\d{2}", n) for n in names)
    assert any(n.endswith("f") for n in names) and any(re.fullmatch(r"EP\d{2}f", n) for n in names)
    assert any(n.count("_") == 2 for n in names) and any(re.fullmatch(r"EP\d{2}_\d", n) for n in names)
    expected = {syn.LABELS_NAME}
    for row in table.itertuples(index=False):
        subject, filename, onset, apex, offset = row[0], row[1], row[3], row[4], row[5]
        assert re.fullmatch(r"\d{2}", subject)
        assert 1 < onset < apex <= offset
        assert apex - onset == PARAMS["onset_to_apex"] and offset - apex == PARAMS["apex_to_offset"]
        expected |= {f"sub{subject}/{filename}/img{n}.jpg" for n in range(onset, offset + 1)}
    assert set(files(root)) == expected  # onset..offset only, and the stale file is gone
    # Some sequences cross a digit boundary: sorting frames as text would break them.
    assert any(len(str(on)) < len(str(off)) for on, off in zip(table["OnsetFrame"], table["OffsetFrame"]))
    row = table.iloc[0]
    image = cv2.imread(str(root / f"sub{row['Subject']}" / row["Filename"] / f"img{row['OnsetFrame']}.jpg"))
    assert image.shape == (480, 640, 3)
    assert np.abs(image[..., 0].astype(int) - image[..., 2]).mean() > 3  # colour, not grey


def test_classes_spread_over_subjects() -> None:
    params = dict(PARAMS, seed=0, subjects=12, samples=120)
    assert syn.emotion_counts(120) == {"others": 48, "disgust": 30, "happiness": 15, "surprise": 14,
                                       "repression": 13}
    specs = syn.plan(params)
    kept = [s for s in specs if s.emotion in syn.THREE_CLASS]
    per_subject = pd.Series([s.subject for s in kept]).value_counts()
    assert len(per_subject) == 12 and per_subject.min() >= 2
    for klass in ("negative", "positive", "surprise"):
        assert len({s.subject for s in kept if syn.THREE_CLASS[s.emotion] == klass}) >= 10
    assert len({(s.subject, s.filename) for s in specs}) == len(specs)
    with pytest.raises(PipelineError, match="synthetic.samples"):
        syn.plan(dict(params, samples=20))


def test_deterministic_bytes_whatever_the_workers(dataset: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    root, _ = dataset
    again = syn.synthesize(tmp_path / "again", PARAMS, workers=1)
    assert files(tmp_path / "again") == files(root)  # xlsx included
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temp folder left behind
    assert len(again) == PARAMS["samples"]


def test_one_face_in_onset_and_apex_frames(dataset: tuple[Path, pd.DataFrame]) -> None:
    root, table = dataset
    for row in table.itertuples(index=False):
        for frame in (row[3], row[4]):
            image = cv2.imread(str(root / f"sub{row[0]}" / row[1] / f"img{frame}.jpg"))
            assert len(face.detector()(image, 0)) == 1, f"sub{row[0]}/{row[1]}/img{frame}.jpg"


def onset_apex_flow(root: Path, spec: syn.SampleSpec) -> tuple[np.ndarray, np.ndarray]:
    """(onset -> apex Farneback flow with the face's median flow removed, onset landmarks)."""
    folder = root / f"sub{spec.subject:02d}" / spec.filename
    onset = cv2.imread(str(folder / f"img{spec.onset}.jpg"))
    apex = cv2.imread(str(folder / f"img{spec.apex}.jpg"))
    box, _ = face.find_face(onset, detect_width=640, upsample=0, detectors=["hog"])
    points = face.landmarks68(onset, box, face.default_predictor_path())
    grey = [cv2.cvtColor(i, cv2.COLOR_BGR2GRAY) for i in (onset, apex)]
    flow = cv2.calcOpticalFlowFarneback(*grey, None, 0.5, 3, 15, 5, 5, 1.1, 0)
    left, top, right, bottom = box.astype(int)
    flow -= np.median(flow[top:bottom, left:right].reshape(-1, 2), axis=0)  # head drift
    return flow, points


def mean_flow(flow: np.ndarray, points: np.ndarray, radius: int = 8) -> np.ndarray:
    """Mean (u, v) over discs around `points`."""
    mask = np.zeros(flow.shape[:2], np.uint8)
    for x, y in points:
        cv2.circle(mask, (int(round(x)), int(round(y))), radius, 1, -1)
    return flow[mask > 0].mean(axis=0)


BROWS, MOUTH_CORNERS = list(range(17, 27)), [48, 54]


def test_happiness_moves_lip_corners_not_brows(dataset: tuple[Path, pd.DataFrame]) -> None:
    root, _ = dataset
    samples = [s for s in syn.plan(PARAMS) if s.emotion == "happiness" and s.blink is None]
    assert samples
    for spec in samples:
        flow, points = onset_apex_flow(root, spec)
        speed = np.linalg.norm(flow, axis=2)[..., None]
        corners, brows = mean_flow(speed, points[MOUTH_CORNERS])[0], mean_flow(speed, points[BROWS])[0]
        assert corners > 2 * brows and corners > 0.3, (spec.filename, spec.action_units, corners, brows)
        assert mean_flow(flow, points[MOUTH_CORNERS])[1] < -0.1  # corners pulled up


def test_surprise_raises_the_brows(dataset: tuple[Path, pd.DataFrame]) -> None:
    root, _ = dataset
    samples = [s for s in syn.plan(PARAMS) if s.emotion == "surprise" and s.blink is None]
    assert samples
    for spec in samples:
        flow, points = onset_apex_flow(root, spec)
        brows_v = mean_flow(flow, points[BROWS])[1]
        corners_speed = np.linalg.norm(mean_flow(flow, points[MOUTH_CORNERS]))
        assert brows_v < -0.2, (spec.filename, spec.action_units, brows_v)  # up = negative v
        assert abs(brows_v) > corners_speed, (spec.filename, spec.action_units, brows_v, corners_speed)


@pytest.mark.parametrize("still", [False, True])
def test_still_background_moves_the_head_alone(still: bool) -> None:
    """`nuisance.still_background`: the head drift moves the face as before, and the background only
    where it is off (one warp for the whole frame)."""
    spec = syn.plan(PARAMS)[0]
    identity = syn.make_identity(PARAMS["seed"], spec.subject)
    quiet = {"noise_sigma": 0.01, "drift_px": [4, 4], "light_ramp": 0.0, "blink_p": 0.0,
             "still_background": still}
    frames = syn.render_sample(spec, identity, {**PARAMS, "nuisance": quiet})
    first, last = (frame.astype(np.float32) for _, frame in (frames[0], frames[-1]))
    left, top, right, bottom = (int(v) for v in identity.box)
    face_change = np.abs(first[top:bottom, left:right] - last[top:bottom, left:right]).mean()
    corner_change = np.abs(first[:60, :60] - last[:60, :60]).mean()
    assert face_change > 5
    assert (corner_change < 0.01) if still else (corner_change > 0.1)
