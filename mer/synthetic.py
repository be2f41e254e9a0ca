"""The synthetic generator: the embedded synthetic dataset, written in CASME II's on-disk format.

`data/raw/synthetic/CASME2-coding-synthetic.xlsx` (the CASME II 2019 coding-sheet layout) and
`data/raw/synthetic/subNN/<Filename>/img<N>.jpg` (640×480 colour JPEG, onset..offset frames,
absolute frame numbers that do not start at 1, some crossing a digit boundary: img99, img100).

How a sample is made:

- Identities: two real face photos shipped by installed packages (scikit-image's `astronaut`,
  matplotlib's `grace_hopper.jpg`), each cropped around its face, then varied per subject by
  scale (face 200-260 px wide, as in CASME II), rotation, shift, mirroring, a smooth random
  shape warp and colour (per-channel gain, gamma), and composited with a feathered ellipse onto a
  blurred, tinted studio-like background. dlib's detector must find exactly one face on it.
- Expression: the action units of the row move their landmarks (dlib 68 points of the neutral
  face) through a smooth displacement field (Gaussian bumps, sigma 6-16 px) applied with
  `cv2.remap` on float maps and bicubic interpolation, so sub-pixel motion is real. The peak
  displacement at the apex is uniform in `synthetic.amplitude_px`; it rises from onset to apex
  and decays to offset along raised-cosine ramps.
- Distractors in every class: per-sample pose and brightness, head drift over the sequence
  (translation + rotation), blinks in some sequences, an illumination ramp, sensor noise.
  None of them depends on the class: only the action-unit motion does.
- Emotions in CASME II's proportions (others 99, disgust 63, happiness 32, surprise 28,
  repression 27), spread round-robin over subjects so that every class is in several subjects.

Deterministic: the same `synthetic` params give byte-identical files, whatever `workers` is
(every sample has its own random stream seeded by (seed, row); the xlsx has fixed timestamps).
"""

from __future__ import annotations

import functools
import io
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from mer.common import PipelineError, parallel_map

LABELS_NAME = "CASME2-coding-synthetic.xlsx"
WIDTH, HEIGHT = 640, 480
FACE_WIDTH = (200.0, 260.0)  # dlib box width on the canvas, px (CASME II faces at 640x480)
# The nuisances (params.yaml `synthetic.nuisance`); these defaults render the embedded set.
NUISANCE = {
    "noise_sigma": 2.0,         # sensor noise, grey levels of 255
    "jpeg_quality": 95,
    "drift_px": [0.5, 2.5],     # head translation over a sequence, px
    "drift_deg": 0.4,           # head rotation over a sequence, at most, degrees
    "light_ramp": 0.04,         # illumination change over a sequence, at most, fraction
    "light_ramp_p": 1.0,        # share of sequences whose light changes (the rest: constant light)
    "blink_p": 0.3,
    "contrast": [1.0, 1.0],     # per-sample contrast about mid-grey, uniform in this range
    "still_background": False,  # true: the head drift moves the head alone, the background stays (as filmed)
}
FIXED_TIME = "2019-07-01T00:00:00Z"  # xlsx document timestamps (the real sheet's date)
ZIP_TIME = (2019, 7, 1, 0, 0, 0)

# CASME II 2019 counts (sadness 4 and fear 2 left out: too few to matter).
EMOTION_COUNTS = {"others": 99, "disgust": 63, "happiness": 32, "surprise": 28, "repression": 27}
THREE_CLASS = {"happiness": "positive", "disgust": "negative", "repression": "negative",
               "surprise": "surprise"}
# Action-unit codes per emotion, CASME II style (L/R = the subject's left/right side only).
EMOTION_AUS = {
    "happiness": ("12", "12", "L12", "R12", "6+12"),
    "disgust": ("4+9", "4+10", "9+10", "4+9+10", "4+9", "4+R10"),
    "repression": ("14", "15", "17", "15+17", "14+17"),
    "surprise": ("1+2", "1+2", "L1+L2", "1+2+26", "1+2+25", "1+26"),
    "others": ("7", "43", "25", "5", "7+43", "6+7", "24", "16"),
}
HEADER = ("Subject", "Filename", None, "OnsetFrame", "ApexFrame", "OffsetFrame", None,
          "Action Units", "Estimated Emotion", "Objective Classes")
