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

N is the absolute frame number the spreadsheet uses.
"""

from __future__ import annotations

import logging
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from stages.common import PipelineError

log = logging.getLogger(__name__)

LABEL_SUFFIXES = (".xlsx", ".xls", ".csv")
LABEL_DEFECT_POLICIES = ("repair", "drop")
HEADER_SEARCH_ROWS = 40  # the header row must be among the first rows of the sheet


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
    frame_help: ClassVar[str] = ""

    def __init__(
        self,
        root: Path | str,
        labels: Path | str | None = None,
        classes: int = 3,
        label_defects: str = "repair",
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise PipelineError(
                f"data.root {self.root} does not exist (dataset {self.name}): "
                "put the dataset there or set data.root (`dvc exp run -S data.root=...`)"
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

    # ---- labels -------------------------------------------------------------------------

    def _resolve_labels(self, labels: Path | str | None) -> Path:
        """The spreadsheet: `labels` if given, else the single one found directly in root."""
        if labels is not None and str(labels).strip():
            path = Path(labels)
            if not path.is_file():
                raise PipelineError(
                    f"data.labels {path} does not exist: set data.labels to the {self.title} coding "
                    f'spreadsheet (`dvc exp run -S data.labels=...`) or to "" to use the one in data.root'
                )
            return path
        found = sorted(p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in LABEL_SUFFIXES)
        if len(found) != 1:
            what = "no label spreadsheet" if not found else f"{len(found)} spreadsheets"
            names = f" ({', '.join(p.name for p in found)})" if found else ""
            raise PipelineError(
                f"{what} (.xlsx/.xls/.csv) in data.root {self.root}{names}: set data.labels to the "
                f"{self.title} coding spreadsheet (`dvc exp run -S data.labels=path/to/file`)"
            )
        return found[0]

    def _wrong_format(self, detail: str) -> PipelineError:
        expected = ", ".join(self.columns.values())
        return PipelineError(
            f"{self.labels} is not a {self.title} coding file ({detail}; expected columns {expected}): "
            f"set data.labels to the {self.title} spreadsheet or data.dataset to the matching dataset"
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
        raise PipelineError(f"data.labels {self.labels}: unsupported file type, use .xlsx, .xls or .csv")

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
        """Directory of one sample's frames, from the normalised subject id and the Filename."""
        return self.root / self.subject_folder(subject) / sample

    def subject_folder(self, subject: str) -> str:
        """Folder name of a normalised subject id ("casme2_sub01" -> "sub01", "samm_006" -> "006")."""
        number = int(subject.rsplit("_", 1)[1].removeprefix("sub"))
        return f"{self.subject_folder_prefix}{number:0{self.subject_digits}d}"

    def _fix_table(self) -> dict[tuple[str, str], list[LabelFix]]:
        table: dict[tuple[str, str], list[LabelFix]] = {}
        for fix in self.fixes:
            table.setdefault((normalise_subject(self.name, fix.subject), fix.sample), []).append(fix)
        return table

    def samples(self) -> list[Sample]:
        """Read the spreadsheet, apply the fix table, map emotions to classes, validate; sorted."""
        self.fixes_applied = []
        table = self._read_table()
        fixes = self._fix_table()
        out: list[Sample] = []
        seen: set[tuple[str, str]] = set()
        for row in table.itertuples(index=False):
            cls = self.class_map.get(row.emotion.lower())
            if cls is None:
                continue  # emotion outside this protocol (others, sadness, fear, ...)
            try:
                subject = normalise_subject(self.name, row.subject)
            except PipelineError as err:
                raise PipelineError(f"{self.labels}, sample {row.sample}: {err}") from err
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
    def frame_names(self, sample: Sample, frame: int) -> list[str]:
        """Candidate file names of absolute frame `frame`, preferred first."""

    @abstractmethod
    def frame_number(self, sample: Sample, filename: str) -> int | None:
        """The frame number encoded in a file name of this sample's folder, None if not a frame."""

    def _check_folder(self, sample: Sample) -> None:
        if not sample.folder.is_dir():
            raise PipelineError(
                f"{self.name} {sample.subject}/{sample.sample}: sample folder {sample.folder} "
                f"does not exist: check data.root (expected {self.frame_help})"
            )

    def frame_path(self, sample: Sample, frame: int) -> Path:
        """The image file of absolute frame number `frame` of `sample`."""
        self._check_folder(sample)
        names = self.frame_names(sample, frame)
        for name in names:
            path = sample.folder / name
            if path.is_file():
                return path
        tried = " or ".join(str(sample.folder / n) for n in names)
        raise PipelineError(
            f"{self.name} {sample.subject}/{sample.sample}: frame {frame} is missing (tried {tried}): "
            f"check data.root and the spreadsheet's frame numbers"
        )

    def frame_numbers(self, sample: Sample) -> list[int]:
        """Frame numbers present in `sample.folder`, sorted numerically."""
        self._check_folder(sample)
        numbers = {
            n
            for p in sample.folder.iterdir()
            if p.is_file() and (n := self.frame_number(sample, p.name)) is not None
        }
        if not numbers:
            raise PipelineError(
                f"{self.name} {sample.subject}/{sample.sample}: no frame images in {sample.folder} "
                f"(expected {self.frame_help}): check data.root"
            )
        return sorted(numbers)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, labels={str(self.labels)!r}, "
            f"classes={self.n_classes})"
        )


