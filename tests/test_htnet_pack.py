"""benchmarks/htnet_pack.py on a tiny fake HTNet release (random images, never the licensed files):
the packed file has the processed-HDF5 contract (docs/hdf5.md) that `train` and `baselines` read."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from benchmarks import htnet_pack
from mer.common import class_names, read_h5


def fake_release(root: Path) -> None:
    rng = np.random.default_rng(0)
    rows = ["dataset,sub,filename_o,label,apex,imagename,sub_filename",
            "casme2,sub01,EP02_01f,1,,sub01_EP02_01f.jpg,",
            "samm,006,006_1_2,0,,006_006_1_2.jpg,",
            "samm,006,006_1_3,2,,006_006_1_3.jpg,",
            "samm,7,007_5_1,1,,007_007_5_1.jpg,"]
    (root / htnet_pack.FACES_DIR).mkdir(parents=True)
    (root / htnet_pack.FLOW_DIR).mkdir(parents=True)
    (root / htnet_pack.CSV_NAME).write_text("\n".join(rows) + "\n")
    for row in rows[1:]:
        name = row.split(",")[5]
        face = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
        cv2.imwrite(str(root / htnet_pack.FACES_DIR / name), face)
        flow = np.zeros((28, 28, 3), np.uint8)  # RGB: u, v, strain
        flow[..., 0] = 255  # u at its maximum, v at its minimum
        cv2.imwrite(str(root / htnet_pack.FLOW_DIR / f"{Path(name).stem} .png"), flow[..., ::-1])


def test_pack_keeps_one_dataset_and_the_contract(tmp_path: Path) -> None:
    fake_release(tmp_path)
    out = tmp_path / "samm.h5"
    htnet_pack.main(["--source", str(tmp_path), "--out", str(out), "--workers", "1"])
    arrays, attrs = read_h5(out)
    assert attrs["dataset"] == "samm"
    assert class_names(attrs) == ["negative", "positive", "surprise"]
    assert list(arrays["subject"]) == ["samm_006", "samm_006", "samm_007"]
    assert list(arrays["label"]) == [0, 2, 1]  # HTNet 0 negative, 1 positive, 2 surprise
    assert arrays["onset"].shape == arrays["apex"].shape == (3, 224, 224, 3)
    assert arrays["onset"].dtype == np.uint8
    assert arrays["flow"].shape == (3, 224, 224, 2) and arrays["flow"].dtype == np.float32
    np.testing.assert_allclose(arrays["flow"][..., 0], 2.0)  # (255 / 255 - 0.5) * 4
    np.testing.assert_allclose(arrays["flow"][..., 1], -2.0)
    lm = arrays["landmarks"]
    assert lm.shape == (3, 51, 4) and lm.dtype == np.float32
    np.testing.assert_array_equal(lm[..., :2], lm[..., 2:])  # onset = apex
    assert set(arrays["detector"]) <= {"hog", "hog_upsampled", "cnn", "whole_crop"}
