"""`predict` (console script `mer-predict`): classify new clips with the final model of stage `fit`.

    python -m model.predict --onset a.jpg --apex b.jpg               # two images
    python -m model.predict --clip FOLDER --onset 46 --apex 59       # frame numbers as in the file names
    python -m model.predict --clip clip.mp4 --onset 0 --apex 12      # a video: 0-based frame indices
    python -m model.predict --csv clips.csv --out predictions.csv    # many clips
    ... --explain out.png                                             # one clip: a picture of why

A clip goes through the pipeline's own per-sample code (mer/preprocess.py) with the params stored in
the model file, so it is preprocessed exactly as the training data was. One clip prints JSON: class,
probabilities, face box (onset-frame pixels: left, top, right, bottom) and milliseconds per step.
Not a pipeline stage: changing this file reruns nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from mer.common import PipelineError, atomic_path, run_main, save_figure, single_threaded
from mer.datasets import IMAGE_SUFFIXES, is_system_file
from mer.frames import FrameJob, check_not_blank, read_pair, warn_past_edge
from mer.preprocess import FaceModels, face_models, preprocess_pair
from model import prepare_batch
from model.checkpoint import load_checkpoint
from model.lamif import SCSA
from model.mihf_tr import MiHFTr
from model.training import resolve_device

DEFAULT_MODEL = Path("models/mihf_tr.pt")
CLIP_COLUMNS = ("path", "onset", "apex")
IMAGE_COLUMNS = ("onset_image", "apex_image")
BOX_COLUMNS = ("face_left", "face_top", "face_right", "face_bottom")
FACE_COLUMNS = (*BOX_COLUMNS, "face_found_by", "crop_outside_frame")  # as in one clip's JSON
FIGURE_FORMATS = ("png", "pdf", "svg")


# ---------------------------------------------------------------------------------------------
# Reading one input: two images, a folder of numbered frames, or a video.


def frame_number(text: str, which: str, name: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", str(text)):
        raise PipelineError(f"{name}: {which} {text!r} is not a frame number: with a clip, give "
                            "--onset/--apex as whole numbers >= 0")
    return int(text)


def folder_frames(folder: Path, name: str) -> dict[int, Path]:
    """Image files of `folder` by the number in their name (the last run of digits: img46.jpg → 46)."""
    numbered: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        digits = re.findall(r"\d+", path.stem)
        if not (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and digits) or is_system_file(path):
            continue
        number = int(digits[-1])
        if number in numbered:
            raise PipelineError(f"{name}: {numbered[number].name} and {path.name} in {folder} are both frame "
                                f"{number}: keep one of them")
        numbered[number] = path
    if not numbered:
        raise PipelineError(f"{name}: no numbered image files in {folder}: give a folder of frames "
                            "named like img46.jpg, or a video file")
    return dict(sorted(numbered.items()))


def read_folder(folder: Path, onset: int, apex: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    frames = folder_frames(folder, name)
    for which, number in (("onset", onset), ("apex", apex)):
        if number not in frames:
            first, last = next(iter(frames)), next(reversed(frames))
            raise PipelineError(f"{name}: {which} frame {number} is not among the {len(frames)} frames in "
                                f"{folder} ({first}–{last}): give numbers as in the file names")
    return read_pair(FrameJob(name, frames[onset], frames[apex]))


def read_video(path: Path, onset: int, apex: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Frames `onset` and `apex` (0-based) of a video, decoded in order (seeking is not exact in
    every codec)."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise PipelineError(f"{name}: {path} is not a video OpenCV can read: convert it (e.g. to .mp4) "
                            "or give a folder of frames")
    frames: dict[int, np.ndarray] = {}
    index = 0
    try:
        while index <= max(onset, apex) and capture.grab():
            if index in (onset, apex):
                ok, frame = capture.retrieve()
                if not ok:
                    raise PipelineError(f"{name}: frame {index} of {path} cannot be decoded: re-encode "
                                        "the video or give a folder of frames")
                frames[index] = check_not_blank(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), name,
                                                f"frame {index} of {path}")
            index += 1
    finally:
        capture.release()
    for which, number in (("onset", onset), ("apex", apex)):
        if number not in frames:
            raise PipelineError(f"{name}: {which} frame {number} is past the end of {path} ({index} frames): "
                                f"give 0-based frame indices below {index}")
    return frames[onset], frames[apex]


def read_input(clip: str | None, onset: str, apex: str, name: str,
               base: Path = Path()) -> tuple[np.ndarray, np.ndarray]:
    """Onset and apex frames, RGB uint8: image files `onset`/`apex`, or those frames of `clip`
    (a folder or a video). Relative paths are taken from `base`."""
    if clip is None:
        return read_pair(FrameJob(name, base / onset, base / apex))
    path = base / clip
    onset_number, apex_number = frame_number(onset, "onset", name), frame_number(apex, "apex", name)
    if path.is_dir():
        return read_folder(path, onset_number, apex_number, name)
    if path.is_file():
        return read_video(path, onset_number, apex_number, name)
    raise PipelineError(f"{name}: clip {path} does not exist: give a folder of frames or a video file")


# ---------------------------------------------------------------------------------------------
# Prediction.


def load_model(path: Path | str, device: str) -> tuple[MiHFTr, dict[str, Any], FaceModels]:
    """Model, its file's fields, and the face models its params name, all loaded (not timed per clip)."""
    net, info = load_checkpoint(path, resolve_device(device, "--device"))
    return net, info, face_models(info["params"])


