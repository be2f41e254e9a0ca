"""Micro-expression datasets: label spreadsheets, class maps, label fixes, frame files.

One class per dataset owns its coding-spreadsheet format, its class maps and its fix table
(known defects in the published label files, as data: see `fix_table_markdown()`).

Class maps (the paper's protocols, MiHF-Tr Tables 1 and 4):

- 3 classes: positive = happiness; negative = CASME II disgust + repression, SAMM anger +
  contempt + disgust; surprise = surprise. Every other emotion (others, sadness, fear) is dropped.
  CASME II: 32 / 90 / 28 = 150 samples, 24 subjects; SAMM: 26 / 78 / 15 = 119, 28 subjects.
- 4 classes: negative is split. CASME II: disgust / repression (63 / 27). SAMM: anger / disgust,
  and SAMM **contempt goes with disgust** (anger 57, disgust 9 + 12 contempt = 21). Reasons: SAMM
  codes anger as upper-face AU4/AU7 while contempt (AU14) and disgust (AU9/AU10) are both
  lower-face actions, contempt and disgust are the two "rejection" emotions of the CAD triad, and
  it keeps the 4-class set the same 119 samples as the 3-class set, so the tables compare.

Frames:

- CASME II (and the synthetic set, generated in its format): `root/subNN/<Filename>/img<N>.jpg`,
  or the official cropped `reg_img<N>.jpg`; either is accepted, per folder.
- SAMM: `root/<subject>/<Filename>/<subject>_<N:05d>.jpg`, e.g. `006/006_1_2/006_05562.jpg`.
- SMIC-HS (no spreadsheet: the folders are the labels): `root/s<N>/micro/<emotion>/<clip>/reg_image<N>.bmp`
  (`SMIC_all_cropped/HS`) or `image<N>.bmp` (`SMIC_all_raw/HS`); see `Smic`.

N is the absolute frame number the spreadsheet uses, zero padded or not. Copies converted to another
image format are read too (`IMAGE_SUFFIXES`, any case: `img46.png`, `006_05562.JPG`); where one
folder holds a frame twice, the dataset's own format is read.

MEGC2019 composite (`Megc2019`): CASME II + SAMM + SMIC-HS, 3 classes, the samples and classes of
MEGC2019's `combined_3class_gt.csv` (not the paper's maps: 442 samples, 250 / 109 / 83), onset and
apex from each dataset's own sheet.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from mer.common import PipelineError

log = logging.getLogger(__name__)

LABEL_SUFFIXES = (".xlsx", ".xls", ".csv")
# frame files OpenCV reads, in the order one is preferred where a folder holds a frame twice
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".bmp", ".png", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm")
LABEL_DEFECT_POLICIES = ("repair", "drop")
HEADER_SEARCH_ROWS = 40  # the header row must be among the first rows of the sheet

# (normalised subject, sample, emotion as written) -> class name, or None to leave the row out
Selector = Callable[[str, str, str], str | None]


def is_system_file(path: Path) -> bool:
    """A file or folder no dataset ships: hidden (macOS copies leave `._<name>` beside every file,
    Jupyter `.ipynb_checkpoints`), Excel's lock file of an open workbook (`~$<name>`), a NAS's index
    folder (Synology `@eaDir`) or a zip's macOS metadata (`__MACOSX`)."""
    return path.name.startswith((".", "~$", "@")) or path.name == "__MACOSX"


def _spreadsheets(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in LABEL_SUFFIXES and not is_system_file(p))


@dataclass(frozen=True)
class Sample:
    """One labelled micro-expression clip."""

    subject: str  # normalised and dataset-prefixed: "casme2_sub01", "samm_006"
    sample: str  # spreadsheet Filename, verbatim ("EP02_01f", "006_1_2")
    folder: Path  # directory holding this sample's frames
    onset: int
    apex: int
    offset: int
    emotion: str  # spreadsheet emotion as written ("happiness", "Anger")
    label: int  # index into dataset.classes


@dataclass(frozen=True)
class LabelFix:
    """A known defect of one spreadsheet row and its repair; applied only if the row still has it."""

    subject: str  # as in the spreadsheet (normalised before matching)
    sample: str  # Filename
    field: str  # "onset" | "apex" | "offset"
    found: str  # the defective value, as the spreadsheet has it
    repaired: int  # the value used with label_defects=repair
    defect: str  # what is wrong, in words
    reason: str  # why `repaired` is the right value, one line


def _frame_value(raw: Any) -> int | None:
    """A spreadsheet cell as an integer frame number, or None if it is not one."""
    if raw is None:
        return None
    text = str(raw).strip()
    if not text or text.lower() == "nan":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    if not math.isfinite(value) or not value.is_integer():
        return None
    return int(value)


def _same_cell(cell: str, found: str) -> bool:
    """Whether a cell still holds the defective value (numbers compared as numbers: "69" == "69.0")."""
    a, b = _frame_value(cell), _frame_value(found)
    return a == b if a is not None and b is not None else cell.strip() == found.strip()


def _cell_text(raw: Any) -> str:
    """A spreadsheet cell as stripped text ('' for empty / NaN)."""
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return ""
    text = str(raw).strip()
    return "" if text.lower() == "nan" else text


