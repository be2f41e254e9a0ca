"""Face finding (the HOG -> HOG upsampled -> CNN fallback chain) and the crop's framing, on real faces
(no dataset needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from matplotlib import cbook
from skimage import data

from mer import face
from mer.common import PipelineError, load_params, round_uint8
from mer.datasets import Samm, Smic
from mer.frames import FrameJob, align_pair, extract_frames
from mer.landmarks import fit_pair
from mer.preprocessing_report import RawFrames, recrop

FRAMES_PARAMS = {"size": 224, "margin": 0.15, "detect_width": 320, "upsample": 1, "on_no_face": "fail"}


def _tight_crop(image: np.ndarray, shrink: float, width: int) -> np.ndarray:
    """A face-only frame, as SMIC's and CASME II's cropped sets are: the HOG box of `image` cut in
    by `shrink` of its width (less at the chin), resized to `width`."""
    (left, top, right, bottom), _ = face.find_face(image, image.shape[1], 1, detectors=["hog"])
    cut = shrink * (right - left)
    crop = image[int(top + cut):int(bottom - cut / 2), int(left + cut):int(right - cut)]
    height = round(width * crop.shape[0] / crop.shape[1])
    return cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def grace() -> np.ndarray:
    """Grace Hopper's portrait (matplotlib sample data), RGB, 512×600."""
    image = cv2.imread(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def test_chain_uses_the_cheapest_step_that_finds_the_face(grace: np.ndarray) -> None:
    assert face.find_face(grace, 320, 1)[1] == "hog"
    # measured, not assumed: a tight crop of the astronaut only HOG upsampled finds, one of Grace
    # Hopper neither HOG step finds and the CNN does
    astronaut = _tight_crop(data.astronaut(), 0.10, 180)
    assert face.find_face(astronaut, 320, 1, detectors=["hog"]) is None
    assert face.find_face(astronaut, 320, 1)[1] == "hog_upsampled"
    tight = _tight_crop(grace, 0.15, 180)
    assert face.find_face(tight, 320, 1, detectors=["hog", "hog_upsampled"]) is None
    box, step = face.find_face(tight, 320, 1)
    assert step == "cnn"
    centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    assert np.all(np.abs(centre - [90, tight.shape[0] / 2]) < 0.15 * tight.shape[0])  # on the face


def _write_clip(root: Path, subject: int, emotion: str, frame: np.ndarray, grey: bool) -> None:
    """A SMIC-HS clip of three identical BMP frames, 6-digit camera counter."""
    folder = root / f"s{subject}" / "micro" / emotion / f"s{subject}_{emotion[:2]}_01"
    folder.mkdir(parents=True)
    image = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY if grey else cv2.COLOR_RGB2BGR)
    for number in (204_518, 204_519, 204_520):
        cv2.imwrite(str(folder / f"reg_image{number}.bmp"), image)


def test_frames_keeps_the_face_hog_misses(tmp_path: Path, grace: np.ndarray,
                                         caplog: pytest.LogCaptureFixture) -> None:
    _write_clip(tmp_path, 1, "negative", _tight_crop(grace, 0.15, 180), grey=True)  # as cropped SMIC
    _write_clip(tmp_path, 2, "positive", grace, grey=False)
    dataset = Smic(tmp_path)
    predictor = face.default_predictor_path()

    with pytest.raises(PipelineError, match=r"no face found .* 1 sample\(s\): smic_s01/s1_ne_01"):
        extract_frames(dataset, FRAMES_PARAMS | {"detectors": ["hog", "hog_upsampled"]}, predictor, workers=1)

    caplog.clear()
    arrays, no_face = extract_frames(dataset, FRAMES_PARAMS | {"detectors": list(face.DETECTORS)}, predictor,
                                     workers=1)
    assert no_face == []
    # the face-only frame is too small for the crop's square: said, naming it, not the full portrait
    warned = [r.getMessage() for r in caplog.records if "past the frame's edge" in r.getMessage()]
    assert len(warned) == 1 and "1 sample(s)" in warned[0] and "smic_s01/s1_ne_01" in warned[0], warned
    assert arrays["sample"].tolist() == ["s1_ne_01", "s2_po_01"]
    assert arrays["detector"].tolist() == ["cnn", "hog"]
    assert arrays["onset"].shape == (2, 224, 224, 3)
    # both aligned crops frame the face: the landmarks stage's re-detection finds it in each
    for crop in arrays["onset"]:  # float crops, rounded for dlib as the landmarks stage does
        assert face.find_face(round_uint8(crop), 224, 1) is not None