COLUMNS = [name if name else f"Unnamed: {i}" for i, name in enumerate(HEADER)]  # as pandas reads it
# Filename patterns, cycled over rows: mostly EPyy_zz(f), a few irregular ones as in CASME II.
FILENAME_PATTERNS = ("EP{:02d}_{:02d}f", "EP{:02d}_{:02d}", "EP{:02d}_{:02d}f", "EP{:02d}f",
                     "EP{:02d}_{:02d}", "EP{:02d}_{:02d}f", "EP{:02d}_{:d}", "EP{:02d}_{:02d}",
                     "EP{:02d}_{:02d}_{:02d}", "EP{:02d}_{:02d}f")

# Action units as Gaussian bumps on dlib-68 landmarks: (points, (outward, up) direction, sigma as
# a fraction of the face width). Outward/up are face axes (away from the midline / towards the brows).
AU_BUMPS: dict[int, tuple[tuple[tuple[int, ...], tuple[float, float], float], ...]] = {
    1: (((20, 21, 22, 23), (0.0, 1.0), 0.045),),  # inner brow raiser
    2: (((17, 18, 19, 24, 25, 26), (0.0, 1.0), 0.045),),  # outer brow raiser
    4: (((19, 20, 21, 22, 23, 24), (-0.5, -1.0), 0.045),),  # brow lowerer: down and together
    5: (((37, 38, 43, 44), (0.0, 1.0), 0.03),),  # upper lid raiser
    6: (((1, 2, 14, 15), (0.0, 1.0), 0.06), ((40, 41, 46, 47), (0.0, 1.0), 0.05)),  # cheek raiser
    7: (((40, 41, 46, 47), (-0.3, 1.0), 0.03),),  # lid tightener: lower lids up
    9: (((31, 35), (0.0, 1.0), 0.035), ((29,), (0.0, 0.6), 0.04)),  # nose wrinkler: wings up
    10: (((50, 51, 52), (0.0, 1.0), 0.035),),  # upper lip raiser
    12: (((48, 54), (0.6, 0.8), 0.04),),  # lip corner puller: up and out
    14: (((48, 54), (-1.0, 0.0), 0.035),),  # dimpler: corners in
    15: (((48, 54), (0.0, -1.0), 0.04),),  # lip corner depressor: corners down
    16: (((56, 57, 58), (0.0, -1.0), 0.03),),  # lower lip depressor
    17: (((57,), (0.0, 0.7), 0.035), ((8,), (0.0, 1.0), 0.065)),  # chin raiser (chin bump below)
    24: (((51,), (0.0, -0.6), 0.03), ((57,), (0.0, 0.6), 0.03)),  # lip pressor
    25: (((51,), (0.0, 0.4), 0.03), ((57,), (0.0, -1.0), 0.03)),  # lips part
    26: (((57,), (0.0, -1.0), 0.05), ((7, 8, 9), (0.0, -1.0), 0.07)),  # jaw drop
    43: (((37, 38, 43, 44), (0.0, -1.0), 0.03),),  # eyes closed (slowly, with the apex)
}
CHIN_FROM_LIP = 0.5  # AU17's chin bump sits between the lower lip (57) and the chin (8)


@dataclass(frozen=True)
class Identity:
    canvas: np.ndarray  # HEIGHT×WIDTH×3 uint8 BGR neutral face
    landmarks: np.ndarray  # 68×2 float32 (x, y)
    box: tuple[float, float, float, float]  # dlib face box (left, top, right, bottom)


@dataclass(frozen=True)
class SampleSpec:
    """One coding-sheet row and everything random about how it is rendered."""

    index: int
    subject: int  # 1-based
    filename: str
    onset: int
    apex: int
    offset: int
    emotion: str
    action_units: str
    amplitude: float  # peak AU displacement at the apex, px
    blink: tuple[int, int, float] | None  # (first frame index, frames, closure 0-1)

    @property
    def objective_class(self) -> int:
        return objective_class(self.action_units)


# ---- the coding sheet ---------------------------------------------------------------------------


def parse_action_units(code: str) -> list[tuple[str, int]]:
    """'L1+L2+26' -> [('L', 1), ('L', 2), ('', 26)]."""
    out = []
    for part in code.split("+"):
        match = re.fullmatch(r"([LR]?)(\d+)", part)
        if not match:
            raise ValueError(f"bad action unit {part!r} in {code!r}")
        out.append((match.group(1), int(match.group(2))))
    return out