class MicroExpressionDataset(ABC):
    """Base class: a dataset root (subject folders) plus its coding spreadsheet."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""  # human name for messages, e.g. "CASME II"
    sheet: ClassVar[str | None] = None  # Excel sheet to read; None = the first one
    # canonical field -> spreadsheet column name
    columns: ClassVar[dict[str, str]] = {}
    # classes -> {emotion (lower case) -> class name}; emotions not listed are dropped
    class_maps: ClassVar[dict[int, dict[str, str]]] = {}
    fixes: ClassVar[tuple[LabelFix, ...]] = ()
    subject_digits: ClassVar[int] = 2
    subject_folder_prefix: ClassVar[str] = ""  # "sub" for CASME II: root/sub01
    subject_example: ClassVar[str] = "sub01, 01 or 1"  # accepted spellings, for messages
    frame_help: ClassVar[str] = ""
    frame_suffix: ClassVar[str] = ".jpg"  # the format the dataset ships its frames in

    def __init__(
        self,
        root: Path | str,
        labels: Path | str | None = None,
        classes: int = 3,
        label_defects: str = "repair",
        settings: tuple[str, str] = ("data.root", "data.labels"),
    ) -> None:
        # the params keys that set root and labels, named in messages (a MEGC2019 member has its own)
        self.root_key, self.labels_key = settings
        self.root = Path(root)
        if not self.root.is_dir():
            raise PipelineError(
                f"{self.root_key} {self.root} does not exist (dataset {self.name}): "
                f"put the dataset there or set {self.root_key} (`dvc exp run -S {self.root_key}=...`)"
            )
        try:
            n_classes = int(classes)
        except (TypeError, ValueError):
            n_classes = -1
        if n_classes not in self.class_maps:
            valid = " or ".join(str(k) for k in sorted(self.class_maps))
            raise PipelineError(
                f"data.classes is {classes!r}: {self.name} supports {valid}; set data.classes"
            )
        if label_defects not in LABEL_DEFECT_POLICIES:
            raise PipelineError(
                f"data.label_defects is {label_defects!r}: use one of {', '.join(LABEL_DEFECT_POLICIES)}"
            )
        self.n_classes = n_classes
        self.class_map = self.class_maps[n_classes]
        self.classes: list[str] = sorted(set(self.class_map.values()))
        self.label_defects = label_defects
        self.labels = self._resolve_labels(labels)
        self.fixes_applied: list[str] = []
        self.dropped: set[tuple[str, str]] = set()  # (subject, sample) dropped by label_defects=drop

    # ---- labels -------------------------------------------------------------------------

    def _resolve_labels(self, labels: Path | str | None) -> Path:
        """The spreadsheet: `labels` if given, else the single one found directly in root."""
        if labels is not None and str(labels).strip():
            path = Path(labels)
            if not path.is_file():
                raise PipelineError(
                    f"{self.labels_key} {path} does not exist: set {self.labels_key} to the {self.title} "
                    f'coding spreadsheet (`dvc exp run -S {self.labels_key}=...`) or to "" to use the one in '
                    f"{self.root_key}"
                )
            return path
        found = _spreadsheets(self.root)
        if len(found) != 1:
            what = "no label spreadsheet" if not found else f"{len(found)} spreadsheets"
            names = f" ({', '.join(p.name for p in found)})" if found else ""
            # the frames often sit one folder below the spreadsheet (CASME2/Cropped beside CASME2/*.xlsx)
            above = _spreadsheets(self.root.resolve().parent) if not found else []
            hint = f"; {above[0]} is one folder up" if len(above) == 1 else ""
            raise PipelineError(
                f"{what} (.xlsx/.xls/.csv) in {self.root_key} {self.root}{names}: set {self.labels_key} to "
                f"the {self.title} coding spreadsheet (`dvc exp run -S {self.labels_key}=path/to/file`){hint}"
            )
        return found[0]

    def label_files(self) -> list[Path]:
        """The label files this dataset reads."""
        return [self.labels]

    def _wrong_format(self, detail: str) -> PipelineError:
        expected = ", ".join(self.columns.values())
        return PipelineError(
            f"{self.labels} is not a {self.title} coding file ({detail}; expected columns {expected}): "
            f"set {self.labels_key} to the {self.title} spreadsheet or data.dataset to the matching dataset"
        )

    def _read_raw(self) -> pd.DataFrame:
        """The label sheet as text cells, no header applied."""
        suffix = self.labels.suffix.lower()
        try:
            if suffix == ".csv":
                return pd.read_csv(self.labels, header=None, dtype=str, keep_default_na=False)
            if suffix in (".xlsx", ".xls"):
                with pd.ExcelFile(self.labels) as book:
                    sheet: str | int = 0
                    if self.sheet is not None:
                        if self.sheet not in book.sheet_names:
                            raise self._wrong_format(
                                f"no sheet {self.sheet!r}, it has {', '.join(map(str, book.sheet_names))}"
                            )
                        sheet = self.sheet
                    return pd.read_excel(book, sheet_name=sheet, header=None, dtype=str)
        except PipelineError:
            raise
        except ImportError as err:
            raise PipelineError(f"cannot read {self.labels}: {err}; save it as .xlsx or .csv") from err
        except Exception as err:  # corrupt file, not a spreadsheet, ...
            raise self._wrong_format(f"unreadable: {type(err).__name__}: {err}".replace("\n", " ")) from err
        raise PipelineError(f"{self.labels_key} {self.labels}: unsupported file type, use .xlsx, .xls or "
                            ".csv")

    def _read_table(self) -> pd.DataFrame:
        """Rows with columns subject, sample, onset, apex, offset, emotion (text, verbatim)."""
        raw = self._read_raw()
        wanted = list(self.columns.values())
        for index in range(min(HEADER_SEARCH_ROWS, len(raw))):
            header = [_cell_text(v) for v in raw.iloc[index].tolist()]
            if all(name in header for name in wanted):
                break
        else:
            raise self._wrong_format(
                f"no header row with these columns in its first {HEADER_SEARCH_ROWS} rows"
            )
        body = raw.iloc[index + 1 :]
        table = pd.DataFrame(
            {
                field: body.iloc[:, header.index(column)].map(_cell_text)
                for field, column in self.columns.items()
            }
        )
        return table[table["sample"] != ""].reset_index(drop=True)

    # ---- samples ------------------------------------------------------------------------

    def sample_folder(self, subject: str, sample: str) -> Path:
        """Directory of one sample's frames, from the normalised subject id and the Filename: under the
        subject's folder as the dataset names it (root/sub01), else under the one folder of root that
        names the same subject another way (01, 1, Sub01; SAMM's 6 for 006)."""
        folder = self.root / self.subject_folder(subject)
        if not folder.is_dir():
            folder = self._subject_folders.get(subject, folder)
        return folder / sample

    @functools.cached_property
    def _subject_folders(self) -> dict[str, Path]:
        """Normalised subject id -> the folder of root that spells it, where exactly one does."""
        found: dict[str, list[Path]] = {}
        for path in sorted(self.root.iterdir()):
            if not path.is_dir() or is_system_file(path):
                continue
            try:
                found.setdefault(normalise_subject(self.name, path.name), []).append(path)
            except PipelineError:
                continue  # not a subject folder
        return {subject: paths[0] for subject, paths in found.items() if len(paths) == 1}

    def subject_folder(self, subject: str) -> str:
        """Folder name of a normalised subject id ("casme2_sub01" -> "sub01", "samm_006" -> "006")."""
        return f"{self.subject_folder_prefix}{self.subject_number(subject):0{self.subject_digits}d}"

    def subject_number(self, subject: str) -> int:
        return int(subject.rsplit("_", 1)[1].removeprefix(self.subject_folder_prefix))

    def sample_name(self, name: str) -> str:
        """A sample name as another label file spells it (MEGC2019's csv) -> this dataset's Filename."""
        return name

    def _fix_table(self) -> dict[tuple[str, str], list[LabelFix]]:
        table: dict[tuple[str, str], list[LabelFix]] = {}
        for fix in self.fixes:
            table.setdefault((normalise_subject(self.name, fix.subject), fix.sample), []).append(fix)
        return table

    def samples(self) -> list[Sample]:
        """This dataset's protocol: emotions mapped by `class_map` (others left out); sorted."""
        return self.select(lambda subject, sample, emotion: self.class_map.get(emotion.lower()))

    def select(self, choose: Selector) -> list[Sample]:
        """Read the spreadsheet, keep the rows `choose` gives a class, apply the fix table, validate;
        sorted. `label` indexes `self.classes`."""
        self.fixes_applied = []
        self.dropped = set()
        table = self._read_table()
        fixes = self._fix_table()
        out: list[Sample] = []
        seen: set[tuple[str, str]] = set()
        for row in table.itertuples(index=False):
            try:
                subject = normalise_subject(self.name, row.subject)
            except PipelineError as err:
                raise PipelineError(f"{self.labels}, sample {row.sample}: {err}") from err
            cls = choose(subject, row.sample, row.emotion)
            if cls is None:
                continue  # outside this protocol (others, sadness, fear, ...)
            key = (subject, row.sample)
            where = f"{self.name} {self.subject_folder(subject)}/{row.sample}"
            if key in seen:
                raise PipelineError(f"{where} appears twice in {self.labels}: remove the duplicate row")
            seen.add(key)
            values = {"onset": row.onset, "apex": row.apex, "offset": row.offset}
            dropped = False
            for fix in fixes.get(key, []):
                if not _same_cell(values[fix.field], fix.found):
                    log.debug(
                        "%s: fix for %s %r not needed (cell is %r)", where, fix.field, fix.found, values
                    )
                    continue
                if self.label_defects == "drop":
                    repair = "row dropped (label_defects=drop)"
                    message = f"{where}: {fix.field} {fix.found!r} ({fix.defect}) -> {repair}"
                    dropped = True
                else:
                    message = f"{where}: {fix.field} {fix.found!r} -> {fix.repaired} ({fix.reason})"
                    values[fix.field] = str(fix.repaired)
                log.warning("label fix: %s", message)
                self.fixes_applied.append(message)
            if dropped:
                self.dropped.add(key)
                continue
            frames = self._validate(where, values)
            out.append(
                Sample(
                    subject=subject,
                    sample=row.sample,
                    folder=self.sample_folder(subject, row.sample),
                    onset=frames["onset"],
                    apex=frames["apex"],
                    offset=frames["offset"],
                    emotion=row.emotion,
                    label=self.classes.index(cls),
                )
            )
        return sorted(out, key=lambda s: (s.subject, s.sample))

    def _validate(self, where: str, values: Mapping[str, str]) -> dict[str, int]:
        frames: dict[str, int] = {}
        for field, text in values.items():
            value = _frame_value(text)
            if value is None:
                raise PipelineError(
                    f"{where}: {self.columns[field]} {text!r} is not a frame number: fix that row of "
                    f"{self.labels} (or add it to {type(self).__name__}.fixes; "
                    "data.label_defects=drop drops it)"
                )
            frames[field] = value
        if not frames["onset"] <= frames["apex"] <= frames["offset"]:
            raise PipelineError(
                f"{where}: onset <= apex <= offset fails (onset {frames['onset']}, apex {frames['apex']}, "
                f"offset {frames['offset']}): fix that row of {self.labels} (or add it to "
                f"{type(self).__name__}.fixes; data.label_defects=drop drops it)"
            )
        return frames

    # ---- frames -------------------------------------------------------------------------

    @abstractmethod
    def frame_stem(self, sample: Sample) -> str:
        """Regular expression of a frame file's name without its suffix; group 1 is the frame number."""

    @abstractmethod
    def frame_name(self, sample: Sample, frame: int) -> str:
        """The file name the dataset ships absolute frame `frame` under (for messages)."""

    def frame_number(self, sample: Sample, filename: str) -> int | None:
        """The frame number a file name of this sample's folder encodes, None if not a frame image."""
        path = Path(filename)
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            return None
        match = re.fullmatch(self.frame_stem(sample), path.stem, re.IGNORECASE)
        return int(match.group(1)) if match else None

    def _check_folder(self, sample: Sample) -> None:
        if sample.folder.is_dir():
            return
        # a root one level too high (CASME2/ holding Cropped/sub01/...) is the usual slip: name the right one
        inside = sample.folder.relative_to(self.root)
        below = [d for d in sorted(self.root.iterdir()) if d.is_dir() and (d / inside).is_dir()]
        hint = f"; it is under {below[0]}: set {self.root_key} to that folder" if below else ""
        raise PipelineError(
            f"{self.name} {sample.subject}/{sample.sample}: sample folder {sample.folder} "
            f"does not exist: check {self.root_key} (expected {self.frame_help}){hint}"
        )

    def frame_files(self, sample: Sample) -> dict[int, Path]:
        """Frame number -> image file of `sample` (one directory listing), numbers ascending."""
        self._check_folder(sample)

        def preference(path: Path) -> tuple[bool, int, str]:
            suffix = path.suffix.lower()
            rank = IMAGE_SUFFIXES.index(suffix) if suffix in IMAGE_SUFFIXES else len(IMAGE_SUFFIXES)
            return suffix != self.frame_suffix, rank, path.name

        files: dict[int, Path] = {}
        for path in sorted(sample.folder.iterdir(), key=preference):
            number = self.frame_number(sample, path.name)
            if number is not None and path.is_file():
                files.setdefault(number, path)
        return dict(sorted(files.items()))

    def frame_path(self, sample: Sample, frame: int, files: dict[int, Path] | None = None,
                   role: str = "") -> Path:
        """The image file of absolute frame number `frame` of `sample`. `files`: the sample's
        `frame_files` where the caller has them (one directory listing for several frames); `role`
        ("onset", "apex") names the frame in the error."""
        files = self.frame_files(sample) if files is None else files
        if frame in files:
            return files[frame]
        present = f"frames present {min(files)}–{max(files)}" if files else "no frame images there"
        raise PipelineError(
            f"{self.name} {sample.subject}/{sample.sample}: {f'{role} frame' if role else 'frame'} {frame} "
            f"is missing (tried "
            f"{sample.folder / self.frame_name(sample, frame)} in any image format; {present}): "
            f"check {self.root_key} and the spreadsheet's frame numbers"
        )

    def frame_numbers(self, sample: Sample) -> list[int]:
        """Frame numbers present in `sample.folder`, sorted numerically."""
        numbers = list(self.frame_files(sample))
        if not numbers:
            raise PipelineError(
                f"{self.name} {sample.subject}/{sample.sample}: no frame images in {sample.folder} "
                f"(expected {self.frame_help}): check {self.root_key}"
            )
        return numbers

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, labels={str(self.labels)!r}, "
            f"classes={self.n_classes})"
        )


