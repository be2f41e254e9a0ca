"""Each preprocessing step on clean input from real photos (scikit-image's astronaut, matplotlib's Grace
Hopper) with known warps: a step may only remove a nuisance, never add flow of its own."""

from __future__ import annotations

import cv2
import matplotlib.cbook
import numpy as np
import pytest
import skimage.data

from mer import face
from mer.common import load_params, round_uint8
from mer.flow import flow_pair, grey, match_illumination
from mer.frames import align_pair, alignment_matrix, warp
from mer.magnify import magnify_pair
from mer.synthetic import head_region

SIZE = 224
X, Y = np.meshgrid(np.arange(SIZE, dtype=np.float32), np.arange(SIZE, dtype=np.float32))
BUMP = 0.4 * np.exp(-((X - 112) ** 2 + (Y - 150) ** 2) / (2 * 15.0**2))  # 0.4 px to the right at most
MOVING, STILL = BUMP > 0.2, BUMP < 1e-3


def whole_photo(name: str) -> np.ndarray:
    """The whole RGB photo, background included."""
    if name == "astronaut":
        return skimage.data.astronaut()
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


FACE_CROPS = {"astronaut": np.s_[0:300, 100:400], "hopper": np.s_[60:420, 80:440]}  # rows, columns


def photo(name: str) -> np.ndarray:
    """A 224² RGB float crop around the face."""
    face = whole_photo(name)[FACE_CROPS[name]]
    return cv2.resize(face, (SIZE, SIZE), interpolation=cv2.INTER_AREA).astype(np.float32)


def camera(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise (sd 2 grey levels) and 8-bit quantisation."""
    return np.clip(np.rint(image + rng.normal(0, 2, image.shape)), 0, 255).astype(np.uint8)


def pair(name: str, gain: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(onset, apex): the apex is the onset with BUMP moved right, lit `gain` times brighter, both noisy."""
    image, rng = photo(name), np.random.default_rng(0)
    moved = cv2.remap(image, X - BUMP, Y, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT_101)
    return camera(image, rng), camera(moved * gain, rng)


@pytest.fixture(scope="module")
def flow_params() -> dict:
    return load_params()["flow"]


@pytest.mark.parametrize("name", ["astronaut", "hopper"])
def test_lighting_step_leaves_a_constant_light_pair_as_it_was(name: str, flow_params: dict) -> None:
    """Noise alone is no change of light: the default lighting step gives the very flow of no step."""
    onset, apex = pair(name)
    assert flow_params["illumination"] != "none", "the test is about the default lighting step"
    with_step = flow_pair((onset, apex), flow_params)
    without = flow_pair((onset, apex), {**flow_params, "illumination": "none"})
    np.testing.assert_array_equal(with_step, without)


@pytest.mark.parametrize("name", ["astronaut", "hopper"])
def test_lighting_step_removes_a_real_change_of_light(name: str, flow_params: dict) -> None:
    """A 3% brighter apex: without the step the light fakes flow everywhere; with it the still face
    stays as still as under constant light."""
    onset, apex = pair(name, gain=1.03)

    def still_rms(params: dict) -> float:
        flow = flow_pair((onset, apex), params)
        flow -= np.median(flow.reshape(-1, 2), axis=0)
        return float(np.sqrt((flow[STILL] ** 2).sum(-1).mean()))

    unmatched = still_rms({**flow_params, "illumination": "none"})
    matched = still_rms(flow_params)
    constant_light = flow_pair(pair(name), {**flow_params, "illumination": "none"})
    floor = float(np.sqrt((constant_light[STILL] ** 2).sum(-1).mean()))
    assert unmatched > 3 * floor
    assert matched < 1.5 * floor


def test_matched_lighting_is_not_requantised() -> None:
    """A near-identity gain must not round the apex onto other grey levels (contours TV-L1 reads)."""
    onset, _ = pair("astronaut")
    image = grey(onset)
    matched = match_illumination(image, np.clip(np.rint(image * 1.002), 0, 255).astype(np.uint8), degree=0)
    assert matched.dtype == np.float64
    assert np.abs(matched - image).mean() < 0.2


@pytest.mark.parametrize("name", ["astronaut", "hopper"])
@pytest.mark.parametrize("method", ["phase", "linear"])  # `none` is the apex itself (test_magnify.py)
def test_magnification_adds_no_flow_where_nothing_moved(name: str, method: str, flow_params: dict) -> None:
    """Outside the moving region the flow to the magnified apex stays at the noise floor of the
    un-magnified pair."""
    onset, apex = pair(name)
    params = {**flow_params, "illumination": "none"}
    plain = flow_pair((onset, apex), params)
    magnified = flow_pair((onset, magnify_pair(onset, apex, method, 3.0, 4, 4, 2.0)), params)
    floor = float(np.sqrt((plain[STILL] ** 2).sum(-1).mean()))
    still = float(np.sqrt((magnified[STILL] ** 2).sum(-1).mean()))
    limit = {"phase": 1.6, "linear": 3.0}[method]  # linear amplifies the noise itself
    assert still <= limit * floor + 1e-6, f"{method}: {still:.3f} px where nothing moved, floor {floor:.3f}"


@pytest.mark.parametrize("name", ["astronaut", "hopper"])
@pytest.mark.parametrize("method", ["phase", "linear"])
def test_magnification_keeps_the_direction_and_grows_the_movement(name: str, method: str,
                                                                  flow_params: dict) -> None:
    onset, apex = pair(name)
    params = {**flow_params, "illumination": "none"}
    plain = flow_pair((onset, apex), params)[MOVING].mean(axis=0)
    apex_x3 = magnify_pair(onset, apex, method, 3.0, 4, 4, 2.0)
    magnified = flow_pair((onset, apex_x3), params)[MOVING].mean(axis=0)
    cosine = magnified[0] / np.hypot(*magnified)  # the true movement is +x
    assert cosine > 0.95
    assert magnified[0] > 1.5 * plain[0]


def pixel_grid(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))


