"""Stage `frames` (dvc.yaml): label spreadsheet → onset and apex frames → aligned face crops.

The algorithm lives in mer/frames.py; this module reads params and paths, calls it, writes the outputs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from mer import face
from mer.common import (
    PipelineError,
    atomic_path,
    load_params,
    package_versions,
    run_main,
    stage_paths,
    write_h5,
)
from mer.datasets import dataset_from_params, unwatched_label_files
from mer.frames import extract_frames

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> None:
    paths = stage_paths("frames", ["out", "no_face"], argv)
    params = load_params()
    data = params["data"]
    if params["frames"]["on_no_face"] not in ("fail", "skip"):
        raise PipelineError(f"frames.on_no_face is {params['frames']['on_no_face']!r}: use fail or skip")
    detectors = face.check_detectors(params["frames"]["detectors"], "frames.detectors")
    dataset = dataset_from_params(data)
    for path in unwatched_label_files(dataset, data["root"]):
        log.warning("%s is outside data.root %s, the folder DVC watches for this stage: an edit of it "
                    "will not rerun anything (run `dvc repro -f frames` after one), unless a copy or a link "
                    "of it lies in data.root", path, data["root"])
    predictor_file = face.predictor_path(params["landmarks"]["predictor"])
    # resolved up front so a bad path fails before any work; the model loads only if HOG misses
    cnn_file = face.cnn_detector_path(params["landmarks"]["cnn_detector"]) if "cnn" in detectors else None
    arrays, no_face = extract_frames(dataset, params["frames"], predictor_file, params["workers"], cnn_file)
    attrs = {
        "dataset": dataset.name,
        "classes": list(dataset.classes),
        "label_fixes": list(dataset.fixes_applied),
        "params": {"data": data, "frames": params["frames"]},
        "versions": package_versions(),
    }
    write_h5(paths.out, arrays, attrs)
    with atomic_path(paths.no_face) as tmp:
        tmp.write_text(json.dumps({"skipped_no_face": no_face}, indent=2) + "\n")
    print(f"frames: {len(arrays['label'])} samples of {dataset.name} -> {paths.out}; face found by "
          f"{face.detector_counts(arrays['detector'])}"
          + (f" ({len(no_face)} without a face skipped, see {paths.no_face})" if no_face else ""))


if __name__ == "__main__":
    run_main(main)