class Casme2(MicroExpressionDataset):
    """CASME II: `CASME2-coding-*.xlsx`, frames `root/subNN/<Filename>/img<N>.jpg` (or `reg_img<N>.jpg`)."""

    name = "casme2"
    title = "CASME II"
    sheet = None
    columns: ClassVar[dict[str, str]] = {
        "subject": "Subject",
        "sample": "Filename",
        "onset": "OnsetFrame",
        "apex": "ApexFrame",
        "offset": "OffsetFrame",
        "emotion": "Estimated Emotion",
    }
    class_maps: ClassVar[dict[int, dict[str, str]]] = {
        3: {"happiness": "positive", "disgust": "negative", "repression": "negative", "surprise": "surprise"},
        4: {
            "happiness": "positive",
            "disgust": "disgust",
            "repression": "repression",
            "surprise": "surprise",
        },
    }
    fixes = (
        LabelFix(
            subject="04",
            sample="EP12_01f",
            field="apex",
            found="/",
            repaired=291,
            defect="apex is '/', not a frame number",
            reason="2014 coding file",
        ),
        LabelFix(
            subject="05",
            sample="EP09_05f",
            field="apex",
            found="69",
            repaired=96,
            defect="apex == onset (69): no onset-to-apex motion",
            reason="midpoint of onset 69 and offset 123: true apex unknown, midpoint = least-biased guess",
        ),
    )
    subject_digits = 2
    subject_folder_prefix = "sub"
    frame_help = "root/subNN/<Filename>/img<N>.jpg or reg_img<N>.jpg"

    def frame_stem(self, sample: Sample) -> str:
        return r"(?:reg_)?img(\d+)"

    def frame_name(self, sample: Sample, frame: int) -> str:
        return f"img{frame}.jpg"