def probabilities(net: MiHFTr, sample: dict[str, np.ndarray]) -> np.ndarray:
    """Class probabilities of one preprocessed sample (the arrays of one processed-HDF5 row)."""
    device = next(net.parameters()).device
    apex, flow, landmarks = prepare_batch(sample["apex"][None], sample["flow"][None],
                                          sample["landmarks"][None], device)
    with torch.inference_mode():
        return torch.softmax(net(apex, flow, landmarks).float(), dim=1)[0].cpu().numpy()


def predict_frames(net: MiHFTr, info: dict[str, Any], faces: FaceModels, onset: np.ndarray,
                   apex: np.ndarray, name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(JSON-ready result without the read time, the preprocessed sample) of one onset/apex pair."""
    # torch on one thread: its second thread made the model ~10x slower whenever another process held
    # a core (docs/benchmarks.md). OpenCV keeps its threads: TV-L1, 3/4 of a prediction, runs on every
    # core, and gives the same bytes as the stages' one-thread workers (tests/test_predict.py).
    with single_threaded(torch.get_num_threads, torch.set_num_threads):
        sample, timings = preprocess_pair(onset, apex, info["params"], faces, name)
        start = time.perf_counter()
        probs = probabilities(net, sample)
        timings["model"] = 1000 * (time.perf_counter() - start)
    classes = info["classes"]
    result = {
        "class": classes[int(np.argmax(probs))],
        "probabilities": {c: float(p) for c, p in zip(classes, probs)},
        "face_box": [round(float(v), 1) for v in sample["frame_box"]],
        "face_found_by": sample["detector"],
        "crop_outside_frame": round(sample["outside"], 3),  # past the frame's edge, filled by repeating it
        "timings_ms": timings,
    }
    return result, sample


def predict_input(net: MiHFTr, info: dict[str, Any], faces: FaceModels, clip: str | None, onset: str,
                  apex: str, name: str, base: Path = Path()) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """predict_frames of one input as read_input takes it, with the read time first in the timings."""
    start = time.perf_counter()
    frames = read_input(clip, onset, apex, name, base)
    read_ms = 1000 * (time.perf_counter() - start)
    result, sample = predict_frames(net, info, faces, *frames, name)
    timings = {"read": read_ms} | result["timings_ms"]
    result["timings_ms"] = {k: round(v, 1) for k, v in (timings | {"total": sum(timings.values())}).items()}
    return result, sample


# ---------------------------------------------------------------------------------------------
# Many clips from a CSV.


def csv_inputs(path: Path) -> tuple[list[str], list[tuple[dict[str, str], str | None, str, str]]]:
    """The header, and (row, clip, onset, apex) per row: columns path, onset, apex (a clip and its
    frame numbers) or onset_image, apex_image (two images). Every row is checked before any work."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(f)
            rows, header = list(reader), list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise PipelineError(f"{path} is not a readable CSV ({err}): give a CSV with a header row") from err
    if all(c in header for c in CLIP_COLUMNS):
        columns, clip_column = CLIP_COLUMNS[1:], CLIP_COLUMNS[0]
    elif all(c in header for c in IMAGE_COLUMNS):
        columns, clip_column = IMAGE_COLUMNS, None
    else:
        raise PipelineError(f"{path} has columns {header}: give either {', '.join(CLIP_COLUMNS)} or "
                            f"{', '.join(IMAGE_COLUMNS)}, one clip per row")
    clash = [c for c in header if c == "class" or c.startswith("p_") or c in FACE_COLUMNS]
    if clash:
        raise PipelineError(f"{path} has input columns {clash}, names the predictions are written under: "
                            "rename them")
    inputs = []
    for line, row in enumerate(rows, start=2):
        if None in row:  # csv.DictReader keeps a row's fields beyond the header under None
            fields = len(header) + len(row[None])
            raise PipelineError(f"{path} line {line} has {fields} fields but the header {len(header)}: "
                                "quote fields that hold commas, or name every column")
        empty = [c for c in (*columns, clip_column) if c and not (row.get(c) or "").strip()]
        if empty:
            raise PipelineError(f"{path} line {line}: {', '.join(empty)} is empty: fill it or drop the row")
        clip = row[clip_column].strip() if clip_column else None
        inputs.append((row, clip, row[columns[0]].strip(), row[columns[1]].strip()))
    return header, inputs


def predict_csv(net: MiHFTr, info: dict[str, Any], faces: FaceModels, csv_path: Path,
                out: Path) -> int:
    """Predict every row of `csv_path` (relative paths from its folder); write the rows plus class,
    p_<class>, face box, the face-finding step and the crop's share past the frame's edge to `out`
    only once all succeeded. Returns the number of clips."""
    header, inputs = csv_inputs(csv_path)
    classes = info["classes"]
    rows, names, outside = [], [], []
    bar = tqdm(inputs, desc="predict", unit="clip", disable=len(inputs) < 2)
    for line, (row, clip, onset, apex) in enumerate(bar, start=2):
        names.append(f"{csv_path} line {line}")
        result, _ = predict_input(net, info, faces, clip, onset, apex, names[-1], csv_path.parent)
        outside.append(result["crop_outside_frame"])
        rows.append(row | {"class": result["class"]}
                    | {f"p_{c}": f"{result['probabilities'][c]:.6f}" for c in classes}
                    | dict(zip(FACE_COLUMNS, [*result["face_box"], result["face_found_by"],
                                              result["crop_outside_frame"]])))
    warn_past_edge(names, outside)  # once for the file, naming the worst clip
    fields = [*header, "class", *(f"p_{c}" for c in classes), *FACE_COLUMNS]
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


# ---------------------------------------------------------------------------------------------
# --explain: one picture.


def flow_colours(flow: np.ndarray) -> tuple[np.ndarray, float]:
    """H×W×3 uint8 colour wheel of a flow field (hue: direction, brightness: length) and the length
    that is full brightness (99th percentile, px)."""
    length, angle = cv2.cartToPolar(flow[..., 0], flow[..., 1], angleInDegrees=True)
    top = max(float(np.percentile(length, 99)), 1e-6)
    hsv = np.stack([angle / 2, np.full_like(length, 255), np.clip(length / top, 0, 1) * 255], axis=-1)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB), top