def test_the_share_of_the_crop_past_the_frame_edge(grace: np.ndarray) -> None:
    predictor = face.default_predictor_path()
    assert align_pair(grace, grace, 224, 0.0, 320, 1, predictor)["outside"] == 0.0  # the face well inside
    tight = _tight_crop(grace, 0.05, 180)  # brows to chin, cheek to cheek
    # the crop's square (3.3 x the 51 points' RMS radius) is larger than this frame: 17% of it past the edge
    assert 0.1 < align_pair(tight, tight, 224, 0.0, 320, 1, predictor)["outside"] < 0.3


def test_report_variant_warns_of_its_crop_past_the_edge(tmp_path: Path, grace: np.ndarray,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    # a wider crop re-cut from face-only frames (an official Cropped set: the face's box and 10% more)
    # repeats their edges: said, where the default margin's crop is not
    (left, top, right, bottom), _ = face.find_face(grace, grace.shape[1], 1, detectors=["hog"])
    grow = 0.1 * (right - left)
    cropped = grace[int(top - grow):int(bottom + grow), int(left - grow):int(right + grow)]
    tight = cv2.cvtColor(cropped, cv2.COLOR_RGB2BGR)
    onset, apex = tmp_path / "onset.png", tmp_path / "apex.png"
    for path in (onset, apex):
        cv2.imwrite(str(path), tight)
    raw = RawFrames([FrameJob("s1/clip", onset, apex)], face.default_predictor_path(),
                    face.cnn_detector_path(""))
    for margin, warned in ((0.0, False), (0.15, True)):
        caplog.clear()
        recrop(raw, FRAMES_PARAMS | {"margin": margin, "detectors": list(face.DETECTORS)}, "wider_crop",
               workers=1)
        lines = [r.getMessage() for r in caplog.records if "past the frame's edge" in r.getMessage()]
        assert bool(lines) == warned, (margin, lines)
    assert lines[0].startswith("wider_crop: 1 sample(s)") and "s1/clip" in lines[0]


def test_cnn_run_here_then_in_workers_does_not_hang() -> None:
    # dlib's CNN run in this process, then in pool workers: forked ones would wait forever for the
    # threads of its pool (a stage never does this, a notebook may); in a subprocess, with a timeout
    script = (
        "import functools, numpy as np\n"
        "from mer import face\n"
        "from mer.common import parallel_map\n"
        "image = np.full((240, 320, 3), 128, np.uint8)\n"
        "find = functools.partial(face.find_face, detect_width=320, upsample=0, detectors=['cnn'])\n"
        "assert find(image) is None\n"
        "print(parallel_map(find, [image, image], 2, 'cnn'))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0 and "[None, None]" in done.stdout, done.stderr[-2000:]


def test_landmarks_fall_back_to_the_frames_box() -> None:
    blank = np.full((224, 224, 3), 128, np.uint8)
    box = np.array([40, 40, 184, 184], np.float32)
    points, source = fit_pair((blank, blank, box), face.default_predictor_path())
    assert source == "frames_box" and points.shape == (51, 4)


@pytest.mark.parametrize("bad", [[], ["cnn", "hog"], ["hog", "hog"], ["hog", "mtcnn"], "hog", None])
def test_check_detectors(bad: object) -> None:
    assert face.check_detectors(["hog", "cnn"], "frames.detectors") == ("hog", "cnn")
    with pytest.raises(PipelineError, match="frames.detectors is .*: a non-empty list out of hog, "
                                            "hog_upsampled, cnn, in that order"):
        face.check_detectors(bad, "frames.detectors")


def test_detector_counts_and_cnn_path() -> None:
    assert face.detector_counts(np.array(["hog", "cnn", "hog", "frames_box"])) == "hog 2, cnn 1, frames_box 1"
    assert face.cnn_detector_path("").name == face.CNN_FILE
    with pytest.raises(PipelineError, match="landmarks.cnn_detector"):
        face.cnn_detector_path("models/none.dat")


def _face_points(image: np.ndarray, predictor: Path) -> np.ndarray:
    """dlib's 68 points of the face HOG finds in `image` (detected at up to 320 px wide)."""
    return face.landmarks68(image, face.find_face(image, 320, 1)[0], predictor)


def _write_samm(root: Path, frame: np.ndarray) -> Path:
    """A SAMM tree in the published layout: notes above the header of sheet MICRO_ONLY, frames
    `root/<subject>/<Filename>/<subject>_<frame:05d>.jpg`, grey, 2040×1088 (two clips, same frame)."""
    columns = ["Subject", "Filename", "Inducement Code", "Onset Frame", "Apex Frame", "Offset Frame",
               "Duration", "Micro", "Action Units", "Estimated Emotion", "Objective Classes", "Notes"]
    rows = [["006", "006_1_2", 1, 5562, 5588, 5600, 39, 1, "12", "Happiness", 1, ""],
            ["007", "007_3_1", 3, 4000, 4010, 4030, 31, 1, "4", "Anger", 4, ""]]
    notes = [["SAMM micro-movement coding (test copy)"] + [""] * 11, [""] * 12]
    labels = root / "SAMM_Micro_FACS_Codes_v2.xlsx"
    sheet = pd.DataFrame(notes + [columns] + rows)
    sheet.to_excel(labels, sheet_name="MICRO_ONLY", header=False, index=False)
    for subject, clip, _, onset, apex, *_ in rows:
        (root / subject / clip).mkdir(parents=True)
        for number in (onset, apex):  # the frames `frames` reads
            cv2.imwrite(str(root / subject / clip / f"{subject}_{number:05d}.jpg"), frame)
    return labels


def test_frames_level_and_fill_a_real_face_in_samm_frames(tmp_path: Path, grace: np.ndarray) -> None:
    """Real face, SAMM's layout and frame size: a tilted head in a 2040×1088 grey frame comes out
    of `frames` (params.yaml's settings) eyes level, the face filling the crop, grey on three channels."""
    tilt = 8.0  # degrees
    head = cv2.resize(cv2.cvtColor(grace, cv2.COLOR_RGB2GRAY), None, fx=1.8, fy=1.8)  # face ~410 px wide
    frame = np.full((1088, 2040), 70, np.uint8)
    top, left = (1088 - head.shape[0]) // 2, (2040 - head.shape[1]) // 2
    frame[max(top, 0):top + head.shape[0], left:left + head.shape[1]] = head[max(-top, 0):1088 - top]
    frame = cv2.warpAffine(frame, cv2.getRotationMatrix2D((1020, 544), tilt, 1.0), (2040, 1088),
                           borderMode=cv2.BORDER_REPLICATE)
    labels = _write_samm(tmp_path, frame)
    frames_params = load_params(REPO / "params.yaml")["frames"]
    predictor = face.default_predictor_path()

    arrays, no_face = extract_frames(Samm(tmp_path, labels=labels), frames_params, predictor, workers=1)

    assert no_face == [] and arrays["sample"].tolist() == ["006_1_2", "007_3_1"]
    crop = round_uint8(arrays["onset"][0])
    assert crop.shape == (224, 224, 3) and np.array_equal(crop[..., 0], crop[..., 2])
    points = _face_points(crop, predictor)
    before = _face_points(cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB), predictor)
    tilt_before, tilt_after = (pts[face.RIGHT_EYE].mean(0)[1] - pts[face.LEFT_EYE].mean(0)[1]
                               for pts in (before, points))
    assert abs(tilt_before) > 15 and abs(tilt_after) < 2  # eye heights, px: the frame's head is tilted
    kept = points[face.KEPT]
    assert np.ptp(kept[:, 0]) > 0.7 * 224  # the 51 points span most of the crop (at margin 0.15: 0.6)


@pytest.mark.parametrize("photo", ["grace", "astronaut"])
def test_the_crop_frames_the_face_whichever_detector_found_it(photo: str, grace: np.ndarray) -> None:
    """The crop is set by the landmarks, not by the detector's box: on Grace Hopper the CNN's box is
    23% smaller than HOG's, and a box-based crop zoomed in by that much."""
    image = grace if photo == "grace" else data.astronaut()
    predictor = face.default_predictor_path()
    kept = {}
    for step in ("hog", "cnn"):
        crop = align_pair(image, image, 224, 0.0, 320, 1, predictor, detectors=[step])
        assert crop["detector"] == step
        kept[step] = _face_points(round_uint8(crop["onset"]), predictor)[face.KEPT]
    assert np.abs(kept["hog"] - kept["cnn"]).mean() < 3  # crop pixels