class Samm(MicroExpressionDataset):
    """SAMM: `SAMM_Micro_FACS_Codes_v2.xlsx` sheet MICRO_ONLY, frames `root/006/006_1_2/006_05562.jpg`.

    4-class: anger / disgust / positive / surprise, with Contempt counted as disgust (module docstring).
    """

    name = "samm"
    title = "SAMM"
    sheet = "MICRO_ONLY"
    columns: ClassVar[dict[str, str]] = {
        "subject": "Subject",
        "sample": "Filename",
        "onset": "Onset Frame",
        "apex": "Apex Frame",
        "offset": "Offset Frame",
        "emotion": "Estimated Emotion",
    }
    class_maps: ClassVar[dict[int, dict[str, str]]] = {
        3: {
            "happiness": "positive",
            "anger": "negative",
            "contempt": "negative",
            "disgust": "negative",
            "surprise": "surprise",
        },
        4: {
            "happiness": "positive",
            "anger": "anger",
            "contempt": "disgust",
            "disgust": "disgust",
            "surprise": "surprise",
        },
    }
    fixes = (
        LabelFix(
            subject="028",
            sample="028_4_1",
            field="apex",
            found="1143",
            repaired=1134,
            defect="apex 1143 > offset 1134",
            reason="digit transposition of 1134; Duration 64 = offset-onset+1 confirms the offset",
        ),
        LabelFix(
            subject="032",
            sample="032_3_1",
            field="apex",
            found="1930",
            repaired=4930,
            defect="apex 1930 < onset 4896",
            reason="typo for 49xx: 4930 is the one-digit change inside onset 4896..offset 4970",
        ),
        LabelFix(
            subject="032",
            sample="032_3_2",
            field="apex",
            found="5127",
            repaired=5166,
            defect="apex = onset + 1 (5126 -> 5127): no onset-to-apex motion",
            reason="midpoint of onset 5126 and offset 5207: true apex unknown, midpoint = least-biased guess",
        ),
    )
    subject_digits = 3
    subject_folder_prefix = ""
    subject_example = "006 or 6"
    frame_help = "root/<subject>/<Filename>/<subject>_<N:05d>.jpg, e.g. 006/006_1_2/006_05562.jpg"

    def frame_stem(self, sample: Sample) -> str:
        return rf"0*{self.subject_number(sample.subject)}_(\d+)"  # 006_05562 or 6_05562

    def frame_name(self, sample: Sample, frame: int) -> str:
        return f"{self.subject_folder(sample.subject)}_{frame:05d}.jpg"