def objective_class(code: str) -> int:
    """CASME II's AU-based objective classes: I AU6/12, II AU1/2/5/25/26/27, IV AU9/10,
    V AU15/17, III AU4/7, VII the rest (VI, AU1+4 / fear, is not generated)."""
    units = {au for _, au in parse_action_units(code)}
    for klass, members in ((1, {6, 12}), (2, {1, 2, 5, 25, 26, 27}), (4, {9, 10}), (5, {15, 17}),
                           (3, {4, 7})):
        if units & members:
            return klass
    return 7


def emotion_counts(samples: int) -> dict[str, int]:
    """CASME II's emotion proportions on `samples` rows (largest remainder)."""
    total = sum(EMOTION_COUNTS.values())
    exact = {e: samples * n / total for e, n in EMOTION_COUNTS.items()}
    counts = {e: int(v) for e, v in exact.items()}
    by_remainder = sorted(exact, key=lambda e: (-(exact[e] - counts[e]), list(EMOTION_COUNTS).index(e)))
    for emotion in by_remainder[: samples - sum(counts.values())]:
        counts[emotion] += 1
    return counts


def nuisance(params: dict[str, Any]) -> dict[str, Any]:
    """`synthetic.nuisance` over the defaults; unknown keys are an error (a typo would go unseen)."""
    given = params.get("nuisance") or {}
    unknown = sorted(set(given) - set(NUISANCE))
    if unknown:
        raise PipelineError(f"synthetic.nuisance: unknown keys {unknown}; known: {sorted(NUISANCE)}")
    return {**NUISANCE, **given}


def check_params(params: dict[str, Any]) -> None:
    keys = ("seed", "subjects", "samples", "onset_to_apex", "apex_to_offset", "amplitude_px")
    missing = [k for k in keys if k not in params]
    if missing:
        raise PipelineError(f"params.yaml synthetic: missing {', '.join(missing)}")
    subjects, samples = int(params["subjects"]), int(params["samples"])
    if not 1 <= subjects <= 99:
        raise PipelineError(f"synthetic.subjects is {subjects}: use 1..99 (folders sub01..sub99)")
    if params["onset_to_apex"] < 1 or params["apex_to_offset"] < 0:
        raise PipelineError("synthetic.onset_to_apex must be >= 1 and synthetic.apex_to_offset >= 0")
    low, high = (float(v) for v in params["amplitude_px"])
    if not 0 < low <= high <= 10:
        raise PipelineError(
            f"synthetic.amplitude_px {params['amplitude_px']}: use [low, high] with 0 < low <= high <= 10"
        )
    counts = emotion_counts(samples)
    kept = sum(counts[e] for e in THREE_CLASS)
    if kept < 2 * subjects or min(counts[e] for e in THREE_CLASS) < 1:
        needed = next(n for n in range(samples, 100 * subjects + 100) if _three_class(n) >= 2 * subjects)
        raise PipelineError(
            f"synthetic.samples {samples} gives {kept} three-class samples for {subjects} subjects: "
            f"every subject needs >= 2, raise synthetic.samples to >= {needed} (or lower synthetic.subjects)"
        )


def _three_class(samples: int) -> int:
    counts = emotion_counts(samples)
    return sum(counts[e] for e in THREE_CLASS) if min(counts[e] for e in THREE_CLASS) >= 1 else 0


