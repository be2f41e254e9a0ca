"""Pack HTNet's preprocessed MEGC2019 samples into the processed-HDF5 contract (docs/hdf5.md).

Where the data comes from: HTNet's public repository (github.com/wangzhifengharrison/HTNet)
publishes the MEGC2019 composite already preprocessed, one apex frame per sample:

- `combined_3_class2_for_optical_flow.csv`: `dataset` (casme2 | samm | smic), `sub`, `filename_o`,
  `label` (0 negative, 1 positive, 2 surprise), `imagename`;
- `datasets/combined_datasets_whole/<imagename>`: a 224x224 apex face crop (JPEG);
- `datasets/STSNet_whole_norm_u_v_os/<imagename without .jpg> .png` (note the space): STSTNet's
  28x28 optical-flow image, R = u, G = v, B = optical strain, each channel min-max normalised to
  0-255 per image.

These files derive from licensed datasets (CASME II, SAMM, SMIC): they, and the HDF5 this script
writes, must never enter git, tests or CI (docs/sharing.md). Get them with
`git clone https://github.com/wangzhifengharrison/HTNet` and point `--source` at the clone.

The packed file reads as `stages.train` and `stages.baselines` expect: `onset` = `apex` = the crop
(RGB; the apex is not magnified), `flow` = (u, v) resized to 224 and mapped to
(value / 255 - 0.5) * 4 crop pixels (the per-image normalisation leaves no true zero; the model and
the probes remove each sample's median flow), `landmarks` = dlib's 51 points on the apex crop, used
for onset and apex alike. Subjects are prefixed as our readers write them (`samm_006`).
SAMM (the default) is the development set; the CASME II and SMIC parts are kept as a held-out check.

    python -m benchmarks.htnet_pack --source /path/to/HTNet --dataset samm --out /tmp/htnet_samm.h5
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from mer import face
from mer.common import PipelineError, package_versions, parallel_map, run_main, write_h5
from mer.datasets import MEGC2019_CLASSES, normalise_subject

CSV_NAME = "combined_3_class2_for_optical_flow.csv"
FACES_DIR = Path("datasets/combined_datasets_whole")
FLOW_DIR = Path("datasets/STSNet_whole_norm_u_v_os")
DATASETS = ("samm", "casme2", "smic")
SIZE = 224  # frames.size: the model's crop side
FLOW_SCALE = 4.0  # (value / 255 - 0.5) * FLOW_SCALE: 0..255 -> -2..2 crop pixels


def read_table(source: Path, dataset: str) -> pd.DataFrame:
    """The label rows of one member dataset, in the csv's order."""
    table = pd.read_csv(source / CSV_NAME, dtype=str)
    rows = table[table["dataset"].str.strip().str.lower() == dataset].reset_index(drop=True)
    if rows.empty:
        raise PipelineError(f"{source / CSV_NAME} has no rows of dataset {dataset!r}")
    return rows


def read_face(path: Path) -> np.ndarray:
    """224x224x3 uint8 RGB apex crop."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise PipelineError(f"{path} is missing or unreadable")
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.shape[:2] != (SIZE, SIZE):
        image = cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    return image


def read_flow(path: Path) -> np.ndarray:
    """224x224x2 float32 (u, v) from an STSTNet flow image (R = u, G = v, B = strain, dropped)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise PipelineError(f"{path} is missing or unreadable")
    uv = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)[..., :2].astype(np.float32)
    uv = cv2.resize(uv, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)
    return (uv / 255.0 - 0.5) * FLOW_SCALE


def fit_landmarks(image: np.ndarray, predictor_file: Path) -> tuple[np.ndarray, str]:
    """51x2 dlib points on the crop and the detector step that found the face (`whole_crop`: none
    did, the crop itself is the box)."""
    found = face.find_face(image, detect_width=image.shape[1], upsample=1)
    whole = np.array([0, 0, SIZE - 1, SIZE - 1], dtype=np.float64)
    box, source = (whole, "whole_crop") if found is None else found
    return face.landmarks68(image, box, predictor_file)[face.KEPT], source


def pack(source: Path, dataset: str, workers: int = 0) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays and attributes of the processed file for one member dataset of HTNet's release."""
    rows = read_table(source, dataset)
    names = [str(name).strip() for name in rows["imagename"]]
    faces = np.stack([read_face(source / FACES_DIR / name) for name in names])
    flow = np.stack([read_flow(source / FLOW_DIR / f"{Path(name).stem} .png") for name in names])
    predictor_file = face.predictor_path("")
    face.predictor(predictor_file)  # load once; forked workers inherit it
    work = functools.partial(fit_landmarks, predictor_file=predictor_file)
    fitted = parallel_map(work, list(faces), workers, desc="landmarks")
    points = np.stack([p for p, _ in fitted]).astype(np.float32)
    classes = sorted(MEGC2019_CLASSES)  # our 3-class names and order (mer/datasets.py)
    emotion = np.array([MEGC2019_CLASSES[int(label)] for label in rows["label"]])
    arrays = {
        "onset": faces,
        "apex": faces,
        "flow": flow.astype(np.float32),
        "landmarks": np.concatenate([points, points], axis=2),  # x_onset, y_onset, x_apex, y_apex
        "label": np.array([classes.index(e) for e in emotion], dtype=np.int64),
        "subject": np.array([normalise_subject(dataset, sub) for sub in rows["sub"]]),
        "sample": np.array([str(s).strip() for s in rows["filename_o"]]),
        "emotion": emotion,
        "detector": np.array([s for _, s in fitted]),
    }
    attrs = {
        "dataset": dataset,
        "classes": classes,
        "label_fixes": [],
        "apex_frame": "HTNet's apex crop, not magnified; onset = apex (flow: STSTNet's, onset -> apex)",
        "params": {"source": "HTNet combined_datasets_whole + STSNet_whole_norm_u_v_os",
                   "flow": f"(value / 255 - 0.5) * {FLOW_SCALE}, 28 -> {SIZE} bilinear",
                   "landmarks": {"predictor": "", "fitted_on": "apex crop"}},
        "versions": package_versions(),
    }
    return arrays, attrs


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.htnet_pack",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="folder of HTNet's files (a clone)")
    parser.add_argument("--dataset", choices=DATASETS, default="samm")
    parser.add_argument("--out", type=Path, required=True, help="processed HDF5 to write (outside git)")
    parser.add_argument("--workers", type=int, default=0, help="landmark processes; 0 = every core")
    args = parser.parse_args(argv)
    arrays, attrs = pack(args.source, args.dataset, args.workers)
    write_h5(args.out, arrays, attrs)
    counts = np.bincount(arrays["label"], minlength=len(attrs["classes"]))
    found = face.detector_counts(list(arrays["detector"]))
    n_subjects = len(set(arrays["subject"]))
    print(f"htnet_pack: {args.dataset} {len(arrays['label'])} samples, {n_subjects} subjects, "
          + ", ".join(f"{c} {n}" for c, n in zip(attrs["classes"], counts))
          + f"; faces: {found} -> {args.out}")
    print(json.dumps({"flow_abs_mean": float(np.abs(arrays["flow"]).mean())}))


if __name__ == "__main__":
    run_main(main)