class Synthetic(Casme2):
    """The embedded synthetic set: CASME II's on-disk and spreadsheet format, no known defects."""

    name = "synthetic"
    title = "synthetic (CASME II format)"
    fixes = ()


def middle_apex(frames: Sequence[int]) -> int:
    """The present frame nearest the clip's middle in time, (first + last) / 2; the earlier on a tie."""
    middle = (frames[0] + frames[-1]) / 2
    return min(frames, key=lambda n: (abs(n - middle), n))


# How the apex of a clip without an apex annotation (SMIC) is chosen, from its sorted frame numbers.
# `middle` is what most MEGC2019 peers use; a spotted apex would be another entry here.
APEX_POLICIES: dict[str, Callable[[Sequence[int]], int]] = {"middle": middle_apex}

_SMIC_SUBJECT = re.compile(r"^s(\d+)$", re.IGNORECASE)


class Smic(MicroExpressionDataset):
    """SMIC-HS: no spreadsheet, the folders are the labels.

    `root/s<N>/micro/{negative,positive,surprise}/s<N>_{ne,po,sur}_<NN>/reg_image<frame>.bmp` (root =
    `SMIC_all_cropped/HS`) or `image<frame>.bmp` (root = `SMIC_all_raw/HS`, 640×480); subject
    folders not zero padded, `non_micro/` ignored, frame numbers the camera's absolute counter.
    Onset = first frame present, offset = last, apex by `apex_policy` (SMIC has no apex
    annotation). Some clips miss frames: a gap is logged and the frames present are used, so the
    three frames always exist. Subject, micro/ and emotion folders in any case; a clip folder spelled
    as MEGC2019 spells the clip (s01_ne_01) is named as the release names it (s1_ne_01).
    """

    name = "smic"
    title = "SMIC-HS"
    class_maps: ClassVar[dict[int, dict[str, str]]] = {
        3: {"negative": "negative", "positive": "positive", "surprise": "surprise"},
    }
    subject_digits = 2  # in the id only ("smic_s01", as MEGC2019 writes it); folders are s1 ... s20
    subject_folder_prefix = "s"
    subject_example = "s01, s1 or 1"
    frame_help = "root/s<N>/micro/<emotion>/s<N>_<ne|po|sur>_<NN>/reg_image<frame>.bmp or image<frame>.bmp"
    frame_suffix = ".bmp"

    def __init__(self, root: Path | str, labels: Path | str | None = None, classes: int = 3,
                 label_defects: str = "repair", apex_policy: str = "middle",
                 settings: tuple[str, str] = ("data.root", "data.labels")) -> None:
        if apex_policy not in APEX_POLICIES:
            raise PipelineError(f"data.apex_policy is {apex_policy!r}: use one of {', '.join(APEX_POLICIES)}")
        self.apex_policy = apex_policy
        super().__init__(root, labels, classes, label_defects, settings)

    def _resolve_labels(self, labels: Path | str | None) -> Path:
        if labels is not None and str(labels).strip():
            raise PipelineError(f"{self.labels_key} is {str(labels)!r}: {self.title} has no label "
                                "spreadsheet, its emotion folders are the labels; "
                                f'set {self.labels_key} to ""')
        return self.root  # where the labels come from, for messages

    def label_files(self) -> list[Path]:
        return []  # the folders are the labels

    def subject_folder(self, subject: str) -> str:
        return f"s{self.subject_number(subject)}"

    def sample_name(self, name: str) -> str:
        # MEGC2019 pads the subject in clip names, the folders do not: s01_ne_01 -> s1_ne_01
        return re.sub(r"^s0*(\d+)_", r"s\1_", name)

    def select(self, choose: Selector) -> list[Sample]:
        """Walk the micro/ folders, keep the clips `choose` gives a class; sorted."""
        subject_dirs = [(path, match) for path in sorted(self.root.iterdir())
                        if path.is_dir() and (match := _SMIC_SUBJECT.match(path.name))]
        if not subject_dirs:
            raise PipelineError(f"no SMIC subject folders (s1, s2, ...) in {self.root_key} {self.root}: set "
                                f"{self.root_key} to the HS folder (e.g. SMIC_all_cropped/HS; "
                                f"{self.frame_help})")
        micro_dirs = [(path / name, match) for path, match in subject_dirs  # s07, s10, s16, s17 have none
                      for name in sorted(os.listdir(path))
                      if name.lower() == "micro" and (path / name).is_dir()]
        if not micro_dirs:
            raise PipelineError(f"no micro/<emotion>/<clip> folders in the subject folders of "
                                f"{self.root_key} {self.root} (expected {self.frame_help}): SMIC-HS as "
                                "released; the long clips of SMIC-E need their onset / offset sheet, "
                                "which is not read here")
        out: list[Sample] = []
        seen: dict[tuple[str, str], Path] = {}  # s1/ beside S1/, s1_ne_01/ beside s01_ne_01/
        for micro, match in micro_dirs:
            subject = normalise_subject(self.name, match.group(1))
            for clip in sorted(micro.glob("*/*")):
                if not clip.is_dir() or is_system_file(clip) or is_system_file(clip.parent):
                    continue
                emotion, name = clip.parent.name, self.sample_name(clip.name)  # s01_ne_01 -> s1_ne_01
                cls = choose(subject, name, emotion)
                if cls is None:
                    continue
                if (subject, name) in seen:
                    raise PipelineError(f"{self.name} {subject}/{name}: two folders hold this clip, "
                                        f"{seen[subject, name]} and {clip}: keep one of them")
                seen[subject, name] = clip
                sample = Sample(subject, name, clip, 0, 0, 0, emotion, self.classes.index(cls))
                frames = self.frame_numbers(sample)
                if len(frames) != frames[-1] - frames[0] + 1:
                    log.warning("%s %s/%s: %d frame(s) missing between %d and %d; apex chosen among "
                                "the frames present", self.name, micro.parent.name, clip.name,
                                frames[-1] - frames[0] + 1 - len(frames), frames[0], frames[-1])
                apex = APEX_POLICIES[self.apex_policy](frames)
                out.append(replace(sample, onset=frames[0], apex=apex, offset=frames[-1]))
        return sorted(out, key=lambda s: (s.subject, s.sample))

    def frame_stem(self, sample: Sample) -> str:
        return r"(?:reg_)?image(\d+)"

    def frame_name(self, sample: Sample, frame: int) -> str:
        return f"reg_image{frame}.bmp"