def explain_figure(path: Path, net: MiHFTr, info: dict[str, Any], sample: dict[str, np.ndarray],
                   result: dict[str, Any], title: str) -> None:
    """Onset crop, magnified apex crop, flow, landmarks, class probabilities and the SC-SA weights."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, Agg via savefig

    fig = Figure(figsize=(13, 8.5), layout="constrained")
    (ax_onset, ax_apex, ax_flow), (ax_points, ax_probs, ax_coef) = fig.subplots(2, 3)
    magnify = info["params"]["magnify"]
    ax_onset.imshow(sample["onset"])
    ax_onset.set_title("onset crop")
    ax_apex.imshow(sample["apex"])
    ax_apex.set_title("apex crop" if magnify["method"] == "none"
                      else f"apex crop, magnified ({magnify['method']}, α = {magnify['alpha']})")
    # As the motion stem sees it: minus the median, the head drift of the onset-only alignment.
    flow = sample["flow"] - np.median(sample["flow"], axis=(0, 1))
    colours, top = flow_colours(flow)
    ax_flow.imshow(colours)
    step = max(flow.shape[0] // 16, 1)
    ys, xs = np.mgrid[step // 2:flow.shape[0]:step, step // 2:flow.shape[1]:step]
    ax_flow.quiver(xs, ys, flow[ys, xs, 0], flow[ys, xs, 1], color="white", angles="xy",
                   scale_units="xy", scale=top / step)
    ax_flow.set_title(f"flow − median (hue: direction; full at {top:.2f} px)")
    points = sample["landmarks"]
    ax_points.imshow(sample["onset"], alpha=0.6)
    ax_points.scatter(points[:, 0], points[:, 1], s=12, c="tab:blue", label="onset")
    ax_points.scatter(points[:, 2], points[:, 3], s=12, c="tab:red", marker="x", label="apex")
    ax_points.legend(loc="lower right", fontsize=8)
    ax_points.set_title("51 landmarks (crop pixels)")
    for ax in (ax_onset, ax_apex, ax_flow, ax_points):
        ax.set_axis_off()
    names, probs = list(result["probabilities"]), list(result["probabilities"].values())
    colours = ["tab:red" if n == result["class"] else "tab:grey" for n in names]
    ax_probs.barh(names, probs, color=colours)
    ax_probs.set_xlim(0, 1)
    ax_probs.invert_yaxis()
    ax_probs.set_title(f"class: {result['class']}")
    for i, p in enumerate(probs):
        ax_probs.text(min(p + 0.02, 0.85), i, f"{p:.3f}", va="center")
    if isinstance(net.local_fusion, SCSA):
        coef = {m: float(v.detach()) for m, v in net.local_fusion.coefficients().items()}
        bars = ax_coef.bar(list(coef), list(coef.values()), color="tab:green")
        ax_coef.bar_label(bars, fmt="%.3f")
        ax_coef.set_ylim(0, 1)
        ax_coef.set_title("SC-SA weights (eq. 6)")
    else:
        ax_coef.set_axis_off()
        ax_coef.set_title(f"no SC-SA weights (local fusion: {net.config.local_fusion})")
    fig.suptitle(title)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mer-predict", description="Classify micro-expression clips with the final MiHF-Tr model.")
    parser.add_argument("--onset", help="onset image, or with --clip the onset frame number")
    parser.add_argument("--apex", help="apex image, or with --clip the apex frame number")
    parser.add_argument("--clip", help="folder of numbered frames (numbers as in the file names) or a "
                                       "video file (0-based frame indices)")
    parser.add_argument("--csv", type=Path, help="many clips: columns path, onset, apex, or onset_image, "
                                                 "apex_image; relative paths from the CSV's folder")
    parser.add_argument("--out", type=Path, help="with --csv: the predictions CSV to write")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model file (default: %(default)s)")
    parser.add_argument("--explain", type=Path, help="one clip: write a picture (.png, .pdf or .svg)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.csv is not None:
        if args.out is None or any(v is not None for v in (args.onset, args.apex, args.clip, args.explain)):
            parser.error("--csv takes --out and none of --onset, --apex, --clip, --explain")
    elif args.onset is None or args.apex is None or args.out is not None:
        parser.error("give --onset and --apex (with or without --clip), or --csv with --out")
    if args.explain is not None and args.explain.suffix.lstrip(".").lower() not in FIGURE_FORMATS:
        parser.error(f"--explain {args.explain}: use a .png, .pdf or .svg file name")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    net, info, faces = load_model(args.model, args.device)
    load_ms = round(1000 * (time.perf_counter() - start), 1)
    if args.csv is not None:
        n = predict_csv(net, info, faces, args.csv, args.out)
        print(json.dumps({"clips": n, "out": str(args.out), "model": str(args.model)}))
        return
    name = args.clip or f"{args.onset}, {args.apex}"
    result, sample = predict_input(net, info, faces, args.clip, args.onset, args.apex, name)
    warn_past_edge([name], [result["crop_outside_frame"]])
    if args.explain is not None:
        explain_figure(args.explain, net, info, sample, result,
                       f"{name}" + (f" (onset {args.onset}, apex {args.apex})" if args.clip else ""))
    print(json.dumps({"input": name, "model": str(args.model), "model_load_ms": load_ms} | result, indent=2))


def cli() -> None:
    """Console script `mer-predict`."""
    run_main(main)


if __name__ == "__main__":
    cli()