def expression_and_drift(image: np.ndarray, points: np.ndarray, rng: np.random.Generator,
                         amplitude: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """H×W×2 fields: a sub-pixel expression (brows up, mouth corners out and up) and that plus a
    sub-pixel drift of the head alone (the synthetic generator's head region), the background still."""
    x, y = pixel_grid(image.shape[1], image.shape[0])
    sigma = 0.18 * np.linalg.norm(points[45] - points[36])
    expression = np.zeros((*image.shape[:2], 2), np.float32)
    for point, direction in {19: (0, -1), 24: (0, -1), 21: (0.3, -1), 22: (-0.3, -1),
                             48: (-0.7, -0.7), 54: (0.7, -0.7)}.items():
        bump = np.exp(-((x - points[point, 0]) ** 2 + (y - points[point, 1]) ** 2) / (2 * sigma**2))
        expression += amplitude * bump[..., None] * np.float32(direction)
    head = head_region(points, image.shape[:2])
    drift = rng.normal(0, 0.4, 2).astype(np.float32)
    return expression, expression + head[..., None] * drift


def expression_correlation(flow: np.ndarray, expression: np.ndarray, matrix: np.ndarray) -> float:
    """Correlation of a crop's flow with the frame's true `expression` field on the 28×28 grid the
    probes read, each minus its median."""
    # The expression in crop pixels: sampled where each crop pixel comes from, turned and scaled.
    back = cv2.invertAffineTransform(matrix)
    source = (np.stack([X, Y], -1) @ back[:, :2].T + back[:, 2]).astype(np.float32)
    true = cv2.remap(expression, source[..., 0], source[..., 1], cv2.INTER_LINEAR) @ matrix[:, :2].T
    grids = [cv2.resize(np.float32(f), (28, 28), interpolation=cv2.INTER_AREA) for f in (flow, true)]
    a, b = ((g - np.median(g, axis=(0, 1))).ravel() for g in grids)
    return float(np.corrcoef(a, b)[0, 1])


@pytest.mark.parametrize("name", ["astronaut", "hopper"])
def test_crop_keeps_the_expression_not_the_head_outline(name: str, flow_params: dict) -> None:
    """A real photo whose head drifts over a still background while the face makes a 0.3 px
    expression (noise, JPEG): the default crop's flow, on the 28×28 grid the probes read, follows
    the expression, and more closely than a crop with 15% margin, whose extra cells hold the
    background and the moving outline of the head and hair."""
    image = whole_photo(name)
    predictor_file = face.predictor_path("")
    box, _ = face.find_face(image, 320, 1)
    points = face.landmarks68(image, box, predictor_file)
    default_margin = load_params()["frames"]["margin"]

    def frames(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(onset, apex, the expression's field) of one draw: noise, JPEG 85."""
        rng = np.random.default_rng(seed)
        expression, motion = expression_and_drift(image, points, rng)
        x, y = pixel_grid(image.shape[1], image.shape[0])
        still = image.astype(np.float32)
        moved = cv2.remap(still, x - motion[..., 0], y - motion[..., 1], cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_REFLECT_101)
        jpeg = [cv2.IMWRITE_JPEG_QUALITY, 85]
        onset, apex = (cv2.imdecode(cv2.imencode(".jpg", camera(frame, rng), jpeg)[1], cv2.IMREAD_UNCHANGED)
                       for frame in (still, moved))
        return onset, apex, expression

    def correlation(margin: float, onset: np.ndarray, apex: np.ndarray, expression: np.ndarray) -> float:
        matrix = alignment_matrix(points, SIZE, margin)
        crops = tuple(warp(frame.astype(np.float32), matrix, SIZE) for frame in (onset, apex))  # as `frames`
        return expression_correlation(flow_pair(crops, flow_params), expression, matrix)

    draws = [frames(seed) for seed in range(2)]
    default = np.mean([correlation(default_margin, *draw) for draw in draws])
    wide = np.mean([correlation(0.15, *draw) for draw in draws])
    assert default > 0.8, f"default crop: the flow follows the expression by {default:.2f} only"
    # measured: astronaut 0.923 vs 0.897, Grace Hopper 0.965 vs 0.828
    assert default > wide + 0.02, f"default crop {default:.3f} vs 15% margin {wide:.3f}"


def test_crop_is_not_requantised(flow_params: dict) -> None:
    """A grey camera (as SAMM's), low noise, a 0.2 px expression: the `frames` stage's crops stay float,
    and TV-L1 on them follows the expression at least as closely as on the same crops rounded to 8 bits,
    whose one-grey-level contours on smooth skin are flow to TV-L1 (docs/pipeline.md "The crop")."""
    grey_photo = cv2.cvtColor(whole_photo("astronaut"), cv2.COLOR_RGB2GRAY).astype(np.float32)
    x, y = pixel_grid(grey_photo.shape[1], grey_photo.shape[0])
    predictor_file = face.predictor_path("")
    gains = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        frames_rgb = [np.repeat(camera_grey(grey_photo, rng)[..., None], 3, axis=2)]
        box, _ = face.find_face(frames_rgb[0], 320, 1)
        points = face.landmarks68(frames_rgb[0], box, predictor_file)
        expression, motion = expression_and_drift(frames_rgb[0], points, rng, amplitude=0.2)
        moved = cv2.remap(grey_photo, x - motion[..., 0], y - motion[..., 1], cv2.INTER_CUBIC,
                          borderMode=cv2.BORDER_REFLECT_101)
        frames_rgb.append(np.repeat(camera_grey(moved, rng)[..., None], 3, axis=2))
        crop = align_pair(*frames_rgb, SIZE, 0.0, 320, 1, predictor_file)
        assert crop["onset"].dtype == crop["apex"].dtype == np.float32
        matrix = alignment_matrix(points, SIZE, 0.0)  # the one align_pair used: the same points
        as_is, rounded = (expression_correlation(flow_pair(crops, flow_params), expression, matrix)
                          for crops in ((crop["onset"], crop["apex"]),
                                        (round_uint8(crop["onset"]), round_uint8(crop["apex"]))))
        assert as_is > rounded - 0.002, f"seed {seed}: float crops {as_is:.3f}, rounded {rounded:.3f}"
        gains.append(as_is - rounded)
    # measured: 0.935 / 0.911 / 0.916 against 0.916 / 0.894 / 0.908 rounded (+0.015 on average)
    assert np.mean(gains) > 0.005, f"float crops gain {np.mean(gains):+.4f} only"


def camera_grey(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A grey 8-bit camera with little sensor noise (sd 0.5 grey levels)."""
    return round_uint8(image + rng.normal(0, 0.5, image.shape))