DATASETS: dict[str, type[MicroExpressionDataset]] = {
    cls.name: cls for cls in (Casme2, Samm, Smic, Synthetic)
}


MEGC2019_MEMBERS = ("casme2", "samm", "smic")
MEGC2019_CLASSES = ("negative", "positive", "surprise")  # combined_3class_gt.csv classes 0, 1, 2


class Megc2019(MicroExpressionDataset):
    """The MEGC2019 composite: the samples and 3 classes of `combined_3class_gt.csv` (no header:
    database, subject, filename, class), frames and onset / apex from each member dataset.

    Subjects keep their member prefix (`casme2_sub01`, `samm_006`, `smic_s01`), so LOSO folds and
    per-dataset scores follow from the subject id. `members` may leave datasets out (their rows are
    skipped); a member it names must have its root.
    """

    name = "megc2019"
    title = "MEGC2019 composite"
    class_maps: ClassVar[dict[int, dict[str, str]]] = {3: {c: c for c in MEGC2019_CLASSES}}

    def __init__(self, roots: Mapping[str, Path | str], labels: Path | str | None,
                 sheets: Mapping[str, Path | str | None] | None = None,
                 members: Sequence[str] = MEGC2019_MEMBERS, classes: int = 3, label_defects: str = "repair",
                 apex_policy: str = "middle") -> None:
        if classes != 3:
            raise PipelineError(f"data.classes is {classes!r}: megc2019 is a 3-class protocol; "
                                "set data.classes=3")
        chosen = list(members)
        if not chosen or len(set(chosen)) != len(chosen) or not set(chosen) <= set(MEGC2019_MEMBERS):
            raise PipelineError(f"data.members is {chosen!r}: a non-empty list of distinct names out of "
                                f"{', '.join(MEGC2019_MEMBERS)}")
        if labels is None or not str(labels).strip() or not Path(labels).is_file():
            raise PipelineError(f"data.labels {str(labels or '')!r} is not a file: set data.labels to "
                                "MEGC2019's combined_3class_gt.csv")
        self.labels = Path(labels)
        self.root = self.labels.parent
        self.n_classes, self.label_defects = 3, label_defects
        self.class_map = self.class_maps[3]
        self.classes = list(MEGC2019_CLASSES)
        self.fixes_applied, self.dropped = [], set()
        self.members: dict[str, MicroExpressionDataset] = {}
        for name in chosen:
            root = roots.get(name)
            if root is None or not Path(root).is_dir():
                raise PipelineError(f"data.roots.{name}: {root} does not exist (megc2019 reads "
                                    f"{', '.join(chosen)}): put the dataset there, set data.roots.{name}, "
                                    f"or leave {name} out of data.members")
            sheet = (sheets or {}).get(name)
            settings = (f"data.roots.{name}", f"data.sheets.{name}")
            try:
                self.members[name] = (
                    Smic(root, None, 3, label_defects, apex_policy, settings) if name == Smic.name
                    else DATASETS[name](root, sheet, 3, label_defects, settings))
            except PipelineError as err:
                raise PipelineError(f"megc2019 member {name}: {err}") from err

    def _wanted(self) -> dict[str, dict[tuple[str, str], str]]:
        """member -> {(subject, Filename): class} from the csv, members left out skipped."""
        try:
            table = pd.read_csv(self.labels, header=None, dtype=str, keep_default_na=False)
        except Exception as err:  # not a csv, empty, ...
            raise PipelineError(f"{self.labels} is not MEGC2019's combined_3class_gt.csv "
                                f"({type(err).__name__}): set data.labels to that file") from err
        wanted: dict[str, dict[tuple[str, str], str]] = {name: {} for name in self.members}
        for row in table.itertuples(index=False):
            cells = [c.strip() for c in row]
            if len(cells) != 4 or cells[0].lower() not in MEGC2019_MEMBERS or cells[3] not in ("0", "1", "2"):
                raise PipelineError(f"{self.labels} is not MEGC2019's combined_3class_gt.csv (row "
                                    f"{','.join(cells)}; expected database,subject,filename,class 0-2, "
                                    "no header): set data.labels")
            database, subject, filename, label = cells[0].lower(), *cells[1:]
            if database in self.members:
                key = (normalise_subject(database, subject), self.members[database].sample_name(filename))
                wanted[database][key] = MEGC2019_CLASSES[int(label)]
        return wanted

    def samples(self) -> list[Sample]:
        """The csv's samples and classes; every row of a chosen member must be found in it."""
        wanted = self._wanted()
        out = self.select(lambda subject, sample, _: wanted[subject.split("_", 1)[0]].get((subject, sample)))
        for name, member in self.members.items():
            missing = sorted(set(wanted[name]) - {(s.subject, s.sample) for s in out} - member.dropped)
            if missing:
                listed = ", ".join(f"{subject}/{sample}" for subject, sample in missing[:5])
                more = ", ..." if len(missing) > 5 else ""
                sheet = f" and data.sheets.{name}" if member.label_files() else ""  # SMIC: its folders
                raise PipelineError(f"{len(missing)} {name} sample(s) of {self.labels} not in "
                                    f"{member.labels} ({listed}{more}): check data.roots.{name}{sheet}")
        return out

    def select(self, choose: Selector) -> list[Sample]:
        """Every member's `select(choose)`, labels as indices into this composite's classes; sorted."""
        self.fixes_applied, self.dropped = [], set()
        out = []
        for member in self.members.values():
            out += [replace(s, label=self.classes.index(member.classes[s.label]))
                    for s in member.select(choose)]
            self.fixes_applied += member.fixes_applied
            self.dropped |= member.dropped
        return sorted(out, key=lambda s: (s.subject, s.sample))

    def label_files(self) -> list[Path]:
        return [self.labels, *(path for member in self.members.values() for path in member.label_files())]

    def member(self, sample: Sample) -> MicroExpressionDataset:
        return self.members[sample.subject.split("_", 1)[0]]

    def frame_files(self, sample: Sample) -> dict[int, Path]:
        return self.member(sample).frame_files(sample)

    def frame_path(self, sample: Sample, frame: int, files: dict[int, Path] | None = None,
                   role: str = "") -> Path:
        return self.member(sample).frame_path(sample, frame, files, role)

    def frame_numbers(self, sample: Sample) -> list[int]:
        return self.member(sample).frame_numbers(sample)

    def frame_stem(self, sample: Sample) -> str:
        return self.member(sample).frame_stem(sample)

    def frame_name(self, sample: Sample, frame: int) -> str:
        return self.member(sample).frame_name(sample, frame)

    def __repr__(self) -> str:
        roots = {name: str(member.root) for name, member in self.members.items()}
        return f"Megc2019(roots={roots!r}, labels={str(self.labels)!r})"


