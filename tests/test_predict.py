"""`predict` on a tiny model file: the two-image, folder, video and CSV forms give the probabilities the
model gives on the same sample's row of the processed HDF5; the model file; every bad input."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import tomllib
from dataclasses import asdict
from importlib import import_module
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, faceless_frame
from test_bad_input import error_line

from mer import face
from mer.common import read_h5, write_h5
from mer.datasets import Sample, get_dataset
from mer.frames import FrameJob, read_pair
from mer.preprocess import face_models, preprocess_pair
from model import MiHFTr, predict, prepare_batch
from model.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from model.loso import fit_final

ROWS = (0, 1)  # the HDF5 rows predicted; two, so that a mix-up of samples would show


@pytest.fixture(scope="module")
def project(tiny_project: Path) -> dict:
    """The tiny project's params, classes, HDF5 rows and their samples."""
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    with h5py.File(tiny_project / "data" / "processed" / "synthetic.h5") as f:
        rows = {key: f[key][list(ROWS)] for key in ("onset", "apex", "flow", "landmarks")}
        names = list(zip(f["subject"].asstr()[list(ROWS)], f["sample"].asstr()[list(ROWS)]))
        classes = json.loads(f.attrs["classes"])
    dataset = get_dataset("synthetic", tiny_project / "data" / "raw" / "synthetic")
    by_name = {(s.subject, s.sample): s for s in dataset.samples()}
    return {"params": params, "classes": classes, "rows": rows, "samples": [by_name[n] for n in names],
            "dataset": dataset}


@pytest.fixture(scope="module")
def model_file(project: dict, tiny_project: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Path, MiHFTr]:
    """A tiny final model trained by stage `fit`'s code on every row but ROWS (held out), saved as
    `fit` saves it."""
    folder = tmp_path_factory.mktemp("model")
    arrays, attrs = read_h5(tiny_project / "data" / "processed" / "synthetic.h5")
    keep = np.setdiff1d(np.arange(len(arrays["label"])), ROWS)
    write_h5(folder / "train.h5", {k: v[keep] for k, v in arrays.items()}, attrs)
    final = fit_final(project["params"], folder / "train.h5")
    net, card, classes = final.net, final.card, final.classes
    path = folder / "mihf_tr.pt"
    save_checkpoint(path, net, classes, project["params"], card)
    return path, net


def row_probabilities(net: MiHFTr, project: dict, i: int) -> np.ndarray:
    """What the model gives on row ROWS[i] of the processed HDF5."""
    rows = project["rows"]
    batch = prepare_batch(rows["apex"][i:i + 1], rows["flow"][i:i + 1], rows["landmarks"][i:i + 1], "cpu")
    with torch.no_grad():
        return torch.softmax(net(*batch), dim=1)[0].numpy()


def run_predict(argv: list[str], capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    predict.main(argv)
    return json.loads(capsys.readouterr().out)


def assert_matches_row(result: dict, net: MiHFTr, project: dict, i: int) -> None:
    expected = row_probabilities(net, project, i)
    got = np.array([result["probabilities"][c] for c in project["classes"]])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert result["class"] == project["classes"][int(np.argmax(expected))]


def write_video(sample: Sample, dataset, path: Path) -> list[int]:
    """The sample's frames in number order as a lossless FFV1 video; returns the frame numbers."""
    numbers = dataset.frame_numbers(sample)
    frames = [cv2.imread(str(dataset.frame_path(sample, n))) for n in numbers]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 30, frames[0].shape[1::-1])
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    # Lossless, so the video form must equal the HDF5 row exactly; a lossy codec (MJPG, H.264)
    # changes the pixels and with them the prediction, which is then no test of the code path.
    capture = cv2.VideoCapture(str(path))
    decoded = [capture.read()[1] for _ in frames]
    assert all(np.array_equal(a, b) for a, b in zip(frames, decoded))
    return numbers


def test_preprocessing_in_memory_equals_the_hdf5_row(project: dict) -> None:
    faces = face_models(project["params"])
    dataset = project["dataset"]
    for i, s in enumerate(project["samples"]):
        job = FrameJob(s.sample, dataset.frame_path(s, s.onset), dataset.frame_path(s, s.apex))
        sample, timings = preprocess_pair(*read_pair(job), project["params"], faces, s.sample)
        for key, rows in project["rows"].items():
            assert np.array_equal(sample[key], rows[i]), key
        assert list(timings) == ["face_alignment", "magnification", "tvl1", "landmarks"]