_CASME2_FRAME = re.compile(r"^(?:reg_)?img(\d+)\.jpg$")


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

    def frame_names(self, sample: Sample, frame: int) -> list[str]:
        return [f"img{frame}.jpg", f"reg_img{frame}.jpg"]

    def frame_number(self, sample: Sample, filename: str) -> int | None:
        match = _CASME2_FRAME.match(filename)
        return int(match.group(1)) if match else None


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
    frame_help = "root/<subject>/<Filename>/<subject>_<N:05d>.jpg, e.g. 006/006_1_2/006_05562.jpg"

    def frame_names(self, sample: Sample, frame: int) -> list[str]:
        subject = self.subject_folder(sample.subject)
        return [f"{subject}_{frame:05d}.jpg"]

    def frame_number(self, sample: Sample, filename: str) -> int | None:
        subject = self.subject_folder(sample.subject)
        match = re.match(rf"^{subject}_(\d+)\.jpg$", filename)
        return int(match.group(1)) if match else None


class Synthetic(Casme2):
    """The embedded synthetic set: CASME II's on-disk and spreadsheet format, no known defects."""

    name = "synthetic"
    title = "synthetic (CASME II format)"
    fixes = ()


DATASETS: dict[str, type[MicroExpressionDataset]] = {cls.name: cls for cls in (Casme2, Samm, Synthetic)}


def normalise_subject(dataset_name: str, raw: Any) -> str:
    """A subject id as `<dataset>_subNN` (CASME II format) or `samm_NNN`: "sub09", "9", "09", 9 -> one id."""
    cls = DATASETS.get(dataset_name)
    if cls is None:
        raise PipelineError(f"unknown dataset {dataset_name!r}: choose one of {', '.join(sorted(DATASETS))}")
    text = _cell_text(raw)
    if isinstance(raw, float) and raw.is_integer():
        text = str(int(raw))
    text = text.lower().removeprefix(f"{dataset_name}_")
    match = re.fullmatch(r"(?:sub)?\s*(\d+)(?:\.0+)?", text)
    if not match:
        raise PipelineError(
            f"subject {raw!r} is not a {cls.title} subject id (expected e.g. "
            f"{'sub01, 01 or 1' if cls.subject_digits == 2 else '006 or 6'}): fix the Subject column"
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
    cls = DATASETS.get(str(name).strip().lower())
    if cls is None:
        raise PipelineError(f"unknown data.dataset {name!r}: choose one of {', '.join(sorted(DATASETS))}")
    return cls(root, labels=labels, classes=classes, label_defects=label_defects)


def fix_table_markdown() -> str:
    """Every dataset's fix table as one markdown table (for the README's "Label fixes")."""
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


FIXES_MARKDOWN = fix_table_markdown()
