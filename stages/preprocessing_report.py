"""Stage `preprocessing_report` (dvc.yaml): each preprocessing variant's linear probes, before any training ->
metrics/preprocessing.json + .png.

The algorithm lives in mer/preprocessing_report.py; this module reads params and paths, calls it, writes the
outputs.
"""

from __future__ import annotations

from collections.abc import Sequence

from mer.common import (
    class_names,
    load_params,
    read_h5,
    run_main,
    save_figure,
    stage_paths,
)
from mer.metrics import write_json
from mer.preprocessing_report import RawFrames, plot_report, preprocessing_report, raw_frames
from mer.processed import check_same_samples


def main(argv: Sequence[str] | None = None) -> None:
    paths = stage_paths("preprocessing_report", ["frames", "landmarks", "out", "plot"], argv)
    params = load_params()
    frames, attrs = read_h5(paths.frames, ["onset", "apex", "label", "subject", "sample"])
    landmarks, _ = read_h5(paths.landmarks, ["landmarks", "sample"])
    check_same_samples(paths.landmarks, landmarks["sample"], paths.frames, frames["sample"])

    def raw() -> RawFrames:  # read only where a variant re-crops (sets `frames` keys)
        return raw_frames(params, frames["subject"], frames["sample"])

    report = preprocessing_report({**frames, "landmarks": landmarks["landmarks"]}, class_names(attrs), params,
                                  params["workers"], raw)
    write_json(paths.out, report)
    save_figure(plot_report(report, attrs["dataset"]), paths.plot)
    print(f"preprocessing_report: {len(report)} variants -> {paths.out}, {paths.plot}")


if __name__ == "__main__":
    run_main(main)