def plan(params: dict[str, Any]) -> list[SampleSpec]:
    """The coding sheet's rows (sorted by subject, then Filename) and their random render settings."""
    check_params(params)
    seed, subjects, samples = int(params["seed"]), int(params["subjects"]), int(params["samples"])
    rng = np.random.default_rng([seed, 0])
    counts = emotion_counts(samples)
    # Three-class emotions first, round-robin over subjects in a random order: every subject gets
    # the same number (±1) of kept samples and each class lands in as many subjects as it can.
    order = ["happiness", "surprise", "repression", "disgust", "others"]
    emotions = [e for e in order for _ in range(counts[e])]
    subject_order = rng.permutation(subjects) + 1
    rows: list[dict[str, Any]] = []
    used: dict[int, set[tuple[int, int]]] = {s: set() for s in range(1, subjects + 1)}
    for k, emotion in enumerate(emotions):
        subject = int(subject_order[k % subjects])
        while True:  # an (episode, clip) pair unused in this subject
            pair = (int(rng.integers(1, 20)), int(rng.integers(1, 13)))
            if pair not in used[subject]:
                used[subject].add(pair)
                break
        pattern = FILENAME_PATTERNS[k % len(FILENAME_PATTERNS)]
        filename = pattern.format(*pair, int(rng.integers(1, 3)))
        rows.append(dict(subject=subject, filename=filename, emotion=emotion,
                         aus=EMOTION_AUS[emotion][int(rng.integers(len(EMOTION_AUS[emotion])))]))
    # Distinct (episode, clip) pairs can still format alike ("EP09f"): make names unique per subject.
    seen: set[tuple[int, str]] = set()
    for row in rows:
        while (row["subject"], row["filename"]) in seen:
            row["filename"] += "f"
        seen.add((row["subject"], row["filename"]))
    rows.sort(key=lambda r: (r["subject"], r["filename"]))

    low, high = (float(v) for v in params["amplitude_px"])
    blink_p = nuisance(params)["blink_p"]
    rise, fall = int(params["onset_to_apex"]), int(params["apex_to_offset"])
    length = rise + fall + 1
    specs = []
    for index, row in enumerate(rows):
        r = np.random.default_rng([seed, 1, index])
        kind = index % 4
        if kind == 0 and length >= 2:  # crosses 99 -> 100
            onset = int(r.integers(max(2, 101 - length), 100))
        elif kind == 1 and length >= 2:  # crosses 9 -> 10
            onset = int(r.integers(max(2, 11 - length), 10)) if length <= 9 else int(r.integers(2, 10))
        else:
            onset = int(r.integers(11, 400))
        blink = None
        if r.random() < blink_p:
            frames = int(min(length, r.integers(3, 6)))
            blink = (int(r.integers(0, length - frames + 1)), frames, float(r.uniform(0.6, 1.0)))
        specs.append(SampleSpec(index=index, subject=row["subject"], filename=row["filename"],
                                onset=onset, apex=onset + rise, offset=onset + rise + fall,
                                emotion=row["emotion"], action_units=row["aus"],
                                amplitude=float(r.uniform(low, high)), blink=blink))
    return specs


def coding_table(specs: list[SampleSpec]) -> pd.DataFrame:
    """The coding sheet as `pd.read_excel(..., dtype=object)` reads it back."""
    rows = []
    for s in specs:
        aus: Any = int(s.action_units) if s.action_units.isdigit() else s.action_units
        rows.append([f"{s.subject:02d}", s.filename, np.nan, s.onset, s.apex, s.offset, np.nan, aus,
                     s.emotion, s.objective_class])
    return pd.DataFrame(rows, columns=COLUMNS, dtype=object)


def write_coding_sheet(table: pd.DataFrame, path: Path) -> None:
    """The CASME II 2019 layout (Sheet1; text Subject; blank columns C and G), byte-reproducible."""
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet.title = "Sheet1"
    sheet.append(list(HEADER))
    for row in table.itertuples(index=False):
        sheet.append([None if isinstance(v, float) and np.isnan(v) else v for v in row])
    for cell in sheet["A"]:
        cell.number_format = "@"  # Subject is a text cell, "01"
    buffer = io.BytesIO()
    book.save(buffer)
    # openpyxl stamps the current time into docProps/core.xml and each zip entry: pin both.
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "docProps/core.xml":
                stamp = rb"\g<1>" + FIXED_TIME.encode()
                data = re.sub(rb"(<dcterms:(created|modified)[^>]*>)[^<]*", stamp, data)
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o600 << 16
            dst.writestr(info, data)


# ---- identities ---------------------------------------------------------------------------------


