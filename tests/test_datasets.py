"""Tests of mer/datasets.py against the real CASME II / SAMM label files and small tmp trees."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, labels_dir

from mer.common import PipelineError
from mer.datasets import (
    DATASETS,
    Casme2,
    Megc2019,
    MicroExpressionDataset,
    Samm,
    Sample,
    Smic,
    Synthetic,
    dataset_from_params,
    fix_table_markdown,
    get_dataset,
    middle_apex,
    normalise_subject,
    unwatched_label_files,
)
from mer.frames import frame_jobs

LABELS_DIR = labels_dir()
CASME2_FILE = LABELS_DIR / "CASME2-coding-20190701.xlsx"
SAMM_FILE = LABELS_DIR / "SAMM_Micro_FACS_Codes_v2.xlsx"
MEGC_FILE = LABELS_DIR / "MEGC2019-combined_3class_gt.csv"

CASME2_3 = {"happiness": "positive", "disgust": "negative", "repression": "negative", "surprise": "surprise"}
SAMM_3 = {"Happiness": "positive", "Anger": "negative", "Contempt": "negative", "Disgust": "negative"}
SAMM_3["Surprise"] = "surprise"


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"real label file {path} not available (set MER_LABELS_DIR)")
    return path


@pytest.fixture
def casme2_labels() -> Path:
    return _need(CASME2_FILE)


@pytest.fixture
def samm_labels() -> Path:
    return _need(SAMM_FILE)


@pytest.fixture
def megc_labels() -> Path:
    return _need(MEGC_FILE)


def _class_counts(ds: MicroExpressionDataset, samples: list[Sample]) -> dict[str, int]:
    return dict(Counter(ds.classes[s.label] for s in samples))


def _subject_counts(samples: list[Sample]) -> dict[str, int]:
    return dict(Counter(s.subject for s in samples))


def _write_sheet(path: Path, rows: list[tuple], columns: list[str] | None = None) -> Path:
    """A CASME II-format coding sheet (csv or xlsx by suffix) for the synthetic/CASME II classes."""
    columns = columns or [
        "Subject",
        "Filename",
        "OnsetFrame",
        "ApexFrame",
        "OffsetFrame",
        "Estimated Emotion",
    ]
    frame = pd.DataFrame(rows, columns=columns)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_excel(path, index=False)
    return path


# ---- CASME II, real file -----------------------------------------------------------------


def test_casme2_3class_counts(tmp_path: Path, casme2_labels: Path) -> None:
    ds = Casme2(tmp_path, labels=casme2_labels)
    samples = ds.samples()
    assert ds.classes == ["negative", "positive", "surprise"]
    assert len(samples) == 150
    assert len({s.subject for s in samples}) == 24
    assert _class_counts(ds, samples) == {"positive": 32, "negative": 90, "surprise": 28}
    assert "casme2_sub10" not in _subject_counts(samples) and "casme2_sub18" not in _subject_counts(samples)

    # subject distribution, derived independently from the raw sheet
    raw = pd.read_excel(casme2_labels, dtype={"Subject": str})
    kept = raw[raw["Estimated Emotion"].isin(CASME2_3)]
    expected = {f"casme2_sub{subject}": n for subject, n in kept["Subject"].value_counts().items()}
    assert _subject_counts(samples) == expected
    # and per class: the raw emotions, mapped
    assert _class_counts(ds, samples) == dict(Counter(kept["Estimated Emotion"].map(CASME2_3)))


def test_casme2_sample_fields(tmp_path: Path, casme2_labels: Path) -> None:
    samples = Casme2(tmp_path, labels=casme2_labels).samples()
    first = samples[0]
    assert first == Sample(
        subject="casme2_sub01",
        sample="EP02_01f",
        folder=tmp_path / "sub01" / "EP02_01f",
        onset=46,  # the sheet's first row: 46 / 59 / 86
        apex=59,
        offset=86,
        emotion="happiness",
        label=1,
    )
    assert samples == sorted(samples, key=lambda s: (s.subject, s.sample))
    assert all(s.onset <= s.apex <= s.offset for s in samples)
    assert all(isinstance(v, int) for s in samples for v in (s.onset, s.apex, s.offset))
    by_name = {(s.subject, s.sample): s for s in samples}
    # apex == offset is valid and left alone
    assert by_name["casme2_sub12", "EP09_06"].apex == by_name["casme2_sub12", "EP09_06"].offset == 111
    assert by_name["casme2_sub25", "EP18_04f"].apex == by_name["casme2_sub25", "EP18_04f"].offset == 116
    # irregular filenames verbatim (the kept rows whose names are not EPdd_dd[f])
    names = {s.sample for s in samples}
    assert {"EP01_2", "EP06_02_01", "EP06_02_02", "EP09f"} <= names


def test_casme2_fixes_repair(tmp_path: Path, casme2_labels: Path, caplog: pytest.LogCaptureFixture) -> None:
    ds = Casme2(tmp_path, labels=casme2_labels)
    with caplog.at_level(logging.WARNING, logger="mer.datasets"):
        samples = ds.samples()
    by_name = {(s.subject, s.sample): s for s in samples}
    ep12 = by_name["casme2_sub04", "EP12_01f"]
    assert (ep12.onset, ep12.apex, ep12.offset) == (261, 291, 321)
    ep09 = by_name["casme2_sub05", "EP09_05f"]
    assert (ep09.onset, ep09.apex, ep09.offset) == (69, 96, 123)
    assert ds.fixes_applied[0] == "casme2 sub04/EP12_01f: apex '/' -> 291 (2014 coding file)"
    assert ds.fixes_applied[1].startswith("casme2 sub05/EP09_05f: apex '69' -> 96 (midpoint")
    assert len(ds.fixes_applied) == 2
    assert sum("label fix" in r.getMessage() for r in caplog.records) == 2
    # fixes_applied is reset on every call
    ds.samples()
    assert len(ds.fixes_applied) == 2


def test_casme2_fixes_drop(tmp_path: Path, casme2_labels: Path) -> None:
    ds = Casme2(tmp_path, labels=casme2_labels, label_defects="drop")
    samples = ds.samples()
    assert len(samples) == 150 - 2
    assert _class_counts(ds, samples) == {"positive": 32, "negative": 88, "surprise": 28}
    names = {s.sample for s in samples}
    assert "EP12_01f" not in names and "EP09_05f" not in names
    assert len(ds.fixes_applied) == 2
    assert all("dropped" in line for line in ds.fixes_applied)


def test_casme2_4class(tmp_path: Path, casme2_labels: Path) -> None:
    ds = Casme2(tmp_path, labels=casme2_labels, classes=4)
    samples = ds.samples()
    assert ds.classes == ["disgust", "positive", "repression", "surprise"]
    assert len(samples) == 150
    assert _class_counts(ds, samples) == {"disgust": 63, "positive": 32, "repression": 27, "surprise": 28}
    three = Casme2(tmp_path, labels=casme2_labels).samples()
    assert [(s.subject, s.sample) for s in samples] == [(s.subject, s.sample) for s in three]


# ---- SAMM, real file ---------------------------------------------------------------------


def test_samm_3class_counts(tmp_path: Path, samm_labels: Path) -> None:
    ds = Samm(tmp_path, labels=samm_labels)
    samples = ds.samples()
    assert ds.classes == ["negative", "positive", "surprise"]
    assert len(samples) == 119
    assert len({s.subject for s in samples}) == 28
    assert _class_counts(ds, samples) == {"positive": 26, "negative": 78, "surprise": 15}

    raw = pd.read_excel(samm_labels, sheet_name="MICRO_ONLY", header=13, dtype={"Subject": str})
    kept = raw[raw["Estimated Emotion"].isin(SAMM_3)]
    expected = {f"samm_{subject}": n for subject, n in kept["Subject"].value_counts().items()}
    assert _subject_counts(samples) == expected
    assert _class_counts(ds, samples) == dict(Counter(kept["Estimated Emotion"].map(SAMM_3)))
    assert all(s.subject.startswith("samm_") and len(s.subject) == len("samm_006") for s in samples)
    assert all(s.onset <= s.apex <= s.offset for s in samples)
    assert samples == sorted(samples, key=lambda s: (s.subject, s.sample))
    first = samples[0]
    assert (first.subject, first.sample, first.emotion) == ("samm_006", "006_1_2", "Anger")
    assert first.folder == tmp_path / "006" / "006_1_2"


def test_samm_fixes_repair(tmp_path: Path, samm_labels: Path) -> None:
    ds = Samm(tmp_path, labels=samm_labels)
    by_name = {s.sample: s for s in ds.samples()}
    frames = {name: (s.onset, s.apex, s.offset) for name, s in by_name.items()}
    assert frames["028_4_1"] == (1071, 1134, 1134)
    assert frames["032_3_1"] == (4896, 4930, 4970)
    assert frames["032_3_2"] == (5126, 5166, 5207)
    assert len(ds.fixes_applied) == 3
    assert ds.fixes_applied[0].startswith("samm 028/028_4_1: apex '1143' -> 1134 (")
    assert ds.fixes_applied[1].startswith("samm 032/032_3_1: apex '1930' -> 4930 (")
    assert ds.fixes_applied[2].startswith("samm 032/032_3_2: apex '5127' -> 5166 (")


def test_samm_fixes_drop(tmp_path: Path, samm_labels: Path) -> None:
    ds = Samm(tmp_path, labels=samm_labels, label_defects="drop")
    samples = ds.samples()
    assert len(samples) == 119 - 3
    assert _class_counts(ds, samples) == {"positive": 26, "negative": 75, "surprise": 15}
    assert not {"028_4_1", "032_3_1", "032_3_2"} & {s.sample for s in samples}
    assert len(ds.fixes_applied) == 3 and all("dropped" in line for line in ds.fixes_applied)


def test_samm_4class_contempt_with_disgust(tmp_path: Path, samm_labels: Path) -> None:
    ds = Samm(tmp_path, labels=samm_labels, classes=4)
    samples = ds.samples()
    assert ds.classes == ["anger", "disgust", "positive", "surprise"]
    assert len(samples) == 119
    # Contempt (12) goes with Disgust (9): 21
    assert _class_counts(ds, samples) == {"anger": 57, "disgust": 21, "positive": 26, "surprise": 15}
    contempt = [s for s in samples if s.emotion == "Contempt"]
    assert len(contempt) == 12 and {ds.classes[s.label] for s in contempt} == {"disgust"}
    drop = Samm(tmp_path, labels=samm_labels, classes=4, label_defects="drop").samples()
    assert len(drop) == 116


# ---- MEGC2019 composite cross-check ------------------------------------------------------


def test_megc2019_cross_check(
    tmp_path: Path, casme2_labels: Path, samm_labels: Path, megc_labels: Path
) -> None:
    megc = pd.read_csv(megc_labels, header=None, names=["dataset", "subject", "filename", "label"], dtype=str)
    megc_class = {"0": "negative", "1": "positive", "2": "surprise"}
    for name, labels in (("casme2", casme2_labels), ("samm", samm_labels)):
        ds = get_dataset(name, tmp_path, labels)
        ours = {(s.subject, s.sample): ds.classes[s.label] for s in ds.samples()}
        subjects = {subject for subject, _ in ours}
        rows = megc[megc["dataset"] == name]
        assert len(rows) > 0
        for row in rows.itertuples():
            subject = normalise_subject(name, row.subject)
            assert subject in subjects, (name, row.subject)
            key = (subject, row.filename)
            if megc_class[row.label] != "negative" or name == "casme2":
                # same 3-class map for CASME II; MEGC's SAMM negative adds Fear/Sadness
                assert ours.get(key) == megc_class[row.label], key
            elif key in ours:
                assert ours[key] == "negative", key
    assert len(megc[megc["dataset"] == "casme2"]) == 145


# ---- subject ids ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["sub09", "9", "09", 9, 9.0, "Sub09", " 09 ", "casme2_sub09"])
def test_normalise_subject_casme2(raw: object) -> None:
    assert normalise_subject("casme2", raw) == "casme2_sub09"


@pytest.mark.parametrize("raw", ["006", "6", 6, "06", "samm_006"])
def test_normalise_subject_samm(raw: object) -> None:
    assert normalise_subject("samm", raw) == "samm_006"


@pytest.mark.parametrize("raw", ["s01", "s1", "1", 1, "S01", "smic_s01"])
def test_normalise_subject_smic(raw: object) -> None:
    assert normalise_subject("smic", raw) == "smic_s01"


def test_normalise_subject_synthetic_and_errors() -> None:
    assert normalise_subject("synthetic", "03") == "synthetic_sub03"
    assert normalise_subject("casme2", "sub26") == "casme2_sub26"
    with pytest.raises(PipelineError, match="not a CASME II subject id"):
        normalise_subject("casme2", "subject nine")
    with pytest.raises(PipelineError, match="unknown dataset 'casme3'"):
        normalise_subject("casme3", "01")


# ---- frames --------------------------------------------------------------------------------


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_casme2_frame_numbers_sorted_numerically(tmp_path: Path, casme2_labels: Path) -> None:
    ds = Casme2(tmp_path, labels=casme2_labels)
    sample = ds.samples()[0]  # sub01/EP02_01f
    _touch(sample.folder, "img100.jpg", "img9.jpg", "img46.jpg", "Thumbs.db", "notes.txt", "._img46.jpg")
    assert ds.frame_numbers(sample) == [9, 46, 100]
    assert ds.frame_path(sample, 46) == tmp_path / "sub01" / "EP02_01f" / "img46.jpg"
    assert ds.frame_path(sample, 100).name == "img100.jpg"


def test_casme2_reg_img_accepted(tmp_path: Path, casme2_labels: Path) -> None:
    ds = Casme2(tmp_path, labels=casme2_labels)
    sample = ds.samples()[0]
    _touch(sample.folder, "reg_img46.jpg", "reg_img100.jpg", "reg_img9.jpg")
    assert ds.frame_numbers(sample) == [9, 46, 100]
    assert ds.frame_path(sample, 46) == sample.folder / "reg_img46.jpg"


def test_samm_frame_path_format(tmp_path: Path, samm_labels: Path) -> None:
    ds = Samm(tmp_path, labels=samm_labels)
    sample = next(s for s in ds.samples() if s.sample == "006_1_2")
    assert sample.onset == 5562
    _touch(sample.folder, "006_05562.jpg", "006_05600.jpg", "006_10001.jpg", "007_05562.jpg")
    assert ds.frame_path(sample, 5562) == tmp_path / "006" / "006_1_2" / "006_05562.jpg"
    assert ds.frame_numbers(sample) == [5562, 5600, 10001]


def test_subject_folders_spelled_otherwise(tmp_path: Path, casme2_labels: Path, samm_labels: Path) -> None:
    """Subject folders named without CASME II's `sub` or SAMM's padding are found: 01/, Sub02/, 6/ (frames
    6_05562.jpg); the dataset's own spelling wins where both exist."""
    casme2_root, samm_root = tmp_path / "casme2", tmp_path / "samm"
    _touch(casme2_root / "01" / "EP02_01f", "reg_img46.jpg")
    _touch(casme2_root / "Sub02" / "EP09_01", "img46.jpg")
    _touch(casme2_root / "sub03" / "EP01_2", "img46.jpg")
    _touch(casme2_root / "3" / "EP01_2", "img46.jpg")  # sub03/ exists: not this one
    _touch(casme2_root / "notes", "readme.txt")
    casme2 = {(s.subject, s.sample): s for s in Casme2(casme2_root, labels=casme2_labels).samples()}
    assert casme2["casme2_sub01", "EP02_01f"].folder == casme2_root / "01" / "EP02_01f"
    assert casme2["casme2_sub02", "EP09_01"].folder == casme2_root / "Sub02" / "EP09_01"
    assert casme2["casme2_sub03", "EP01_2"].folder == casme2_root / "sub03" / "EP01_2"
    assert casme2["casme2_sub04", "EP12_01f"].folder == casme2_root / "sub04" / "EP12_01f"  # none: as named
    _touch(samm_root / "6" / "006_1_2", "6_05562.jpg", "6_05588.jpg", "7_05562.jpg")
    samm = Samm(samm_root, labels=samm_labels)
    sample = next(s for s in samm.samples() if s.sample == "006_1_2")
    assert sample.folder == samm_root / "6" / "006_1_2"
    assert samm.frame_numbers(sample) == [5562, 5588]
    assert frame_jobs(samm, [sample])[0].onset_path == samm_root / "6" / "006_1_2" / "6_05562.jpg"