@pytest.mark.parametrize("form", ["images", "folder", "video"])
def test_each_form_gives_the_models_output_on_the_hdf5_row(form: str, project: dict, model_file: tuple,
                                                           tmp_path: Path, capsys) -> None:
    path, net = model_file
    dataset, i = project["dataset"], 1
    s = project["samples"][i]
    if form == "images":
        argv = ["--onset", str(dataset.frame_path(s, s.onset)), "--apex", str(dataset.frame_path(s, s.apex))]
    elif form == "folder":  # as copied from a Mac: a resource fork ._<name> beside each frame
        folder = Path(shutil.copytree(s.folder, tmp_path / s.sample))
        for frame in list(folder.iterdir()):
            (folder / f"._{frame.name}").write_bytes(b"\x00\x05\x16\x07")
        argv = ["--clip", str(folder), "--onset", str(s.onset), "--apex", str(s.apex)]
    else:
        numbers = write_video(s, dataset, tmp_path / "clip.avi")
        argv = ["--clip", str(tmp_path / "clip.avi"), "--onset", str(numbers.index(s.onset)),
                "--apex", str(numbers.index(s.apex))]
    result = run_predict([*argv, "--model", str(path)], capsys)
    assert_matches_row(result, net, project, i)
    assert list(result["timings_ms"]) == ["read", "face_alignment", "magnification", "tvl1", "landmarks",
                                          "model", "total"]
    left, top, right, bottom = result["face_box"]
    assert 0 <= left < right <= 640 and 0 <= top < bottom <= 480  # onset-frame pixels
    assert result["crop_outside_frame"] == 0.0  # the whole crop inside the 640×480 frame


def test_face_only_frames_are_warned_of(project: dict, model_file: tuple, tmp_path: Path, capsys,
                                       caplog: pytest.LogCaptureFixture) -> None:
    # frames cut to the face (a tight copy of sample 1's pair): the crop repeats their edges, said on stderr
    dataset, s = project["dataset"], project["samples"][1]
    onset = cv2.imread(str(dataset.frame_path(s, s.onset)))
    (left, top, right, bottom), _ = face.find_face(onset, 640, 1, detectors=["hog"])
    paths = []
    for number in (s.onset, s.apex):
        frame = cv2.imread(str(dataset.frame_path(s, number)))
        paths.append(tmp_path / f"{number}.png")
        cv2.imwrite(str(paths[-1]), frame[int(top):int(bottom), int(left):int(right)])
    result = run_predict(["--onset", str(paths[0]), "--apex", str(paths[1]), "--model", str(model_file[0])],
                         capsys)
    warned = [r.getMessage() for r in caplog.records if "past the frame's edge" in r.getMessage()]
    assert result["crop_outside_frame"] > 0.1
    share = f"{100 * result['crop_outside_frame']:.0f}%"
    assert len(warned) == 1 and f"most: {paths[0]}, {paths[1]}, {share}" in warned[0], warned


def test_csv_of_clips_and_the_explain_picture(project: dict, model_file: tuple, tmp_path: Path,
                                              capsys) -> None:
    path, net = model_file
    (tmp_path / "clips").mkdir()
    table = tmp_path / "clips" / "list.csv"
    with open(table, "w", newline="", encoding="utf-8-sig") as f:  # with a BOM, as Excel's "CSV UTF-8"
        writer = csv.writer(f)
        writer.writerow(["id", "path", "onset", "apex"])
        for i, s in enumerate(project["samples"]):
            writer.writerow([f"clip{i}", s.folder, s.onset, s.apex])
    out = tmp_path / "predictions.csv"
    summary = run_predict(["--csv", str(table), "--out", str(out), "--model", str(path)], capsys)
    assert summary["clips"] == len(ROWS)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["clip0", "clip1"]
    assert all(r["face_found_by"] == "hog" and float(r["crop_outside_frame"]) == 0.0 for r in rows)
    for i, row in enumerate(rows):
        got = np.array([float(row[f"p_{c}"]) for c in project["classes"]])
        np.testing.assert_allclose(got, row_probabilities(net, project, i), rtol=0, atol=1e-6)
    assert not np.allclose(*(row_probabilities(net, project, i) for i in range(2)), atol=1e-4)

    s = project["samples"][0]
    picture = tmp_path / "why.png"
    run_predict(["--clip", str(s.folder), "--onset", str(s.onset), "--apex", str(s.apex),
                 "--model", str(path), "--explain", str(picture)], capsys)
    image = cv2.imread(str(picture))
    assert image is not None and image.shape[0] > 400 and image.std() > 10