@functools.cache
def source_photos() -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(BGR float32 photo cropped around its one face, face box l,t,r,b) for each source photo."""
    import matplotlib.cbook
    import skimage.data

    from mer import face

    astronaut = cv2.cvtColor(skimage.data.astronaut(), cv2.COLOR_RGB2BGR)
    grace = cv2.imread(str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    out = []
    for photo in (astronaut, grace):
        boxes = face.detector()(photo, 0)
        if len(boxes) != 1:
            raise RuntimeError(f"expected one face in a source photo, dlib found {len(boxes)}")
        b = boxes[0]
        w, h = b.width(), b.height()
        # Crop around the face (the astronaut's badge is a second "face" further down).
        left, right = max(0, b.left() - int(0.9 * w)), min(photo.shape[1], b.right() + int(0.9 * w))
        top, bottom = max(0, b.top() - int(1.0 * h)), min(photo.shape[0], b.bottom() + int(0.9 * h))
        crop = photo[top:bottom, left:right].astype(np.float32)
        out.append((crop, np.array([b.left() - left, b.top() - top, b.right() - left, b.bottom() - top],
                                   dtype=np.float64)))
    return tuple(out)


def _rotation(angle_deg: float, scale: float, centre: tuple[float, float],
              shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """2×3 affine: rotate/scale about `centre`, then translate by `shift` (image coordinates)."""
    matrix = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), float(angle_deg), float(scale))
    matrix[:, 2] += shift
    return matrix


def _bump_field(shape: tuple[int, int], centres: np.ndarray, vectors: np.ndarray,
                sigmas: np.ndarray) -> np.ndarray:
    """H×W×2 float32 sum of Gaussian bumps (evaluated within 4 sigma of each centre)."""
    field = np.zeros((*shape, 2), np.float32)
    for (cx, cy), vector, sigma in zip(centres, vectors, sigmas):
        x0, x1 = int(max(0, cx - 4 * sigma)), int(min(shape[1], cx + 4 * sigma + 1))
        y0, y1 = int(max(0, cy - 4 * sigma)), int(min(shape[0], cy + 4 * sigma + 1))
        if x0 >= x1 or y0 >= y1:
            continue
        gx = np.exp(-((np.arange(x0, x1, dtype=np.float32) - cx) ** 2) / (2 * sigma**2))
        gy = np.exp(-((np.arange(y0, y1, dtype=np.float32) - cy) ** 2) / (2 * sigma**2))
        weight = gy[:, None] * gx[None, :]
        field[y0:y1, x0:x1] += weight[..., None] * np.asarray(vector, np.float32)
    return field


def _grid() -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(WIDTH, dtype=np.float32), np.arange(HEIGHT, dtype=np.float32))


def head_region(points: np.ndarray, shape: tuple[int, int] = (HEIGHT, WIDTH)) -> np.ndarray:
    """`shape` float32 in [0, 1]: a soft ellipse over the face, forehead and hair of the 68 `points`,
    where the head's drift applies; outside it the background stays still."""
    gx, gy = np.meshgrid(np.arange(shape[1], dtype=np.float32), np.arange(shape[0], dtype=np.float32))
    width, height = np.ptp(points[:, 0]), np.ptp(points[:, 1])
    centre_x, centre_y = points[:, 0].mean(), points[:, 1].mean() - 0.15 * height
    inside = ((gx - centre_x) / (0.8 * width)) ** 2 + ((gy - centre_y) / (1.0 * height)) ** 2 < 1
    return cv2.GaussianBlur(inside.astype(np.float32), (0, 0), 4)


def _apply_affine(matrix: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = matrix.astype(np.float32)
    return m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]


def detect_faces(image: np.ndarray) -> list[tuple[int, int, int, int]]:
    """dlib frontal faces at full resolution, no upsampling."""
    from mer import face

    return [(r.left(), r.top(), r.right(), r.bottom()) for r in face.detector()(image, 0)]


def _one_face_downstream(image: np.ndarray) -> bool:
    """Exactly one face both at full size and as the `frames` stage looks (320 px wide, upsample 1)."""
    from mer import face

    small = cv2.resize(image, (320, 240), interpolation=cv2.INTER_AREA)
    return len(detect_faces(image)) == 1 and len(face.detector()(small, 1)) == 1