def test_missing_frame_error(tmp_path: Path, casme2_labels: Path, samm_labels: Path) -> None:
    ds = Casme2(tmp_path, labels=casme2_labels)
    sample = ds.samples()[0]
    _touch(sample.folder, "img46.jpg")
    with pytest.raises(PipelineError) as err:
        ds.frame_path(sample, 47)
    message = str(err.value)
    assert "casme2_sub01/EP02_01f" in message and "frame 47" in message
    assert str(sample.folder / "img47.jpg") in message and "data.root" in message
    assert "\n" not in message

    samm = Samm(tmp_path, labels=samm_labels)
    s = samm.samples()[0]
    _touch(s.folder)
    with pytest.raises(PipelineError, match=r"006_1_2: frame 5562 is missing \(tried .*006_05562\.jpg in any "
                                            r"image format; no frame images there\)"):
        samm.frame_path(s, 5562)
    with pytest.raises(PipelineError, match="no frame images in"):
        samm.frame_numbers(s)


def test_missing_sample_folder_error(tmp_path: Path, casme2_labels: Path) -> None:
    ds = Casme2(tmp_path, labels=casme2_labels)
    sample = ds.samples()[0]
    for call in (lambda: ds.frame_path(sample, 46), lambda: ds.frame_numbers(sample)):
        with pytest.raises(PipelineError) as err:
            call()
        message = str(err.value)
        assert "EP02_01f" in message and str(sample.folder) in message
        assert "does not exist" in message and "data.root" in message


