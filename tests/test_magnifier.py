"""Learned motion magnification: the network's structure, its training data, its plug-in."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import yaml
from skimage.filters import window
from skimage.metrics import structural_similarity
from skimage.registration import phase_cross_correlation

from mer import magnify
from mer.common import PipelineError
from mer.magnifier import (
    Magnifier,
    Photos,
    flow_fields,
    load_model,
    make_batch,
    photo_crops,
    procedural,
    quantise,
    render,
    save_weights,
    to_tensor,
    to_uint8,
    train_magnifier,
    training_photos,
)
from tests.conftest import REPO

TINY = {"steps": 3, "batch": 1, "patch": 32}


def tiny_params(**update) -> dict:
    p = yaml.safe_load((REPO / "params.yaml").read_text())["magnifier"]
    return {**p, **TINY, **update}


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("weights") / "magnifier.pt"
    save_weights(train_magnifier(tiny_params(), log=False), path)
    return path


def shift(reference: np.ndarray, image: np.ndarray) -> np.ndarray:
    """(dx, dy) of `image` relative to `reference` (grey float), Hann-windowed phase correlation."""
    hann = window("hann", reference.shape)
    a, b = reference - reference.mean(), image - image.mean()
    found, _, _ = phase_cross_correlation(a * hann, b * hann, upsample_factor=100)
    return -found[::-1]


def test_shapes_and_parameter_count():
    model = Magnifier()
    x = torch.zeros(2, 3, 64, 48)
    texture, shape = model.encoder(x)
    assert texture.shape == (2, 32, 16, 12) and shape.shape == (2, 32, 32, 24)
    assert model(x, x, torch.tensor([3.0, 2.0])).shape == x.shape
    n = sum(p.numel() for p in model.parameters())
    assert 850_000 <= n <= 950_000  # 888,995; the official model ~0.93M (docs/magnification.md)


def test_alpha_one_is_exactly_the_reconstruction():
    # h has no bias, so (α − 1)·g(·) = 0 gives h(0) = 0 and the shape passes unchanged.
    torch.manual_seed(0)
    model = Magnifier()
    torch.nn.init.normal_(model.decoder.out[-1].weight, std=0.05)  # not the zero (identity) start
    onset, apex = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(onset, apex, torch.tensor([1.0])), model.reconstruct(apex))
        assert not torch.equal(model(onset, apex, torch.tensor([3.0])), model.reconstruct(apex))


def test_untrained_and_briefly_trained_net_keep_the_input_at_alpha_one(tiny_weights):
    torch.manual_seed(0)
    untrained, trained = Magnifier(), Magnifier()
    trained.load_state_dict(torch.load(tiny_weights, weights_only=True))
    rng, gen = np.random.default_rng(5), torch.Generator().manual_seed(5)
    scene = procedural(rng, gen, 1, 128)
    flow = flow_fields(rng, 64, np.array([0.5]), np.array([False]))
    apex = quantise(render(scene, flow, torch.tensor([[1.0]]))[:, 0], gen, 0.0)
    for model in (untrained, trained):
        with torch.no_grad():
            out = to_uint8(model.reconstruct(apex))[0]
        assert structural_similarity(out, to_uint8(apex)[0], channel_axis=2, data_range=255) >= 0.97


def test_training_is_deterministic(tiny_weights, tmp_path):
    again = tmp_path / "again.pt"
    save_weights(train_magnifier(tiny_params(), log=False), again)
    assert again.read_bytes() == tiny_weights.read_bytes()


@pytest.mark.parametrize(("dx", "dy"), [(0.75, -0.5), (0.1, 0.2), (2.0, 1.0)])
def test_rendered_global_motion_is_the_stated_one(dx, dy):
    scene = procedural(np.random.default_rng(1), torch.Generator().manual_seed(1), 1, 256)
    flow = torch.tensor([dx, dy]).view(1, 2, 1, 1).expand(1, 2, 128, 128)
    onset, moved, triple = render(scene, flow, torch.tensor([[0.0, 1.0, 3.0]]))[0].mean(dim=1).numpy()
    np.testing.assert_allclose(shift(onset, moved), [dx, dy], atol=0.03)
    np.testing.assert_allclose(shift(onset, triple), [3 * dx, 3 * dy], atol=0.06)


def test_local_flow_peaks_at_the_stated_magnitude():
    flow = flow_fields(np.random.default_rng(2), 64, np.array([0.3, 2.0, 1.0]), np.array([True, True, False]))
    norm = flow.norm(dim=1)
    np.testing.assert_allclose(norm.amax(dim=(1, 2)), [0.3, 2.0, 1.0], rtol=1e-4)
    assert norm[:2].amin(dim=(1, 2)).max() < 0.5 * norm[:2].amax(dim=(1, 2)).min()  # local: bumps
    assert torch.allclose(norm[2], torch.ones(64, 64))  # global: one shift


def test_photo_crops_resample_like_cv2():
    # A 64² photo cropped to 128²: every crop is the whole photo (side = min(int(128·scale), 64)),
    # upscaled 2×, mirrored or not: cv2.resize's bicubic, pixel centres and border.
    photo = np.random.default_rng(0).uniform(0, 255, (64, 64, 3)).astype(np.float32)
    photos = Photos(torch.from_numpy(photo).permute(2, 0, 1)[None], np.array([[64, 64]]))
    crops = photo_crops(np.random.default_rng(1), photos, 8, 128).permute(0, 2, 3, 1).numpy()
    expected = np.clip(cv2.resize(photo, (128, 128), interpolation=cv2.INTER_CUBIC), 0, 255)
    mirrored = [np.abs(crop - expected[:, ::-1]).max() < 0.01 for crop in crops]
    straight = [np.abs(crop - expected).max() < 0.01 for crop in crops]
    assert all(m != s for m, s in zip(mirrored, straight)) and any(mirrored) and any(straight)


def test_batch_target_is_alpha_times_the_apex_motion():
    p = tiny_params(batch=6, patch=64, noise_max=0.0, alpha_focus_p=1.0, procedural_p=0.5)
    onset, apex, target, alpha = make_batch(np.random.default_rng(3), torch.Generator().manual_seed(3), p,
                                            training_photos())
    assert onset.shape == apex.shape == target.shape == (6, 3, 64, 64) and alpha.shape == (6,)
    assert ((2.0 <= alpha) & (alpha <= 4.0)).all()
    for x in (onset, apex, target):  # 8-bit grey levels in [-1, 1]
        levels = (x + 1) * 127.5
        assert x.min() >= -1 and x.max() <= 1 and torch.allclose(levels, levels.round(), atol=1e-4)
    # Local or global, the target's motion is α× the apex's wherever something moves.
    grey = [x.mean(dim=1) for x in (onset, apex, target)]
    moved_apex, moved_target = ((g - grey[0]).abs().sum(dim=(1, 2)) for g in grey[1:])
    # Grey-level change is not linear in the motion (large motions saturate): every sample's target
    # moves more than its apex, the batch's 1.5x (alpha >= 2; 1.9-2.9x over batch seeds 0-9).
    assert (moved_target > moved_apex).all() and moved_target.sum() > 1.5 * moved_apex.sum()


def test_batch_is_reproducible():
    p = tiny_params(batch=3, patch=32)
    photos = training_photos()
    first, again = (make_batch(np.random.default_rng(7), torch.Generator().manual_seed(7), p, photos)
                    for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_batch_on_gpu():
    p = tiny_params(batch=4, patch=128)
    gen = torch.Generator("cuda").manual_seed(0)
    onset, apex, target, alpha = make_batch(np.random.default_rng(0), gen, p, training_photos("cuda"))
    assert all(x.is_cuda for x in (onset, apex, target, alpha)) and onset.shape == (4, 3, 128, 128)
    assert train_magnifier(tiny_params(device="cuda", steps=2, batch=4, patch=128), log=False)


@pytest.mark.parametrize("weights, says", [
    ("none.pt", "run `dvc repro magnification/dvc.yaml:train_magnifier`"), ("", "magnify.weights is empty")])
def test_missing_weights_is_one_line_naming_the_stage(tmp_path, weights, says):
    onset = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(PipelineError, match=says) as err:
        magnify.magnify_pair(onset, onset, "learned", 3.0, weights=str(tmp_path / weights) if weights else "")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("shape", [(30, 34, 3), (32, 32, 3), (29, 31)])
def test_learned_through_magnify_pair(tiny_weights, shape):
    rng = np.random.default_rng(0)
    onset = rng.integers(0, 256, shape, dtype=np.uint8)
    apex = np.roll(onset, 1, axis=1)
    out = magnify.magnify_pair(onset, apex, "learned", 3.0, weights=tiny_weights)
    assert out.shape == apex.shape and out.dtype == np.uint8
    assert not np.array_equal(out, apex)  # the net ran
    if shape == (32, 32, 3):  # no padding, RGB: the network's own output, rounded
        net = load_model(tiny_weights)
        with torch.inference_mode():
            x = to_tensor(np.stack([onset, apex]))
            direct = net(x[:1], x[1:], torch.tensor([3.0]))[0]
        expected = ((direct + 1) * 127.5).clamp(0, 255).permute(1, 2, 0).numpy()
        assert np.abs(out.astype(np.float32) - expected).max() <= 0.5 + 1e-3
    assert np.array_equal(magnify.magnify_pair(onset, apex, "learned", 1.0, weights=tiny_weights), apex)


def test_regularised_training_runs():
    # The paper's texture/shape regularisers (off by default, docs/magnification.md) still train, and
    # reach the weights: the same step without them ends elsewhere.
    state = train_magnifier(tiny_params(steps=1, reg_weight=0.1), log=False)
    assert all(torch.isfinite(v).all() for v in state.values())
    plain = train_magnifier(tiny_params(steps=1, reg_weight=0.0), log=False)
    assert any(not torch.equal(state[k], plain[k]) for k in state)