def make_identity(seed: int, subject: int) -> Identity:
    """Subject `subject`'s neutral face on a 640×480 canvas, varied from one of the source photos."""
    from mer import face

    photos = source_photos()
    rng = np.random.default_rng([seed, 2, subject])
    photo, box = photos[(subject - 1) % len(photos)]
    for _attempt in range(50):
        face_width = rng.uniform(*FACE_WIDTH)
        scale = face_width / (box[2] - box[0])
        angle = rng.uniform(-6, 6)
        mirror = rng.random() < 0.5
        centre = (WIDTH / 2 + rng.uniform(-50, 50), HEIGHT / 2 + rng.uniform(-20, 25))
        # source -> canvas: (mirror about the face centre), rotate+scale, move the face centre.
        src_centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        flip = np.array([[-1, 0, 2 * src_centre[0]], [0, 1, 0], [0, 0, 1]]) if mirror else np.eye(3)
        place = np.vstack([_rotation(angle, scale, src_centre,
                                     (centre[0] - src_centre[0], centre[1] - src_centre[1])), [0, 0, 1]])
        matrix = (place @ flip)[:2]
        sharp = cv2.warpAffine(photo, matrix, (WIDTH, HEIGHT), flags=cv2.INTER_CUBIC,
                               borderMode=cv2.BORDER_REFLECT_101)
        # Shape: a smooth random warp (a few wide bumps on the face).
        n = 5
        centres = np.column_stack([centre[0] + rng.uniform(-0.5, 0.5, n) * face_width,
                                   centre[1] + rng.uniform(-0.5, 0.6, n) * face_width])
        vectors = rng.normal(0, 1, (n, 2)) * rng.uniform(1.5, 5.0)
        field = _bump_field((HEIGHT, WIDTH), centres, vectors, rng.uniform(0.15, 0.3, n) * face_width)
        gx, gy = _grid()
        sharp = cv2.remap(sharp, gx - field[..., 0], gy - field[..., 1], cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_REFLECT_101)
        # Colour: per-channel gain and a gamma (skin tone, white balance, exposure).
        gain = rng.uniform(0.85, 1.15, 3).astype(np.float32)
        gamma = rng.uniform(0.8, 1.25)
        sharp = 255.0 * np.clip(sharp * gain / 255.0, 0, 1) ** gamma
        # Background: blurred photo under a vertical colour gradient (studio-like).
        top_colour, bottom_colour = rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)
        t = np.linspace(0, 1, HEIGHT, dtype=np.float32)[:, None, None]
        gradient = (1 - t) * top_colour + t * bottom_colour
        background = 0.5 * cv2.GaussianBlur(sharp, (0, 0), 20) + 0.5 * gradient
        # Head: feathered ellipse around the face, hair and neck.
        mask = np.zeros((HEIGHT, WIDTH), np.float32)
        axes = (int(0.85 * face_width), int(1.15 * face_width))
        ellipse_centre = (int(round(centre[0])), int(round(centre[1] - 0.1 * face_width)))
        cv2.ellipse(mask, ellipse_centre, axes, -angle, 0, 360, 1.0, -1)
        mask = cv2.GaussianBlur(mask, (0, 0), 0.06 * face_width)[..., None]
        canvas = np.clip(mask * sharp + (1 - mask) * background, 0, 255)
        canvas = np.rint(canvas).astype(np.uint8)
        faces = detect_faces(canvas)
        if len(faces) != 1 or not _one_face_downstream(canvas):
            continue
        detected = np.asarray(faces[0], np.float64)
        points = face.landmarks68(canvas, detected, face.default_predictor_path())
        return Identity(canvas=canvas, landmarks=points, box=tuple(float(v) for v in detected))
    raise RuntimeError(f"no single-face identity for subject {subject} after 50 attempts")


# ---- expression, distractors, rendering ---------------------------------------------------------