def test_frames_in_other_formats_padding_and_case(tmp_path: Path, casme2_labels: Path,
                                                  samm_labels: Path) -> None:
    # copies converted to PNG, zero-padded counters, upper-case suffixes: the same frames
    ds = Casme2(tmp_path, labels=casme2_labels)
    sample = ds.samples()[0]
    _touch(sample.folder, "img046.png", "img047.PNG", "img100.bmp", "img46.txt", "thumb46.png")
    assert ds.frame_numbers(sample) == [46, 47, 100]
    assert ds.frame_path(sample, 46).name == "img046.png"
    assert ds.frame_path(sample, 47).name == "img047.PNG"
    # a frame held twice: the dataset's own format (.jpg) is read, then img before reg_img
    _touch(sample.folder, "img46.jpg", "reg_img46.jpg", "reg_img47.jpg")
    assert ds.frame_path(sample, 46).name == "img46.jpg"
    assert ds.frame_path(sample, 47).name == "reg_img47.jpg"

    samm = Samm(tmp_path, labels=samm_labels)
    s = next(s for s in samm.samples() if s.sample == "006_1_2")
    _touch(s.folder, "006_5562.JPG", "006_05600.png", "007_05562.png")
    assert samm.frame_numbers(s) == [5562, 5600]
    assert samm.frame_path(s, 5562).name == "006_5562.JPG"