def test_model_file_round_trip_and_stable_bytes(project: dict, model_file: tuple, tmp_path: Path) -> None:
    path, net = model_file
    loaded, info = load_checkpoint(path)
    assert not loaded.training
    assert info["format"] == FORMAT and info["classes"] == project["classes"]
    assert info["model_config"] == asdict(net.config)
    assert info["extra"]["epochs"] == project["params"]["train"]["epochs"]
    assert set(info["params"]) == {"data", "frames", "magnify", "flow", "landmarks"}
    assert info["params"]["flow"] == project["params"]["flow"]
    assert "torch" in info["versions"]
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    again = tmp_path / "again.pt"
    save_checkpoint(again, net, project["classes"], project["params"], info["extra"])
    assert again.read_bytes() == path.read_bytes()
    save_checkpoint(again, net, project["classes"], project["params"], {"uf1": np.float64(0.5)})
    assert load_checkpoint(again)[1]["extra"] == {"uf1": 0.5}  # numpy scalars saved as plain numbers


def test_console_script_is_declared() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["mer-predict"].split(":")
    assert getattr(import_module(module), function) is predict.cli


# ---------------------------------------------------------------------------------------------
# Bad input: one `error:` line naming the input and the fix, exit status 2, nothing written.


def other_format(path: Path) -> None:
    ckpt = torch.load(path, weights_only=True)
    torch.save(ckpt | {"format": FORMAT + 1}, path)