def face_axes(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(midline point, outward-right unit, up unit, face width) from dlib-68 landmarks."""
    eyes = points[36:48].mean(axis=0)
    mouth = points[48:60].mean(axis=0)
    up = (eyes - mouth) / np.linalg.norm(eyes - mouth)
    right = np.array([-up[1], up[0]])  # image right for an upright face (y down)
    if right[0] < 0:
        right = -right
    width = float(np.linalg.norm(points[16] - points[0]))
    return points[27:31].mean(axis=0), right, up, width


def au_bumps(points: np.ndarray, code: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centres N×2, displacement vectors N×2 (unit-ish), sigmas N) of an action-unit code."""
    mid, right, up, width = face_axes(points)
    centres, vectors, sigmas = [], [], []
    for side, au in parse_action_units(code):
        for indices, (outward, upward), sigma in AU_BUMPS[au]:
            for i in indices:
                centre = points[i].astype(np.float64)
                if au == 17 and i == 8:
                    centre = (1 - CHIN_FROM_LIP) * points[57] + CHIN_FROM_LIP * points[8]
                if au == 6 and i in (1, 2, 14, 15):  # cheek: between the face contour and the nose
                    centre = 0.55 * points[i] + 0.45 * points[30]
                across = float(np.dot(centre - mid, right))
                sign = np.sign(across) if abs(across) > 0.03 * width else 0.0
                # L = the subject's left = image right (for an unmirrored frontal photo).
                if (side == "L" and sign < 0) or (side == "R" and sign > 0):
                    continue
                if side and sign == 0:
                    continue
                vector = outward * sign * right + upward * up
                centres.append(centre)
                vectors.append(vector)
                sigmas.append(sigma * width)
    return np.array(centres), np.array(vectors), np.array(sigmas)


def temporal_profile(rise: int, fall: int) -> np.ndarray:
    """Raised-cosine rise 0 -> 1 over `rise` frames, then decay to 0 over `fall` frames."""
    up = 0.5 * (1 - np.cos(np.pi * np.arange(rise + 1) / rise))
    down = 0.5 * (1 + np.cos(np.pi * np.arange(1, fall + 1) / fall)) if fall else np.zeros(0)
    return np.concatenate([up, down])


def blink_field(points: np.ndarray, closure: float) -> tuple[np.ndarray, np.ndarray]:
    """(H×W×2 eyelid displacement, H×W darkening weight) of a blink of depth `closure`."""
    _, _, up, width = face_axes(points)
    centres, vectors, sigmas = [], [], []
    mask = np.zeros((HEIGHT, WIDTH), np.float32)
    for eye in (points[36:42], points[42:48]):
        opening = float(np.linalg.norm((eye[1] + eye[2]) / 2 - (eye[4] + eye[5]) / 2))
        eye_width = float(np.linalg.norm(eye[3] - eye[0]))
        lid = (eye[1] + eye[2]) / 2 + up * 0.15 * opening
        centres.append(lid)
        vectors.append(-up * closure * max(opening, 0.08 * eye_width))
        sigmas.append(0.25 * eye_width)  # small: the brows, ~2 sigma above, barely move
        centre = eye.mean(axis=0)
        cv2.ellipse(mask, (int(round(centre[0])), int(round(centre[1]))),
                    (int(0.6 * eye_width), int(max(0.5 * eye_width * 0.5, 3))), 0, 0, 360, 1.0, -1)
    mask = cv2.GaussianBlur(mask, (0, 0), 0.05 * width) * (0.3 * closure)
    return _bump_field((HEIGHT, WIDTH), np.array(centres), np.array(vectors), np.array(sigmas)), mask


@functools.cache
def _noise_table(sigma: float) -> np.ndarray:
    """Gaussian quantiles (sd `sigma`) indexed by a uniform uint16: 3x faster than sampling."""
    from statistics import NormalDist

    normal = NormalDist(0.0, sigma)
    return np.array([normal.inv_cdf((i + 0.5) / 65536) for i in range(65536)], np.float32)


def render_sample(spec: SampleSpec, identity: Identity,
                  params: dict[str, Any]) -> list[tuple[int, np.ndarray]]:
    """(frame number, 480×640×3 uint8 BGR frame) for the onset..offset frames of one sample."""
    rng = np.random.default_rng([int(params["seed"]), 3, spec.index])
    extra = nuisance(params)
    # Draws added with the nuisance params come from a stream of their own: the defaults render
    # the same bytes as before they existed.
    light_rng = np.random.default_rng([int(params["seed"]), 4, spec.index])
    constant_light = light_rng.random() >= extra["light_ramp_p"]
    contrast = light_rng.uniform(*extra["contrast"])
    rise, fall = int(params["onset_to_apex"]), int(params["apex_to_offset"])
    profile = temporal_profile(rise, fall)
    length = len(profile)
    box = identity.box
    face_centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    gx, gy = _grid()
    for _attempt in range(20):
        # Per-sample pose and brightness, drawn independently of the class.
        pose = _rotation(rng.uniform(-2, 2), rng.uniform(0.97, 1.03), face_centre,
                         (rng.uniform(-8, 8), rng.uniform(-6, 6)))
        brightness = rng.uniform(0.92, 1.08)
        # Head drift over the sequence: translation in a random direction plus a small rotation.
        direction = rng.uniform(0, 2 * np.pi)
        drift = rng.uniform(*extra["drift_px"]) * np.array([np.cos(direction), np.sin(direction)])
        drift_angle = rng.uniform(-extra["drift_deg"], extra["drift_deg"])
        ramp = rng.uniform(-extra["light_ramp"], extra["light_ramp"])  # drawn either way: later draws stay
        if constant_light:
            ramp = 0.0
        noise_seed = int(rng.integers(2**32))
        points = cv2.transform(identity.landmarks[None].astype(np.float64), pose)[0]
        centres, vectors, sigmas = au_bumps(points, spec.action_units)
        au = _bump_field((HEIGHT, WIDTH), centres, vectors, sigmas)
        au *= spec.amplitude / max(float(np.sqrt((au**2).sum(axis=2)).max()), 1e-6)
        blink = blink_field(points, spec.blink[2]) if spec.blink else None
        pose_inverse = cv2.invertAffineTransform(pose)
        still_mask = head_region(points) if extra["still_background"] else None
        noise_rng = np.random.default_rng(noise_seed)
        progress = np.arange(length) / max(length - 1, 1)
        progress = progress * progress * (3 - 2 * progress)  # smoothstep
        canvas = identity.canvas.astype(np.float32)
        frames = []
        for k in range(length):
            head = _rotation(drift_angle * progress[k], 1.0, tuple(points[27:31].mean(axis=0)),
                             tuple(drift * progress[k]))
            # Backward map: output -> undo head drift -> undo expression -> undo pose -> identity.
            y_x, y_y = _apply_affine(cv2.invertAffineTransform(head), gx, gy)
            if still_mask is not None:
                y_x, y_y = gx + still_mask * (y_x - gx), gy + still_mask * (y_y - gy)
            z_x, z_y = y_x, y_y
            shade = None
            if profile[k] > 0:
                d = cv2.remap(au, y_x, y_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
                z_x, z_y = z_x - np.float32(profile[k]) * d[..., 0], z_y - np.float32(profile[k]) * d[..., 1]
            if blink is not None:
                start, frames_, _ = spec.blink
                if start <= k < start + frames_:
                    closure = np.sin(np.pi * (k - start + 1) / (frames_ + 1))
                    b = cv2.remap(blink[0], y_x, y_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
                    z_x, z_y = z_x - closure * b[..., 0], z_y - closure * b[..., 1]
                    shade = 1 - closure * cv2.remap(blink[1], y_x, y_y, cv2.INTER_LINEAR)
            s_x, s_y = (v.astype(np.float32) for v in _apply_affine(pose_inverse, z_x, z_y))
            image = cv2.remap(canvas, s_x, s_y, cv2.INTER_CUBIC,
                              borderMode=cv2.BORDER_REFLECT_101)
            if shade is not None:
                image *= shade[..., None]
            image *= brightness * (1 + ramp * k / max(length - 1, 1))
            if contrast != 1.0:
                image = 128 + contrast * (image - 128)
            noise = _noise_table(float(extra["noise_sigma"]))
            image += noise[noise_rng.integers(0, 65536, image.shape, dtype=np.uint16)]
            np.clip(image, 0, 255, out=image)
            frames.append((spec.onset + k, (image + 0.5).astype(np.uint8)))
        if len(detect_faces(frames[0][1])) == 1 and len(detect_faces(frames[rise][1])) == 1:
            return frames
    raise RuntimeError(f"sample {spec.index}: no single-face rendering after 20 attempts")


def _write_sample(job: tuple[SampleSpec, Identity, dict[str, Any], Path]) -> int:
    spec, identity, params, out_dir = job
    folder = out_dir / f"sub{spec.subject:02d}" / spec.filename
    folder.mkdir(parents=True, exist_ok=True)
    frames = render_sample(spec, identity, params)
    quality = int(nuisance(params)["jpeg_quality"])
    for number, image in frames:
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for {folder}/img{number}.jpg")
        (folder / f"img{number}.jpg").write_bytes(data.tobytes())
    return len(frames)


def synthesize(out_dir: Path, params: dict[str, Any], workers: int) -> pd.DataFrame:
    """Write the synthetic dataset (coding sheet + frames) to `out_dir`; return the coding table.

    `params` is params.yaml's `synthetic` section. `out_dir` is replaced as a whole: the data is
    written beside it and renamed into place at the end, so an interrupted run leaves nothing."""
    out_dir = Path(out_dir)
    specs = plan(params)
    table = coding_table(specs)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        identities = {s: make_identity(int(params["seed"]), s) for s in range(1, int(params["subjects"]) + 1)}
        jobs = [(spec, identities[spec.subject], params, tmp) for spec in specs]
        parallel_map(_write_sample, jobs, workers, desc="synthesize")
        write_coding_sheet(table, tmp / LABELS_NAME)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return table