def test_root_one_level_too_high_names_the_right_folder(tmp_path: Path, casme2_labels: Path) -> None:
    # CASME2/ holding the spreadsheet and Cropped/sub01/...: data.root set to CASME2/
    ds = Casme2(tmp_path, labels=casme2_labels)
    sample = ds.samples()[0]
    _touch(tmp_path / "Cropped" / "sub01" / sample.sample, "reg_img46.jpg")
    right = tmp_path / "Cropped"
    with pytest.raises(PipelineError, match=f"it is under {right}: set data.root to that folder"):
        ds.frame_numbers(sample)


# ---- synthetic + label discovery -------------------------------------------------------------


def test_synthetic_autodetects_single_sheet(tmp_path: Path) -> None:
    _write_sheet(
        tmp_path / "coding.csv",
        [
            ("03", "EP01_1", 10, 16, 22, "happiness"),
            ("01", "EP01_2", 1, 7, 13, "surprise"),
            ("01", "EP02_1", 5, 5, 11, "others"),
            ("12", "EP01_3", 2, 8, 14, "repression"),
        ],
    )
    ds = get_dataset("synthetic", tmp_path)
    assert isinstance(ds, Synthetic) and ds.labels == tmp_path / "coding.csv"
    assert ds.fixes == ()
    samples = ds.samples()
    assert [(s.subject, s.sample, ds.classes[s.label]) for s in samples] == [
        ("synthetic_sub01", "EP01_2", "surprise"),
        ("synthetic_sub03", "EP01_1", "positive"),
        ("synthetic_sub12", "EP01_3", "negative"),
    ]
    assert samples[1].folder == tmp_path / "sub03" / "EP01_1"
    assert ds.fixes_applied == []
    _touch(samples[1].folder, "img10.jpg", "img16.jpg")
    assert ds.frame_path(samples[1], 16) == tmp_path / "sub03" / "EP01_1" / "img16.jpg"


def test_xlsx_with_blank_columns_like_casme2(tmp_path: Path) -> None:
    columns = ["Subject", "Filename", "", "OnsetFrame", "ApexFrame", "OffsetFrame", " ", "Estimated Emotion"]
    _write_sheet(tmp_path / "sheet.xlsx", [("7", "EP09f", None, 3, 4, 5, None, "disgust")], columns)
    (sample,) = Synthetic(tmp_path).samples()
    assert (sample.subject, sample.sample, sample.onset, sample.apex, sample.offset) == (
        "synthetic_sub07",
        "EP09f",
        3,
        4,
        5,
    )


def test_no_or_several_sheets_in_root(tmp_path: Path) -> None:
    with pytest.raises(PipelineError) as err:
        Synthetic(tmp_path)
    message = str(err.value)
    assert "no label spreadsheet" in message and str(tmp_path) in message and "data.labels" in message
    _write_sheet(tmp_path / "a.csv", [("01", "EP01", 1, 2, 3, "happiness")])
    _write_sheet(tmp_path / "b.xlsx", [("01", "EP01", 1, 2, 3, "happiness")])
    with pytest.raises(PipelineError) as err:
        Synthetic(tmp_path)
    message = str(err.value)
    assert "2 spreadsheets" in message and "a.csv" in message and "b.xlsx" in message
    assert "dvc exp run -S data.labels=" in message
    # an explicit labels path wins
    assert Synthetic(tmp_path, labels=tmp_path / "a.csv").samples()[0].sample == "EP01"


def test_system_files_beside_the_spreadsheet_are_not_spreadsheets(tmp_path: Path) -> None:
    # a copy made on a Mac leaves ._<name> beside each file; Excel keeps ~$<name> while the sheet is open
    _write_sheet(tmp_path / "CASME2-coding.xlsx", [("01", "EP01", 1, 2, 3, "happiness")])
    for junk in ("._CASME2-coding.xlsx", "~$CASME2-coding.xlsx"):
        (tmp_path / junk).write_bytes(b"\x00\x05\x16\x07")
    assert Synthetic(tmp_path).labels == tmp_path / "CASME2-coding.xlsx"


