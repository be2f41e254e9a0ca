"""Each preprocessing step on clean input from real photos (scikit-image's astronaut, matplotlib's Grace
Hopper) with known warps: a step may only remove a nuisance, never add flow of its own."""

from __future__ import annotations

import cv2
import matplotlib.cbook
import numpy as np
import pytest
import skimage.data

from mer.common import load_params
from mer.flow import flow_pair, grey, match_illumination
from mer.magnify import magnify_pair

SIZE = 224
X, Y = np.meshgrid(np.arange(SIZE, dtype=np.float32), np.arange(SIZE, dtype=np.float32))
BUMP = 0.4 * np.exp(-((X - 112) ** 2 + (Y - 150) ** 2) / (2 * 15.0**2))  # 0.4 px to the right at most
MOVING, STILL = BUMP > 0.2, BUMP < 1e-3


def photo(name: str) -> np.ndarray:
    """A 224² RGB float crop around the face."""
    if name == "astronaut":
        face = skimage.data.astronaut()[0:300, 100:400]
    else:
        path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        face = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)[60:420, 80:440]
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
@pytest.mark.parametrize("method", ["none", "phase", "linear"])
def test_magnification_adds_no_flow_where_nothing_moved(name: str, method: str, flow_params: dict) -> None:
    """Outside the moving region the flow to the magnified apex stays at the noise floor of the
    un-magnified pair."""
    onset, apex = pair(name)
    params = {**flow_params, "illumination": "none"}
    plain = flow_pair((onset, apex), params)
    magnified = flow_pair((onset, magnify_pair(onset, apex, method, 3.0, 4, 4, 2.0)), params)
    floor = float(np.sqrt((plain[STILL] ** 2).sum(-1).mean()))
    still = float(np.sqrt((magnified[STILL] ** 2).sum(-1).mean()))
    limit = {"none": 1.0, "phase": 1.6, "linear": 3.0}[method]  # linear amplifies the noise itself
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