def normalise_subject(dataset_name: str, raw: Any) -> str:
    """A subject id as `<dataset>_subNN` (CASME II format), `samm_NNN` or `smic_sNN`: "sub09", "9", "09", 9 ->
    one id."""
    cls = DATASETS.get(dataset_name)
    if cls is None:
        raise PipelineError(f"unknown dataset {dataset_name!r}: choose one of {', '.join(sorted(DATASETS))}")
    text = _cell_text(raw)
    if isinstance(raw, float) and raw.is_integer():
        text = str(int(raw))
    text = text.lower().removeprefix(f"{dataset_name}_")
    match = re.fullmatch(r"(?:sub|s)?\s*(\d+)(?:\.0+)?", text)
    if not match:
        raise PipelineError(
            f"subject {raw!r} is not a {cls.title} subject id (expected e.g. {cls.subject_example}): "
            "fix the Subject column"
        )
    number = int(match.group(1))
    return f"{dataset_name}_{cls.subject_folder_prefix}{number:0{cls.subject_digits}d}"


def get_dataset(
    name: str,
    root: Path | str,
    labels: Path | str | None = None,
    classes: int = 3,
    label_defects: str = "repair",
) -> MicroExpressionDataset:
    """The dataset `name` (params `data.dataset`) on `root` with its label spreadsheet."""
    key = str(name).strip().lower()
    cls = DATASETS.get(key)
    if key == Megc2019.name:
        raise PipelineError("megc2019 reads several datasets' roots and sheets: build it from params.yaml's "
                            "data section with dataset_from_params")
    if cls is None:
        names = sorted([*DATASETS, Megc2019.name])
        raise PipelineError(f"unknown data.dataset {name!r}: choose one of {', '.join(names)}")
    return cls(root, labels=labels, classes=classes, label_defects=label_defects)