def test_spreadsheet_one_folder_up_is_named(tmp_path: Path) -> None:
    # CASME2/CASME2-coding.xlsx beside CASME2/Cropped/sub01/...: data.root set to Cropped, no data.labels
    sheet = tmp_path / "CASME2-coding-20190701.xlsx"
    _write_sheet(sheet, [("01", "EP01", 1, 2, 3, "happiness")])
    (tmp_path / "Cropped").mkdir()
    with pytest.raises(PipelineError, match=f"no label spreadsheet .*; {sheet} is one folder up"):
        Casme2(tmp_path / "Cropped")


# ---- validation errors ---------------------------------------------------------------------


def test_generic_validation_apex_outside(tmp_path: Path) -> None:
    _write_sheet(tmp_path / "s.csv", [("02", "EP05", 10, 30, 20, "disgust")])
    with pytest.raises(PipelineError) as err:
        Synthetic(tmp_path).samples()
    message = str(err.value)
    assert "sub02/EP05" in message and "onset <= apex <= offset" in message
    assert "apex 30" in message and "label_defects" in message and "fix that row" in message


def test_generic_validation_not_a_number(tmp_path: Path) -> None:
    _write_sheet(tmp_path / "s.csv", [("02", "EP05", 10, "/", 20, "disgust")])
    with pytest.raises(PipelineError, match=r"sub02/EP05: ApexFrame '/' is not a frame number: fix that row"):
        Synthetic(tmp_path).samples()
    # an unmapped emotion is dropped before validation
    _write_sheet(tmp_path / "s.csv", [("02", "EP05", 10, "/", 20, "others")])
    assert Synthetic(tmp_path).samples() == []


def test_duplicate_row(tmp_path: Path) -> None:
    _write_sheet(
        tmp_path / "s.csv", [("02", "EP05", 1, 2, 3, "disgust"), ("sub02", "EP05", 1, 2, 3, "disgust")]
    )
    with pytest.raises(PipelineError, match="appears twice"):
        Synthetic(tmp_path).samples()


def test_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(PipelineError) as err:
        get_dataset("casme2", missing)
    message = str(err.value)
    assert f"data.root {missing} does not exist" in message
    assert "put the dataset there or set data.root" in message


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(PipelineError) as err:
        get_dataset("casme3", tmp_path)
    message = str(err.value)
    assert "'casme3'" in message and "casme2, megc2019, samm, smic, synthetic" in message
    assert set(DATASETS) == {"casme2", "samm", "smic", "synthetic"}
    with pytest.raises(PipelineError, match="dataset_from_params"):
        get_dataset("megc2019", tmp_path)


def test_labels_file_missing(tmp_path: Path) -> None:
    with pytest.raises(PipelineError) as err:
        get_dataset("casme2", tmp_path, labels=tmp_path / "CASME2.xlsx")
    message = str(err.value)
    assert f"data.labels {tmp_path / 'CASME2.xlsx'} does not exist" in message
    assert "dvc exp run -S data.labels=" in message


def test_samm_file_given_to_casme2(tmp_path: Path, samm_labels: Path) -> None:
    with pytest.raises(PipelineError) as err:
        Casme2(tmp_path, labels=samm_labels).samples()
    message = str(err.value)
    assert str(samm_labels) in message and "not a CASME II coding file" in message
    assert "OnsetFrame, ApexFrame, OffsetFrame" in message and "data.labels" in message


def test_casme2_file_given_to_samm(tmp_path: Path, casme2_labels: Path) -> None:
    with pytest.raises(PipelineError) as err:
        Samm(tmp_path, labels=casme2_labels).samples()
    message = str(err.value)
    assert "not a SAMM coding file" in message and "'MICRO_ONLY'" in message
    assert "Onset Frame, Apex Frame, Offset Frame" in message


def test_missing_columns(tmp_path: Path) -> None:
    columns = ["Subject", "Filename", "OnsetFrame", "Apex", "OffsetFrame", "Estimated Emotion"]
    _write_sheet(tmp_path / "s.csv", [("01", "EP01", 1, 2, 3, "happiness")], columns)
    with pytest.raises(PipelineError, match="expected columns Subject, Filename, OnsetFrame, ApexFrame"):
        Synthetic(tmp_path).samples()


def test_unreadable_and_unsupported_label_files(tmp_path: Path) -> None:
    (tmp_path / "bad.xlsx").write_text("not a workbook")
    with pytest.raises(PipelineError, match=r"bad\.xlsx is not a synthetic"):
        Synthetic(tmp_path, labels=tmp_path / "bad.xlsx").samples()
    (tmp_path / "labels.txt").write_text("x")
    with pytest.raises(PipelineError, match="unsupported file type"):
        Synthetic(tmp_path, labels=tmp_path / "labels.txt").samples()


@pytest.mark.parametrize("classes", [2, 5, "three", None])
def test_unknown_class_count(tmp_path: Path, classes: object) -> None:
    _write_sheet(tmp_path / "s.csv", [("01", "EP01", 1, 2, 3, "happiness")])
    with pytest.raises(PipelineError) as err:
        get_dataset("synthetic", tmp_path, classes=classes)  # type: ignore[arg-type]
    assert f"data.classes is {classes!r}" in str(err.value) and "3 or 4" in str(err.value)


def test_unknown_label_defects_policy(tmp_path: Path) -> None:
    _write_sheet(tmp_path / "s.csv", [("01", "EP01", 1, 2, 3, "happiness")])
    with pytest.raises(PipelineError) as err:
        get_dataset("synthetic", tmp_path, label_defects="ignore")
    assert "data.label_defects is 'ignore'" in str(err.value) and "repair, drop" in str(err.value)


# ---- fix table -----------------------------------------------------------------------------