def changed_model(path: Path) -> None:
    ckpt = torch.load(path, weights_only=True)
    ckpt["model_config"]["dim"] = 64
    torch.save(ckpt, path)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unreadable image", ["onset.jpg", "not a readable image", "replace the file"]),
        ("float tiff", ["onset.tif", "not a readable image", "float TIFF", "convert it to PNG"]),
        ("missing image", ["nowhere.jpg", "does not exist", "check the path"]),
        ("missing clip", ["nowhere", "does not exist"]),
        ("frame not in folder", ["onset frame 9999", "frames in", "file names"]),
        ("frame past the end of video", ["apex frame 9999", "past the end", "below"]),
        ("not a frame number", ["'x'", "not a frame number"]),
        ("unreadable video", ["clip.avi", "not a video OpenCV can read", "convert"]),
        ("missing model", ["none.pt", "does not exist", "dvc repro fit"]),
        ("corrupt model", ["model.pt", "not a readable model file", "dvc repro fit"]),
        ("other format", ["model.pt", f"format {FORMAT + 1}", "dvc repro fit"]),
        ("incompatible model", ["model.pt", "does not fit", "dvc repro fit"]),
        ("bad csv columns", ["list.csv", "path, onset, apex"]),
        ("csv row longer than its header", ["list.csv line 2", "4 fields but the header 3", "quote"]),
        ("csv column named as an output", ["list.csv", "['class']", "rename"]),
        ("bad device", ["--device", "'gpu0'", "not a torch device", "cpu"]),
        ("blank apex", ["apex frame", "blank.png", "blank (grey levels 0–0 only)", "another frame number"]),
    ],
)
def test_bad_input(case: str, expected: list[str], project: dict, model_file: tuple, tmp_path: Path,
                   capsys) -> None:
    dataset, s = project["dataset"], project["samples"][0]
    onset, apex = dataset.frame_path(s, s.onset), dataset.frame_path(s, s.apex)
    model = tmp_path / "model.pt"
    model.write_bytes(model_file[0].read_bytes())
    inputs = ["--onset", str(onset), "--apex", str(apex)]
    clip = ["--clip", str(s.folder), "--onset", str(s.onset), "--apex", str(s.apex)]
    if case == "unreadable image":
        (tmp_path / "onset.jpg").write_bytes(b"not a jpeg")
        inputs = ["--onset", str(tmp_path / "onset.jpg"), "--apex", str(apex)]
    elif case == "float tiff":
        cv2.imwrite(str(tmp_path / "onset.tif"), np.random.default_rng(0).random((480, 640, 3), np.float32))
        inputs = ["--onset", str(tmp_path / "onset.tif"), "--apex", str(apex)]
    elif case == "missing image":
        inputs = ["--onset", str(tmp_path / "nowhere.jpg"), "--apex", str(apex)]
    elif case == "missing clip":
        inputs = ["--clip", str(tmp_path / "nowhere"), "--onset", "0", "--apex", "1"]
    elif case == "frame not in folder":
        inputs = [*clip[:3], "9999", "--apex", str(s.apex)]
    elif case == "frame past the end of video":
        write_video(s, dataset, tmp_path / "clip.avi")
        inputs = ["--clip", str(tmp_path / "clip.avi"), "--onset", "0", "--apex", "9999"]
    elif case == "not a frame number":
        inputs = [*clip[:3], "x", "--apex", str(s.apex)]
    elif case == "unreadable video":
        (tmp_path / "clip.avi").write_bytes(b"not a video")
        inputs = ["--clip", str(tmp_path / "clip.avi"), "--onset", "0", "--apex", "1"]
    elif case == "missing model":
        model = tmp_path / "none.pt"
    elif case == "corrupt model":
        model.write_bytes(b"PK\x03\x04 not a model")
    elif case == "other format":
        other_format(model)
    elif case == "incompatible model":
        changed_model(model)
    elif case == "bad csv columns":
        (tmp_path / "list.csv").write_text("clip,first,peak\na,1,2\n")
        inputs = ["--csv", str(tmp_path / "list.csv"), "--out", str(tmp_path / "out.csv")]
    elif case == "csv row longer than its header":
        (tmp_path / "list.csv").write_text(f"path,onset,apex\n{s.folder},{s.onset},{s.apex},surprise\n")
        inputs = ["--csv", str(tmp_path / "list.csv"), "--out", str(tmp_path / "out.csv")]
    elif case == "csv column named as an output":
        (tmp_path / "list.csv").write_text(f"path,onset,apex,class\n{s.folder},{s.onset},{s.apex},surprise\n")
        inputs = ["--csv", str(tmp_path / "list.csv"), "--out", str(tmp_path / "out.csv")]
    elif case == "blank apex":  # a dropped frame
        cv2.imwrite(str(tmp_path / "blank.png"), np.zeros((480, 640, 3), np.uint8))
        inputs = ["--onset", str(onset), "--apex", str(tmp_path / "blank.png")]
    elif case == "bad device":
        inputs = [*inputs, "--device", "gpu0"]
    out = ["--explain", str(tmp_path / "out.png")] if "--csv" not in inputs else []
    before = set(tmp_path.iterdir())
    line = error_line(lambda: predict.main([*inputs, *out, "--model", str(model)]), capsys)
    for text in expected:
        assert text in line
    assert set(tmp_path.iterdir()) == before  # no picture, no CSV, no temp file


def test_no_face_from_the_command_line(model_file: tuple, tmp_path: Path) -> None:
    """In a process of its own: after dlib's CNN detector (the last step of the face chain) has run in a
    process, forked workers that run it hang, and test_bad_input forks the frames stage's workers."""
    for name in ("blank0.png", "blank1.png"):  # no face, but not blank (a blank frame is refused first)
        cv2.imwrite(str(tmp_path / name), faceless_frame())
    before = set(tmp_path.iterdir())
    argv = ["--onset", str(tmp_path / "blank0.png"), "--apex", str(tmp_path / "blank1.png"),
            "--model", str(model_file[0]), "--explain", str(tmp_path / "out.png")]
    result = subprocess.run([sys.executable, "-m", "model.predict", *argv], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "blank0.png" in result.stderr and "no face found" in result.stderr, result.stderr
    assert set(tmp_path.iterdir()) == before