def dataset_from_params(data: Mapping[str, Any]) -> MicroExpressionDataset:
    """The dataset of params.yaml's `data` section (docs/datasets.md, "Your own dataset")."""
    name = str(data["dataset"]).strip().lower()
    if name == Megc2019.name:
        # Member roots and sheets are relative to data.root, the one folder DVC tracks for `frames`
        # (an absolute path stays as it is).
        base = Path(data["root"])

        def under_root(paths: Mapping[str, Any] | None) -> dict[str, Path]:
            return {m: base / str(p) for m, p in (paths or {}).items() if str(p or "").strip()}

        return Megc2019(under_root(data["roots"]), data["labels"] or None, under_root(data.get("sheets")),
                        data["members"], data["classes"], data["label_defects"], data["apex_policy"])
    if name == Smic.name:
        return Smic(data["root"], data["labels"] or None, data["classes"], data["label_defects"],
                    data["apex_policy"])
    return get_dataset(name, data["root"], data["labels"] or None, data["classes"], data["label_defects"])


def unwatched_label_files(dataset: MicroExpressionDataset, root: Path | str) -> list[Path]:
    """The label files of `dataset` outside `root` (data.root, the folder the `frames` stage declares
    to DVC): editing one of them does not make `dvc repro` rerun anything. A link inside root is
    watched (DVC hashes what a link points to)."""
    inside = Path(os.path.abspath(root))
    return [path for path in dataset.label_files() if not Path(os.path.abspath(path)).is_relative_to(inside)]


def fix_table_markdown() -> str:
    """Every dataset's fix table as one markdown table (for docs/datasets.md, "Label fixes")."""
    lines = [
        "| dataset | sample | defect | repair | reason |",
        "|---|---|---|---|---|",
    ]
    for cls in DATASETS.values():
        for fix in cls.fixes:
            folder = normalise_subject(cls.name, fix.subject).removeprefix(f"{cls.name}_")
            lines.append(
                f"| {cls.name} | {folder}/{fix.sample} | {fix.defect} "
                f"| {fix.field} {fix.found} -> {fix.repaired} | {fix.reason} |"
            )
    return "\n".join(lines) + "\n"