def test_fix_table_markdown() -> None:
    text = fix_table_markdown()
    lines = text.strip().splitlines()
    assert lines[0] == "| dataset | sample | defect | repair | reason |"
    assert len(lines) == 2 + len(Casme2.fixes) + len(Samm.fixes) == 7
    for sample in ("sub04/EP12_01f", "sub05/EP09_05f", "028/028_4_1", "032/032_3_1", "032/032_3_2"):
        assert sample in text
    assert "apex / -> 291" in text and "2014 coding file" in text
    assert all(fix.reason and fix.defect for fix in Casme2.fixes + Samm.fixes)
    assert text.strip() in (REPO / "docs" / "datasets.md").read_text()  # the documented table is this one


# ---- SMIC-HS, generated tree ---------------------------------------------------------------

# SMIC-HS micro clips per subject folder: (negative, positive, surprise); s7, s10, s16, s17 have none.
SMIC_HS = {
    1: (3, 2, 1), 2: (0, 1, 5), 3: (22, 11, 6), 4: (10, 4, 5), 5: (1, 0, 1), 6: (2, 0, 2), 8: (9, 4, 0),
    9: (0, 1, 3), 11: (3, 3, 1), 12: (0, 8, 1), 13: (0, 10, 0), 14: (3, 2, 5), 15: (1, 1, 2),
    18: (2, 0, 5), 19: (0, 1, 1), 20: (14, 3, 5),
}
SMIC_EMOTIONS = (("negative", "ne"), ("positive", "po"), ("surprise", "sur"))


def _smic_tree(root: Path, frames: int = 5) -> Path:
    """SMIC_all_cropped/HS as distributed: empty reg_image<N>.bmp files, 6-digit camera counter,
    plus non_micro/ clips and subjects without micro clips (both to be ignored)."""
    counter = 100_000
    for number in range(1, 21):
        subject = root / f"s{number}"
        _touch(subject / "non_micro" / "negative" / f"s{number}_ne_01", "reg_image1.bmp")
        for (emotion, short), clips in zip(SMIC_EMOTIONS, SMIC_HS.get(number, (0, 0, 0))):
            for clip in range(1, clips + 1):
                names = [f"reg_image{counter + i}.bmp" for i in range(frames)]
                _touch(subject / "micro" / emotion / f"s{number}_{short}_{clip:02d}", *names)
                counter += 1000
    return root


def test_smic_counts(tmp_path: Path) -> None:
    ds = get_dataset("smic", _smic_tree(tmp_path))
    samples = ds.samples()
    assert ds.classes == ["negative", "positive", "surprise"]
    assert len(samples) == 164
    assert _class_counts(ds, samples) == {"negative": 70, "positive": 51, "surprise": 43}
    assert _subject_counts(samples) == {f"smic_s{n:02d}": sum(c) for n, c in SMIC_HS.items()}
    assert len(_subject_counts(samples)) == 16
    per_class = Counter((s.subject, ds.classes[s.label]) for s in samples)
    for n, counts in SMIC_HS.items():
        for (emotion, _), count in zip(SMIC_EMOTIONS, counts):
            assert per_class[f"smic_s{n:02d}", emotion] == count
    first = samples[0]
    assert (first.subject, first.sample, first.emotion) == ("smic_s01", "s1_ne_01", "negative")
    assert first.folder == tmp_path / "s1" / "micro" / "negative" / "s1_ne_01"
    # onset = first frame, offset = last, apex = middle (default policy)
    assert (first.onset, first.apex, first.offset) == (100_000, 100_002, 100_004)
    assert ds.frame_path(first, 100_002) == first.folder / "reg_image100002.bmp"
    assert all(s.offset - s.onset == 4 and s.apex == s.onset + 2 for s in samples)


