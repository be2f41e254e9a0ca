"""Stage `landmarks` (dvc.yaml): dlib's 51 non-jaw landmarks on the onset and apex crops.

The algorithm lives in mer/landmarks.py; this module reads params and paths, calls it, writes the outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

from mer import face
from mer.common import load_params, package_versions, read_h5, run_main, stage_paths, write_h5
from mer.landmarks import detect_landmarks


def main(argv: Sequence[str] | None = None) -> None:
    paths = stage_paths("landmarks", ["frames", "out"], argv)
    params = load_params()
    predictor_file = face.predictor_path(params["landmarks"]["predictor"])
    cnn_file = face.cnn_detector_path(params["landmarks"]["cnn_detector"])
    frames, _ = read_h5(paths.frames, ["onset", "apex", "face_box", "sample"])
    landmarks, sources = detect_landmarks(frames["onset"], frames["apex"], frames["face_box"], predictor_file,
                                          params["workers"], cnn_file)
    write_h5(paths.out, {"landmarks": landmarks, "sample": frames["sample"], "detector": sources},
             {"params": {"landmarks": params["landmarks"]}, "versions": package_versions()})
    print(f"landmarks: {len(landmarks)} × 51 points on onset and apex -> {paths.out}; crop face found by "
          f"{face.detector_counts(sources)}")


if __name__ == "__main__":
    run_main(main)