def test_smic_gaps_padding_and_raw_names(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clip = tmp_path / "s3" / "micro" / "surprise" / "s3_sur_01"
    # numeric order across a digit change; frames 1000000 and 1000002-1000004 missing
    _touch(clip, "reg_image999998.bmp", "reg_image999999.bmp", "reg_image1000001.bmp", "reg_image1000005.bmp")
    raw = tmp_path / "s3" / "micro" / "positive" / "s3_po_01"
    _touch(raw, "image0123456.bmp", "image0123457.bmp", "image0123458.bmp", "Thumbs.db")
    with caplog.at_level(logging.WARNING, logger="mer.datasets"):
        gap, padded = sorted(Smic(tmp_path).samples(), key=lambda s: s.sample, reverse=True)
    assert (gap.onset, gap.apex, gap.offset) == (999_998, 1_000_001, 1_000_005)
    warnings = [r.getMessage() for r in caplog.records]
    assert any("4 frame(s) missing" in w and "s3_sur_01" in w for w in warnings)
    assert (padded.onset, padded.apex, padded.offset) == (123_456, 123_457, 123_458)
    assert Smic(tmp_path).frame_path(padded, 123_457) == raw / "image0123457.bmp"
    with pytest.raises(PipelineError, match=r"frame 1000000 is missing \(tried .*reg_image1000000\.bmp"):
        Smic(tmp_path).frame_path(gap, 1_000_000)


def test_smic_folders_as_copies_leave_them(tmp_path: Path) -> None:
    """Hidden and NAS folders beside the clips are no clips; `Micro/` and `S2/` are read; a clip folder
    spelled as MEGC2019's csv spells it (s01_ne_01) is the clip s1_ne_01."""
    _touch(tmp_path / "s1" / "micro" / "negative" / "s01_ne_01", "reg_image100.bmp", "reg_image101.bmp")
    _touch(tmp_path / "s1" / "micro" / "negative" / ".ipynb_checkpoints", "x.bmp")
    _touch(tmp_path / "s1" / "micro" / "negative" / "@eaDir", "reg_image100.bmp")
    _touch(tmp_path / "s1" / "micro" / ".hidden" / "s1_ne_09", "reg_image100.bmp")
    _touch(tmp_path / "S2" / "Micro" / "Positive" / "s2_po_01", "reg_image7.bmp")
    samples = Smic(tmp_path).samples()
    assert [(s.subject, s.sample, s.emotion) for s in samples] == [
        ("smic_s01", "s1_ne_01", "negative"), ("smic_s02", "s2_po_01", "Positive")]
    assert samples[0].folder == tmp_path / "s1" / "micro" / "negative" / "s01_ne_01"
    assert Smic(tmp_path).frame_path(samples[0], 101).name == "reg_image101.bmp"
    # a selector that ignores the emotion (MEGC2019's csv) still skips the hidden emotion folder
    assert [s.sample for s in Smic(tmp_path).select(lambda *_: "negative")] == ["s1_ne_01", "s2_po_01"]
    _touch(tmp_path / "s1" / "micro" / "negative" / "s1_ne_01", "reg_image100.bmp")
    with pytest.raises(PipelineError, match=r"smic_s01/s1_ne_01: two folders hold this clip"):
        Smic(tmp_path).samples()


def test_smic_without_micro_folders_says_so(tmp_path: Path) -> None:
    _touch(tmp_path / "s01" / "s1_ne_01", "image000100.bmp")  # SMIC-E's layout: long clips, no micro/
    with pytest.raises(PipelineError, match=r"no micro/<emotion>/<clip> folders in the subject folders"):
        Smic(tmp_path).samples()


def test_smic_middle_apex() -> None:
    assert middle_apex([10, 11, 12, 13, 14]) == 12
    assert middle_apex([10, 11, 12, 13]) == 11  # tie: the earlier
    assert middle_apex([10, 14, 20]) == 14  # 15 is missing: the nearest present
    assert middle_apex([7]) == 7


def test_smic_errors(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="no SMIC subject folders .* set data.root to the HS folder"):
        Smic(tmp_path).samples()
    with pytest.raises(PipelineError, match='no label spreadsheet, its emotion folders are the labels'):
        Smic(tmp_path, labels=tmp_path / "x.csv")
    with pytest.raises(PipelineError, match="data.apex_policy is 'peak': use one of middle"):
        Smic(tmp_path, apex_policy="peak")
    with pytest.raises(PipelineError, match="data.classes is 4: smic supports 3"):
        Smic(tmp_path, classes=4)


# ---- MEGC2019 composite, real csv + sheets, generated SMIC tree ----------------------------


def _megc_data(tmp_path: Path, casme2_labels: Path, samm_labels: Path, megc_labels: Path) -> dict:
    """The params `data` section of a composite run: the three roots under one data.root."""
    for name in ("CASME2", "SAMM"):
        (tmp_path / name).mkdir()
    _smic_tree(tmp_path / "SMIC_all_cropped" / "HS")
    return {
        "dataset": "megc2019", "root": str(tmp_path), "labels": str(megc_labels), "classes": 3,
        "label_defects": "repair", "apex_policy": "middle",
        "roots": {"casme2": "CASME2", "samm": "SAMM", "smic": "SMIC_all_cropped/HS"},
        "sheets": {"casme2": str(casme2_labels), "samm": str(samm_labels)},
        "members": ["casme2", "samm", "smic"],
    }


def test_megc2019_counts(tmp_path: Path, casme2_labels: Path, samm_labels: Path, megc_labels: Path) -> None:
    ds = dataset_from_params(_megc_data(tmp_path, casme2_labels, samm_labels, megc_labels))
    assert isinstance(ds, Megc2019)
    samples = ds.samples()
    assert ds.classes == ["negative", "positive", "surprise"]
    assert len(samples) == 442
    assert len({s.subject for s in samples}) == 68
    assert _class_counts(ds, samples) == {"negative": 250, "positive": 109, "surprise": 83}
    by_dataset = Counter(s.subject.split("_")[0] for s in samples)
    assert by_dataset == {"casme2": 145, "samm": 133, "smic": 164}
    assert Counter(s.subject.split("_")[0] for s in {s.subject: s for s in samples}.values()) == {
        "casme2": 24, "samm": 28, "smic": 16}

    # per subject and per class: the csv, read independently
    megc = pd.read_csv(megc_labels, header=None, names=["dataset", "subject", "filename", "label"], dtype=str)
    prefix = {"casme2": "casme2_", "samm": "samm_", "smic": "smic_"}
    megc["id"] = [f"{prefix[d]}{s}" if d != "samm" else f"samm_{int(s):03d}"
                  for d, s in zip(megc["dataset"], megc["subject"])]
    classes = {"0": "negative", "1": "positive", "2": "surprise"}
    expected = Counter(zip(megc["id"], megc["label"].map(classes)))
    assert Counter((s.subject, ds.classes[s.label]) for s in samples) == expected

    # onset / apex from each dataset's own sheet; SMIC by the apex policy; fixes carried over
    by_name = {(s.subject, s.sample): s for s in samples}
    casme2 = {(s.subject, s.sample): s for s in Casme2(tmp_path / "CASME2", labels=casme2_labels).samples()}
    assert by_name["casme2_sub01", "EP02_01f"] == casme2["casme2_sub01", "EP02_01f"]
    fear = by_name["samm_006", "006_5_10"]  # Fear: negative in MEGC2019, not in the paper's map
    assert (fear.emotion, ds.classes[fear.label]) == ("Fear", "negative")
    assert (by_name["samm_028", "028_4_1"].apex, by_name["samm_028", "028_4_1"].offset) == (1134, 1134)
    smic = by_name["smic_s01", "s1_ne_01"]
    assert (smic.onset, smic.apex, smic.offset) == (100_000, 100_002, 100_004)
    assert ds.frame_path(smic, 100_002) == smic.folder / "reg_image100002.bmp"
    # the two defective CASME II rows are not MEGC2019 samples: only SAMM's three fixes apply
    assert len(ds.fixes_applied) == 3 and all(f.startswith("samm ") for f in ds.fixes_applied)
    _touch(tmp_path / "CASME2" / "sub01" / "EP02_01f", "reg_img46.jpg")
    assert ds.frame_numbers(by_name["casme2_sub01", "EP02_01f"]) == [46]
    # the frames stage's lookup through the composite: each member's files, its setting in the error
    job = frame_jobs(ds, [smic])[0]
    assert (job.onset_path.name, job.apex_path.name) == ("reg_image100000.bmp", "reg_image100002.bmp")
    missing = r"casme2_sub01/EP02_01f: apex frame 59 is missing .*data.roots.casme2"
    with pytest.raises(PipelineError, match=missing):
        frame_jobs(ds, [by_name["casme2_sub01", "EP02_01f"]])


def test_megc2019_member_settings_in_messages_and_sheets_under_root(
    tmp_path: Path, casme2_labels: Path, samm_labels: Path, megc_labels: Path
) -> None:
    # the official CASME II layout inside the composite's root: CASME2/<sheet> beside CASME2/Cropped/
    data = _megc_data(tmp_path, casme2_labels, samm_labels, megc_labels)
    shutil.copy(casme2_labels, tmp_path / "CASME2" / casme2_labels.name)
    data["sheets"]["casme2"] = f"CASME2/{casme2_labels.name}"  # relative to data.root, as the roots are
    ds = dataset_from_params(data)
    assert ds.members["casme2"].labels == tmp_path / "CASME2" / casme2_labels.name
    sample = next(s for s in ds.samples() if s.sample == "EP02_01f")
    _touch(tmp_path / "CASME2" / "Cropped" / "sub01" / "EP02_01f", "reg_img46.jpg")
    with pytest.raises(PipelineError, match=f"it is under {tmp_path / 'CASME2' / 'Cropped'}: "
                                            "set data.roots.casme2 to that folder"):
        ds.frame_numbers(sample)
    # the root moved to Cropped/, the sheet left to "": the sheet one folder up, named with its key
    data["roots"]["casme2"], data["sheets"]["casme2"] = "CASME2/Cropped", ""
    with pytest.raises(PipelineError) as err:
        dataset_from_params(data)
    message = str(err.value)
    assert message.startswith("megc2019 member casme2: no label spreadsheet") and "data.labels" not in message
    assert "set data.sheets.casme2 to" in message and "one folder up" in message


def test_label_files_outside_data_root_are_reported(
    tmp_path: Path, casme2_labels: Path, samm_labels: Path, megc_labels: Path
) -> None:
    # DVC watches data.root: a spreadsheet outside it (CASME II's beside Cropped/) is named
    root = tmp_path / "CASME2" / "Cropped"
    root.mkdir(parents=True)
    outside = tmp_path / "CASME2" / casme2_labels.name
    shutil.copy(casme2_labels, outside)
    assert unwatched_label_files(Casme2(root, labels=outside), root) == [outside]
    (root / outside.name).symlink_to(outside)  # a link in data.root is watched: DVC hashes its target
    assert unwatched_label_files(Casme2(root), root) == []
    assert unwatched_label_files(Casme2(root, labels=f"{root}/../Cropped/{outside.name}"), root) == []
    # the composite: its csv and each member's sheet
    (tmp_path / "MER").mkdir()
    data = _megc_data(tmp_path / "MER", casme2_labels, samm_labels, megc_labels)
    assert set(unwatched_label_files(dataset_from_params(data), data["root"])) == {
        megc_labels, casme2_labels, samm_labels}
    assert unwatched_label_files(Smic(data["root"] + "/SMIC_all_cropped/HS"), data["root"]) == []


def test_megc2019_subset_and_missing_root(
    tmp_path: Path, casme2_labels: Path, samm_labels: Path, megc_labels: Path
) -> None:
    data = _megc_data(tmp_path, casme2_labels, samm_labels, megc_labels)
    data["roots"]["smic"] = "SMIC"  # absent
    with pytest.raises(PipelineError) as err:
        dataset_from_params(data)
    message = str(err.value)
    assert message.startswith(f"data.roots.smic: {tmp_path / 'SMIC'} does not exist")
    assert "leave smic out of data.members" in message and "\n" not in message
    samples = dataset_from_params(data | {"members": ["casme2", "samm"]}).samples()
    assert len(samples) == 145 + 133
    data["members"] = ["casme2", "casme2"]
    with pytest.raises(PipelineError, match="data.members is"):
        dataset_from_params(data)


def test_megc2019_missing_clip_and_bad_csv(
    tmp_path: Path, casme2_labels: Path, samm_labels: Path, megc_labels: Path
) -> None:
    data = _megc_data(tmp_path, casme2_labels, samm_labels, megc_labels)
    clip = tmp_path / "SMIC_all_cropped" / "HS" / "s20" / "micro" / "surprise" / "s20_sur_05"
    for path in clip.iterdir():
        path.unlink()
    clip.rmdir()
    missing = r"1 smic sample\(s\) of .* \(smic_s20/s20_sur_05\): check data.roots.smic$"  # no sheet
    with pytest.raises(PipelineError, match=missing):
        dataset_from_params(data).samples()
    # the clip's folder spelled as the csv spells it
    _touch(clip.parent / "s020_sur_05", "reg_image1.bmp", "reg_image2.bmp")
    assert ("smic_s20", "s20_sur_05") in {(s.subject, s.sample) for s in dataset_from_params(data).samples()}
    bad = tmp_path / "bad.csv"
    bad.write_text("casme2,sub01,EP02_01f,3\n")
    with pytest.raises(PipelineError, match="is not MEGC2019's combined_3class_gt.csv"):
        dataset_from_params(data | {"labels": str(bad)}).samples()
    with pytest.raises(PipelineError, match="data.classes is 4: megc2019 is a 3-class protocol"):
        dataset_from_params(data | {"classes": 4})
    with pytest.raises(PipelineError, match="set data.labels to MEGC2019's combined_3class_gt.csv"):
        dataset_from_params(data | {"labels": ""})
