"""Tests of model/: shapes for every ablation switch, the equations on hand-made inputs, losses,
gradients, pretrained loading, and overfitting a batch of 8."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml

from model import (
    MiHFTr,
    ModelConfig,
    build_loss,
    class_weights,
    count_parameters,
    jitter_landmarks,
    prepare_batch,
)
from model.gcn import EDGES, GCN, NUM_LANDMARKS, node_features
from model.lamif import SCSA, LocalAlignment, block_embedding, landmark_to_feature, sample_blocks
from model.loss import LOSSES, focal_terms, loss_terms
from model.stems import FLOW_SCALE_PX, Stem, stem_geometry

ROOT = Path(__file__).resolve().parents[1]
PAPER_TOTAL = 3_419_074
B = 2


def make_config(**kw) -> ModelConfig:
    return ModelConfig(**kw)


def landmarks_batch(n: int, seed: int = 0) -> torch.Tensor:
    """n x 51 x 4 crop pixels: apex inside the face area, onset within ~2 px of it."""
    g = torch.Generator().manual_seed(seed)
    apex = 40 + 144 * torch.rand(n, NUM_LANDMARKS, 2, generator=g)
    onset = apex + 2 * (torch.rand(n, NUM_LANDMARKS, 2, generator=g) - 0.5)
    return torch.cat([onset, apex], dim=-1)


@pytest.fixture(scope="module")
def feats() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    af = torch.rand(B, 256, 56, 56, generator=g)
    mf = torch.rand(B, 256, 56, 56, generator=g)
    return af, mf, landmarks_batch(B)


# ---------------------------------------------------------------- config


def test_config_defaults_are_params_yaml():
    section = yaml.safe_load((ROOT / "params.yaml").read_text())["model"]
    cfg = ModelConfig.from_params(section)
    assert list(vars(cfg)) == list(section)
    assert cfg == ModelConfig()
    assert cfg.stem_layers == 11 and cfg.block == 4 and cfg.dim == 256 and cfg.alpha == 0.7


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="valid keys.*stem_layers"):
        ModelConfig.from_params({"dimm": 3})
    with pytest.raises(ValueError, match="alpha"):
        ModelConfig.from_params({"alpha": 0.3})
    with pytest.raises(ValueError, match="alpha"):
        SCSA(16, 0.49, ["appearance", "motion", "geometry"])
    with pytest.raises(ValueError, match="modalities"):
        ModelConfig(modalities=[])
    with pytest.raises(ValueError, match="modalities"):
        ModelConfig(modalities=["motion", "audio"])
    with pytest.raises(ValueError, match="stem_layers"):
        ModelConfig(stem_layers=10)
    with pytest.raises(ValueError, match="local_fusion"):
        ModelConfig(local_fusion="sum")
    with pytest.raises(ValueError, match="freeze_stems"):
        ModelConfig(freeze_stems="yes")
    assert ModelConfig(modalities=["geometry", "motion"]).modalities == ["motion", "geometry"]


# ---------------------------------------------------------------- shapes for every switch

ABLATIONS = [
    {},
    {"modalities": ["appearance", "motion"]},
    {"modalities": ["motion", "geometry"]},
    {"modalities": ["appearance", "geometry"]},
    {"modalities": ["motion"]},
    {"modalities": ["geometry"]},
    {"lamif": False},
    {"lamif": False, "modalities": ["appearance", "motion"]},
    {"gcmif": False},
    {"lamif": False, "gcmif": False},
    {"local_fusion": "sa-mean"},
    {"local_fusion": "sa-max"},
    {"local_fusion": "concat-fc"},
    {"local_fusion": "concat-fc", "modalities": ["motion", "geometry"]},
    {"global_fusion": "mean"},
    {"global_fusion": "max"},
    {"global_fusion": "lstm"},
    {"landmark_jitter_train": 3.0, "landmark_jitter_test": 1.0},
]


@pytest.mark.parametrize(
    "kw", ABLATIONS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "paper"
)
def test_head_shapes_every_ablation(kw, feats):
    af, mf, lm = feats
    cfg = make_config(**kw)
    model = MiHFTr(cfg, num_classes=3)
    af_in = af if "appearance" in cfg.modalities else None
    mf_in = mf if "motion" in cfg.modalities else None
    for train in (True, False):
        model.train(train)
        logits, f_me = model.head(af_in, mf_in, lm, return_features=True)
        assert logits.shape == (B, 3) and f_me.shape == (B, 256)
        assert torch.isfinite(logits).all()
    if "appearance" not in cfg.modalities:
        assert model.stem_appearance is None
    if "geometry" not in cfg.modalities:
        assert model.gcn is None


@pytest.mark.parametrize("loss", ["cw-focal", "focal", "ce"])
def test_every_loss_on_model_output(loss, feats):
    af, mf, lm = feats
    model = MiHFTr(make_config(loss=loss), num_classes=3)
    crit = build_loss(loss, 2.0, [5, 2, 1])
    value = crit(model.head(af, mf, lm), torch.tensor([0, 2]))
    assert value.shape == () and torch.isfinite(value) and value > 0
    value.backward()
    assert model.classifier.weight.grad.abs().sum() > 0


def test_full_forward_and_stems_shapes():
    model = MiHFTr(ModelConfig(mirror_test=False), num_classes=4).eval()
    apex, flow = torch.rand(B, 3, 224, 224), torch.randn(B, 2, 224, 224)
    af, mf = model.stems(apex, flow)
    assert af.shape == mf.shape == (B, 256, 56, 56)
    with torch.no_grad():
        logits = model(apex, flow, landmarks_batch(B))
        head_landmarks = model.landmarks(flow, landmarks_batch(B))  # apex points tracked by the flow
        assert not torch.equal(head_landmarks, landmarks_batch(B))
        assert torch.allclose(logits, model.head(af, mf, head_landmarks), atol=1e-5)
        # mirror_test: the mean of the logits of the sample and of its mirror image
        from model.augment import mirror_flow, mirror_images, mirror_landmarks

        model.config.mirror_test = True
        af_m, mf_m = model.stems(mirror_images(apex), mirror_flow(flow))
        mirrored = model.head(af_m, mf_m, model.landmarks(mirror_flow(flow),
                                                          mirror_landmarks(landmarks_batch(B), 224)))
        assert torch.allclose(model(apex, flow, landmarks_batch(B)), (logits + mirrored) / 2, atol=1e-5)
    assert logits.shape == (B, 4)
    only_geo = MiHFTr(ModelConfig(modalities=["geometry"]), 3)
    assert only_geo.stems(None, None) == (None, None)
    assert only_geo(None, flow, landmarks_batch(B)).shape == (B, 3)
    with pytest.raises(ValueError, match="needs the flow"):
        only_geo(None, None, landmarks_batch(B))
    dlib_points = MiHFTr(ModelConfig(modalities=["geometry"], apex_landmarks="dlib"), 3)
    assert dlib_points(None, None, landmarks_batch(B)).shape == (B, 3)


@pytest.mark.parametrize("layers", [1, 2, 5, 14])
def test_stem_layer_counting(layers):
    stem = Stem(layers).eval()
    with torch.no_grad():
        out = stem(torch.rand(1, 3, 224, 224))
    ch, h0 = stem_geometry(layers)
    assert out.shape == (1, ch, h0, h0)
    assert (
        stem_geometry(11) == (256, 56) and stem_geometry(23) == (512, 28) and stem_geometry(50) == (2048, 7)
    )


def test_stem_inputs_normalised():
    flow = torch.zeros(1, 2, 224, 224)
    flow[0, 0], flow[0, 1] = 0.5, 0.25  # head drift: the same everywhere
    flow[0, 0, :50], flow[0, 1, :50] = 3.5, -3.75  # the expression: a region moving on top of it
    x = Stem(11, kind="motion").prepare(flow)
    assert x.shape == (1, 3, 224, 224)
    assert torch.allclose(x[0, :, 5, 7], torch.tensor([3.0, -4.0, 5.0]) / FLOW_SCALE_PX)
    assert torch.allclose(x[0, :, 100, 7], torch.zeros(3), atol=1e-5)
    apex = torch.ones(1, 3, 2, 2) * torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    assert Stem(11).prepare(apex).abs().max() < 1e-6



def roughness(w: torch.Tensor) -> float:
    """Mean squared difference of neighbouring taps of k x k filters, over their mean square."""
    dx, dy = w[..., 1:] - w[..., :-1], w[..., 1:, :] - w[..., :-1, :]
    return float((dx.pow(2).mean() + dy.pow(2).mean()) / w.pow(2).mean())


def test_stem_blur_smooths_random_conv1_only(tmp_path):
    torch.manual_seed(3)
    white = Stem(11, kind="motion").body[0].weight.detach()
    torch.manual_seed(3)
    blurred = Stem(11, kind="motion", blur=1.5).body[0].weight.detach()
    assert torch.allclose(blurred.std(), white.std())  # the output scale is kept
    assert roughness(white) > 1.5 and roughness(blurred) < 0.5 * roughness(white)
    # Seen from the flow: the 64 filters respond to a smooth field far more than to pixel noise.
    torch.manual_seed(0)
    smooth_field = torch.nn.functional.interpolate(torch.randn(1, 3, 4, 4), size=(32, 32), mode="bicubic")
    noise = torch.randn(1, 3, 32, 32) * smooth_field.std()
    gain = lambda w: float(torch.nn.functional.conv2d(smooth_field, w).std()  # noqa: E731
                           / torch.nn.functional.conv2d(noise, w).std())
    assert gain(blurred) > 2 * gain(white)
    # Pretrained weights are used as they are.
    path = tmp_path / "resnet50.pth"
    state = torchvision.models.resnet50().state_dict()
    torch.save(state, path)
    assert torch.equal(Stem(11, path, "motion", blur=1.5).body[0].weight, state["conv1.weight"])


def test_block_embedding_mean_init_reads_the_block_mean():
    g = torch.Generator().manual_seed(0)
    channels, dim, block = 8, 16, 4
    proj = block_embedding(channels, dim, block, "mean")
    blocks = torch.randn(5, channels, block, block, generator=g)
    # The same map applied to the mean of the B x B cells: a weight per (d, C), bias as Linear's.
    per_channel = proj.weight.view(dim, channels, block * block)[..., 0] * block**2
    expected = blocks.mean(dim=(-1, -2)) @ per_channel.T + proj.bias
    assert torch.allclose(proj(blocks.flatten(1)), expected, atol=1e-5)
    pattern = blocks - blocks.mean(dim=(-1, -2), keepdim=True)  # spatial detail only: not seen at init
    assert torch.allclose(proj(pattern.flatten(1)), proj.bias.expand(5, dim), atol=1e-5)
    random = block_embedding(channels, dim, block, "random")
    assert not torch.allclose(random(pattern.flatten(1)), random.bias.expand(5, dim), atol=1e-3)
    with pytest.raises(ValueError, match="block_init"):
        block_embedding(channels, dim, block, "zeros")


# ---------------------------------------------------------------- LAMiF


def ref_bilinear(fmap: np.ndarray, x: float, y: float) -> np.ndarray:
    """Bilinear read of C x H x W at index coords (x, y), zero outside."""
    c, h, w = fmap.shape
    x0, y0 = math.floor(x), math.floor(y)
    out = np.zeros(c)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * fmap[:, yy, xx]
    return out


def test_landmark_scaling_eq3():
    px = torch.tensor([[[100.0, 60.0], [223.0, 0.0]]])
    assert torch.equal(landmark_to_feature(px, 56), torch.tensor([[[25.0, 15.0], [55.75, 0.0]]]))
    assert torch.equal(landmark_to_feature(px, 28), px / 8)


def test_block_sampling_picks_the_right_pixels():
    h = 56
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(h).float(), indexing="ij")
    pos = torch.stack([xs + 1, ys + 1])[None]  # channel 0 = x + 1, channel 1 = y + 1
    pts_px = torch.tensor([[[100.0, 60.0], [0.0, 0.0], [223.0, 222.0]]])
    blocks = sample_blocks(pos, landmark_to_feature(pts_px, h), 4)  # 1 x 3 x 2 x 4 x 4
    assert blocks.shape == (1, 3, 2, 4, 4)
    # (100, 60) px -> (25, 15): rows 13.5..16.5, columns 23.5..26.5 (a linear map is read exactly)
    offs = torch.tensor([-1.5, -0.5, 0.5, 1.5])
    assert torch.allclose(blocks[0, 0, 0], (25 + offs + 1).expand(4, 4))
    assert torch.allclose(blocks[0, 0, 1], (15 + offs + 1)[:, None].expand(4, 4))
    # (0, 0) px: samples at -1.5 are outside (zero), at -0.5 half outside (x + 1 = 1 at x = 0)
    corner = blocks[0, 1, 0]
    assert torch.all(corner[0] == 0) and torch.all(corner[:, 0] == 0)
    # (-0.5, -0.5): one quarter of cell (0, 0) = 1
    assert corner[1, 1].item() == pytest.approx(0.25, abs=1e-5)
    assert corner[2, 2].item() == pytest.approx(1.5, abs=1e-5)  # (0.5, 0.5): inside, x + 1 = 1.5
    # random map against a hand-written bilinear read, border landmarks included
    g = torch.Generator().manual_seed(0)
    fmap = torch.rand(1, 3, h, h, generator=g)
    pts_px = torch.tensor([[[100.0, 60.0], [0.0, 0.0], [223.0, 222.0], [101.0, 7.5], [4.0, 219.0]]])
    pts = landmark_to_feature(pts_px, h)
    blocks = sample_blocks(fmap, pts, 4)
    f = fmap[0].numpy()
    for n in range(pts.shape[1]):
        cx, cy = pts[0, n].tolist()
        for i, oy in enumerate(offs.tolist()):
            for j, ox in enumerate(offs.tolist()):
                np.testing.assert_allclose(
                    blocks[0, n, :, i, j].numpy(), ref_bilinear(f, cx + ox, cy + oy), atol=1e-5
                )
    # (100, 60) px, first sample (23.5, 13.5) = mean of the 2x2 cells rows 13-14, columns 23-24
    assert torch.allclose(blocks[0, 0, :, 0, 0], fmap[0, :, 13:15, 23:25].mean(dim=(1, 2)), atol=1e-6)
    # (223, 222) px -> (55.75, 55.5): last column 57.25 and last row 57.0 are outside
    assert torch.all(blocks[0, 2, :, :, 3] == 0) and torch.all(blocks[0, 2, :, 3, :] == 0)
    # odd block at integer centre = the exact cells
    b3 = sample_blocks(fmap, torch.tensor([[[25.0, 15.0]]]), 3)
    assert torch.allclose(b3[0, 0], fmap[0, :, 14:17, 24:27], atol=1e-6)


def test_local_alignment_uses_apex_landmarks():
    g = torch.Generator().manual_seed(0)
    fmap = torch.rand(1, 8, 56, 56, generator=g)
    align = LocalAlignment(8, 16, 4)
    lm = landmarks_batch(1)
    lm[..., 0:2] = 0.0  # onset far away: must not matter
    out = align(fmap, lm[..., 2:4])
    ref = align.proj(sample_blocks(fmap, lm[..., 2:4] * 56 / 224, 4).flatten(2))
    assert out.shape == (1, 51, 16) and torch.allclose(out, ref, atol=1e-5)


def test_scsa_alpha_one_is_motion_row_and_weights():
    g = torch.Generator().manual_seed(0)
    d = 16
    tokens = torch.randn(2, 5, 3, d, generator=g)
    scsa = SCSA(d, 1.0, ["appearance", "motion", "geometry"])
    rows = scsa.attn(tokens)
    assert torch.equal(scsa(tokens), rows[:, :, 1])
    # eq. 5 by hand for one landmark
    t = tokens[0, 0]
    q, k, v = t @ scsa.attn.q.weight.T, t @ scsa.attn.k.weight.T, t @ scsa.attn.v.weight.T
    att = torch.softmax(q @ k.T / math.sqrt(d), dim=-1)
    assert torch.allclose(rows[0, 0], att @ v, atol=1e-6)
    # eq. 6 with alpha 0.7 and w_a = 0.3, w_g = -1.2
    scsa = SCSA(d, 0.7, ["appearance", "motion", "geometry"])
    with torch.no_grad():
        scsa.w.copy_(torch.tensor([0.3, -1.2]))
    coef = scsa.coefficients()
    pa = math.exp(0.3) / (math.exp(0.3) + math.exp(-1.2))
    assert coef["appearance"].item() == pytest.approx(0.3 * pa)
    assert coef["geometry"].item() == pytest.approx(0.3 * (1 - pa))
    assert (coef["appearance"] + coef["geometry"]).item() == pytest.approx(1 - 0.7)
    rows = scsa.attn(tokens)
    ref = 0.7 * rows[:, :, 1] + 0.3 * (pa * rows[:, :, 0] + (1 - pa) * rows[:, :, 2])
    assert torch.allclose(scsa(tokens), ref, atol=1e-6)
    # one weak modality gets all of 1 - alpha; no motion falls back to the mean of the rows
    two = SCSA(d, 0.7, ["motion", "geometry"])
    assert two.coefficients()["geometry"].item() == pytest.approx(0.3)
    no_core = SCSA(d, 0.7, ["appearance", "geometry"])
    assert torch.allclose(no_core(tokens[:, :, :2]), no_core.attn(tokens[:, :, :2]).mean(dim=2), atol=1e-6)


# ---------------------------------------------------------------- GCN


def test_gcn_graph_and_output():
    gcn = GCN(32, 2)
    adj = gcn.adjacency()
    assert adj.shape == (51, 51) and torch.allclose(adj, adj.T)
    assert all(0 <= a < 51 and 0 <= b < 51 and a != b for a, b in EDGES)
    assert len(set(map(frozenset, EDGES))) == len(EDGES)  # no duplicate edges
    # connected: 51 nodes reachable from node 0
    seen, todo = {0}, [0]
    while todo:
        n = todo.pop()
        for a, b in EDGES:
            for u, v in ((a, b), (b, a)):
                if u == n and v not in seen:
                    seen.add(v)
                    todo.append(v)
    assert len(seen) == 51
    # symmetric normalisation: D^-1/2 (A + I) D^-1/2 with unit weights has eigenvalue 1
    assert torch.linalg.eigvalsh(adj).max().item() == pytest.approx(1.0, abs=1e-5)
    lm = torch.full((1, 51, 4), 112.0)
    lm[0, :, 2] += 2.0  # apex moved 2 px right: 3 displacement units of 2/3 px
    nf = node_features(lm)
    assert torch.allclose(nf[0, 0], torch.tensor([0.0, 0.0, 2 / 112, 0.0, 3.0, 0.0]))
    assert gcn(landmarks_batch(3)).shape == (3, 51, 32)


def test_gcn_node_weights_give_each_landmark_its_own_map():
    torch.manual_seed(0)
    node, shared = GCN(32, 2, weights="node"), GCN(32, 2, weights="shared")
    x = node_features(landmarks_batch(2))  # B x 51 x 6
    first = node.linears[0]
    assert first.weight.shape == (51, 6, 32) and first.bias.shape == (51, 32)
    by_hand = torch.stack([x[:, n] @ first.weight[n] + first.bias[n] for n in range(51)], dim=1)
    assert torch.allclose(first(x), by_hand, atol=1e-6)
    same = x[:1, :1].expand(1, 51, 6)  # every node given the same features
    out_node, out_shared = first(same)[0], shared.linears[0](same)[0]
    assert torch.allclose(out_shared, out_shared[:1].expand(51, -1))  # shared: one map, one answer
    assert (out_node[1:] - out_node[:1]).abs().amax(dim=1).min() > 1e-3  # node: a different map per node
    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert size(node) - size(shared) == 50 * (6 * 32 + 32)


@pytest.mark.parametrize("weights", ["node", "shared"])
def test_gcn_activation_none_is_linear_in_the_displacement(weights):
    torch.manual_seed(0)
    lm = landmarks_batch(1)
    moved = lambda k: torch.cat([lm[..., :2], lm[..., :2] + k * (lm[..., 2:] - lm[..., :2])], dim=-1)  # noqa: E731
    for activation, linear in (("none", True), ("relu", False)):
        gcn = GCN(32, 2, weights=weights, activation=activation)
        with torch.no_grad():
            step1, step2 = gcn(moved(1.0)) - gcn(moved(0.0)), gcn(moved(3.0)) - gcn(moved(2.0))
        assert torch.allclose(step1, step2, atol=1e-5) == linear  # equal steps of movement, equal changes
    with pytest.raises(ValueError, match="gcn_weights"):
        ModelConfig(gcn_weights="per-node")
    with pytest.raises(ValueError, match="gcn_activation"):
        ModelConfig(gcn_activation="tanh")


# ---------------------------------------------------------------- losses


def test_cw_focal_by_hand():
    counts = [32, 90, 28]  # CASME II, paper Table 1
    w = class_weights(counts).numpy()
    inv = [1 / 32, 1 / 90, 1 / 28]
    np.testing.assert_allclose(w, [3 * i / sum(inv) for i in inv], rtol=1e-6)
    np.testing.assert_allclose(w, [1.200762, 0.426938, 1.372300], rtol=1e-5)
    assert w.mean() == pytest.approx(1.0)
    logits = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0], [1.0, 1.0, 3.0]]
    target = [0, 2, 1, 2]
    gamma = 2.0
    total = 0.0
    for row, y in zip(logits, target):
        p = math.exp(row[y]) / sum(math.exp(v) for v in row)
        total += -w[y] * (1 - p) ** gamma * math.log(p)
    got = build_loss("cw-focal", gamma, counts)(torch.tensor(logits), torch.tensor(target))
    assert got.item() == pytest.approx(total / 4, rel=1e-5)
    # equal counts -> plain focal loss; gamma 0 focal -> cross-entropy
    lt, tt = torch.tensor(logits), torch.tensor(target)
    focal = build_loss("focal", gamma)(lt, tt)
    assert build_loss("cw-focal", gamma, [7, 7, 7])(lt, tt).item() == pytest.approx(focal.item(), rel=1e-6)
    assert focal < build_loss("focal", 0.0)(lt, tt)
    ce = torch.nn.functional.cross_entropy(lt, tt)
    assert build_loss("focal", 0.0)(lt, tt).item() == pytest.approx(ce.item(), rel=1e-6)
    assert build_loss("ce", gamma, None)(lt, tt).item() == pytest.approx(ce.item(), rel=1e-6)
    with pytest.raises(ValueError, match="class_counts"):
        build_loss("cw-focal", gamma, None)
    # fold-batched training's per-sample terms (loss_terms + focal_terms) average to each loss
    for name in LOSSES:
        g, weights = loss_terms(name, gamma, counts)
        expected = build_loss(name, gamma, counts)(lt, tt).item()
        assert focal_terms(lt, tt, g, weights).mean().item() == pytest.approx(expected, rel=1e-6)


def test_cw_focal_upweights_rare_class():
    counts = [32, 90, 28]
    loss = build_loss("cw-focal", 2.0, counts)
    # same confidence in the true class: p_y identical for a rare (2) and a common (1) sample
    logits = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]], requires_grad=True)
    per_sample = [loss(logits[i : i + 1], torch.tensor([y])) for i, y in ((0, 2), (1, 1))]
    assert per_sample[0].item() / per_sample[1].item() == pytest.approx(90 / 28, rel=1e-5)
    loss(logits, torch.tensor([2, 1])).backward()
    g = logits.grad.abs().sum(dim=1)
    assert g[0] / g[1] == pytest.approx(90 / 28, rel=1e-5)


def test_class_weight_power_softens_the_weights():
    counts = [92, 26, 15]  # SAMM's 3 classes
    for power in (0.0, 0.5, 1.0):
        w = class_weights(counts, power).numpy()
        inv = [n ** -power for n in counts]
        np.testing.assert_allclose(w, [3 * i / sum(inv) for i in inv], rtol=1e-6)
        assert w.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(class_weights(counts, 0.0).numpy(), [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(class_weights(counts).numpy(), class_weights(counts, 1.0).numpy())
    # the rare-to-common ratio is (92 / 15)^p: 6.1 at p 1, 2.5 at p 0.5
    for power in (0.5, 1.0):
        w = class_weights(counts, power).numpy()
        assert w[2] / w[0] == pytest.approx((92 / 15) ** power, rel=1e-5)
        _, weights = loss_terms("cw-focal", 2.0, counts, power)
        np.testing.assert_allclose(weights.numpy(), w, rtol=1e-6)
    with pytest.raises(ValueError, match="class_weight_power"):
        ModelConfig(class_weight_power=-0.5)
    # a class absent from a fold's training samples: weight 0, the others as in a run without it
    for power in (0.5, 1.0):
        w = class_weights([*counts, 0], power).numpy()
        np.testing.assert_allclose(w, [*class_weights(counts, power).numpy(), 0.0], rtol=1e-6)


# ---------------------------------------------------------------- gradients, freezing, loading


def test_gradient_reaches_every_trainable_parameter():
    torch.manual_seed(0)
    model = MiHFTr(ModelConfig(freeze_stems=False), num_classes=3).train()
    apex, flow = torch.rand(B, 3, 224, 224), 2 * torch.randn(B, 2, 224, 224)
    loss = build_loss("cw-focal", 2.0, [3, 2, 1])(model(apex, flow, landmarks_batch(B)), torch.tensor([0, 2]))
    loss.backward()
    missing = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert not missing
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("stem_motion.body.0.") for n in names) and any(
        n.startswith("gcn.edge") for n in names
    )


def test_frozen_stems():
    model = MiHFTr(ModelConfig(freeze_stems=True), num_classes=3).train()
    assert not any(p.requires_grad for p in model.stem_appearance.parameters())
    assert not model.stem_motion.training and not model.stem_motion.body[1].training
    assert model.global_fusion.training
    counts = count_parameters(model)
    assert counts["trainable"] == counts["total"] - counts["stem_appearance"] - counts["stem_motion"]


def test_parameter_count_near_paper():
    counts = count_parameters(MiHFTr(ModelConfig(), num_classes=3))
    assert abs(counts["total"] / PAPER_TOTAL - 1) < 0.10
    assert counts["stem_appearance"] == counts["stem_motion"] == 9_536 + 215_808
    assert counts["align_motion"] == 4 * 4 * 256 * 256 + 256
    assert counts["local_fusion"] == 3 * 256 * 256 + 2
    assert counts["classifier"] == 256 * 3 + 3
    assert sum(v for k, v in counts.items() if k not in ("total", "trainable")) == counts["total"]


def test_pretrained_round_trip(tmp_path):
    torch.manual_seed(3)
    net = torchvision.models.resnet50()
    state = net.state_dict()
    state["layer1.2.bn3.running_mean"] = torch.randn_like(state["layer1.2.bn3.running_mean"])
    path = tmp_path / "resnet50-test.pth"
    torch.save(state, path)
    model = MiHFTr(ModelConfig(pretrained=str(path)), num_classes=3)
    for stem in (model.stem_appearance, model.stem_motion):
        got = stem.body.state_dict()
        assert torch.equal(got["0.weight"], state["conv1.weight"])
        assert torch.equal(got["1.running_var"], state["bn1.running_var"])
        assert torch.equal(got["4.downsample.0.weight"], state["layer1.0.downsample.0.weight"])
        assert torch.equal(got["6.bn3.running_mean"], state["layer1.2.bn3.running_mean"])
        assert torch.equal(got["6.conv3.weight"], state["layer1.2.conv3.weight"])
    fresh = MiHFTr(ModelConfig(), num_classes=3)
    assert not torch.equal(fresh.stem_motion.body[0].weight, state["conv1.weight"])


def test_pretrained_errors(tmp_path):
    missing = tmp_path / "nope" / "resnet50-0676ba61.pth"
    with pytest.raises(FileNotFoundError, match=r"nope.*resnet50-0676ba61\.pth.*download"):
        MiHFTr(ModelConfig(pretrained=str(missing)), num_classes=3)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="not a torchvision resnet50"):
        MiHFTr(ModelConfig(pretrained=str(wrong)), num_classes=3)



IMAGENET_FILE = "resnet50-0676ba61.pth"  # torchvision's IMAGENET1K_V1, the name in its URL


def test_pretrained_imagenet_reads_torch_hub_cache(tmp_path, monkeypatch):
    # A file placed where torch hub caches the download is used as is, without network.
    torch.manual_seed(4)
    state = torchvision.models.resnet50().state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / IMAGENET_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    stem = Stem(11, "imagenet", "motion")
    got = stem.body.state_dict()
    assert torch.equal(got["0.weight"], state["conv1.weight"])
    assert torch.equal(got["6.conv3.weight"], state["layer1.2.conv3.weight"])
    assert torch.equal(got["6.bn3.running_var"], state["layer1.2.bn3.running_var"])


def test_pretrained_imagenet_offline_is_one_line_naming_file_and_folder(tmp_path):
    # A real download attempt, through a proxy nobody listens on (refused at once): a fresh process,
    # since urllib reads the proxy variables once per process.
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "home"), https_proxy="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="")
    code = ("from model import MiHFTr, ModelConfig\n"
            "try:\n    MiHFTr(ModelConfig(pretrained='imagenet'), num_classes=3)\n"
            "except FileNotFoundError as err:\n    print('ERROR', err)\n")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert time.perf_counter() - start < 60
    lines = [line for line in out.stdout.splitlines() if line.startswith("ERROR")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stdout + out.stderr
    folder = tmp_path / "home" / "hub" / "checkpoints"
    assert f"place {IMAGENET_FILE} " in lines[0] and f" in {folder}/ " in lines[0]
    assert "path" in lines[0] and "none" in lines[0]
    assert not any(folder.iterdir())  # no partial download left behind


# ---------------------------------------------------------------- jitter, batches


def test_landmark_jitter():
    lm = landmarks_batch(4)
    moved = jitter_landmarks(lm, 3.0, torch.Generator().manual_seed(0))
    dist = (moved - lm).view(4, 51, 2, 2).norm(dim=-1)
    assert torch.allclose(dist, torch.full_like(dist, 3.0), atol=1e-4)
    assert torch.equal(jitter_landmarks(lm, 0.0), lm)


def test_jitter_only_in_its_mode(feats):
    af, mf, lm = feats
    model = MiHFTr(ModelConfig(landmark_jitter_train=5.0, global_fusion="mean"), 3)
    model.eval()
    with torch.no_grad():
        a, b = model.head(af, mf, lm), model.head(af, mf, lm)
        assert torch.equal(a, b)  # no test jitter: deterministic
        model.train()
        c = model.head(af, mf, lm)
    assert not torch.allclose(a, c)


def test_prepare_batch():
    rng = np.random.default_rng(0)
    apex = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    flow = rng.normal(size=(3, 224, 224, 2)).astype(np.float32)
    lms = rng.uniform(0, 224, (3, 51, 4)).astype(np.float32)
    a, f, lm = prepare_batch(apex, flow, lms, "cpu")
    assert a.shape == (3, 3, 224, 224) and a.dtype == torch.float32
    assert f.shape == (3, 2, 224, 224) and lm.shape == (3, 51, 4)
    assert a[1, 2, 10, 20].item() == pytest.approx(apex[1, 10, 20, 2] / 255)
    assert f[2, 1, 5, 7].item() == flow[2, 5, 7, 1]
    assert 0 <= a.min() and a.max() <= 1


# ---------------------------------------------------------------- overfitting 8 samples


def _overfit(apex, flow, landmarks, labels, steps: int = 150, target: float = 0.05) -> list[float]:
    """Paper model, frozen stems computed once; Adam 1e-3 on the head until the loss < target."""
    torch.manual_seed(0)
    model = MiHFTr(ModelConfig(freeze_stems=True), num_classes=3)
    with torch.no_grad():
        af, mf = model.stems(apex, flow)
    counts = np.bincount(labels.numpy(), minlength=3)
    crit = build_loss("cw-focal", 2.0, counts)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(steps):
        loss = crit(model.head(af, mf, landmarks), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if loss.item() < target:
            break
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.head(af, mf, landmarks).argmax(1), labels)
    return losses


def test_overfit_real_samples(processed_h5: Path) -> None:
    """8 real preprocessed samples of the tiny synthetic pipeline run: loss -> ~0."""
    import h5py

    with h5py.File(processed_h5, "r") as f:
        labels = f["label"][:]
        idx = np.sort(np.concatenate([np.flatnonzero(labels == c)[:3] for c in np.unique(labels)])[:8])
        apex, flow, lms = prepare_batch(f["apex"][idx], f["flow"][idx], f["landmarks"][idx], "cpu")
    losses = _overfit(apex, flow, lms, torch.as_tensor(labels[idx], dtype=torch.long), steps=400, target=0.01)
    assert losses[-1] < 0.01 < losses[0]


# ---- augmentation ----------------------------------------------------------------------------------

def test_mirror_permutation_is_an_involution_that_swaps_sides():
    from model.augment import DLIB_MIRROR, KEPT_MIRROR

    assert sorted(DLIB_MIRROR) == list(range(68))
    assert all(DLIB_MIRROR[DLIB_MIRROR[i]] == i for i in range(68))
    assert DLIB_MIRROR[17] == 26 and DLIB_MIRROR[36] == 45 and DLIB_MIRROR[48] == 54  # brow, eye, mouth
    assert [i for i in range(68) if DLIB_MIRROR[i] == i] == [8, 27, 28, 29, 30, 33, 51, 57, 62, 66]
    assert sorted(KEPT_MIRROR) == list(range(51)) and KEPT_MIRROR[0] == 9  # dlib 17 <-> 26


def test_mirror_keeps_appearance_motion_and_geometry_consistent():
    """Mirror a face's landmarks: the mirrored point of a landmark sits where the mirrored image has
    that landmark's pixel, and the flow there is the original flow with u negated."""
    from model.augment import mirror_flow, mirror_images, mirror_landmarks

    g = torch.Generator().manual_seed(0)
    width = 224
    landmarks = torch.randint(0, width, (2, 51, 4), generator=g).float()
    image = torch.rand(2, 3, width, width, generator=g)
    flow = torch.randn(2, 2, width, width, generator=g)
    mirrored = mirror_landmarks(landmarks, width)
    assert torch.equal(mirror_landmarks(mirrored, width), landmarks)
    assert torch.equal(mirror_flow(mirror_flow(flow)), flow)
    img_m, flow_m = mirror_images(image), mirror_flow(flow)
    from model.augment import KEPT_MIRROR

    for b in range(2):
        for n in range(51):
            x, y = (int(v) for v in landmarks[b, n, 2:4])
            xm, ym = (int(v) for v in mirrored[b, KEPT_MIRROR[n], 2:4])
            assert (xm, ym) == (width - 1 - x, y)
            assert torch.equal(img_m[b, :, ym, xm], image[b, :, y, x])
            assert flow_m[b, 0, ym, xm] == -flow[b, 0, y, x] and flow_m[b, 1, ym, xm] == flow[b, 1, y, x]


def test_scsa_self_init_makes_each_row_attend_to_its_own_token():
    from model.lamif import SelfAttention3

    tokens = torch.nn.functional.layer_norm(torch.randn(4, 51, 3, 256), (256,))
    own = SelfAttention3(256, "self")
    rows = own(tokens)
    with torch.no_grad():
        att = torch.softmax(own.q(tokens) @ own.k(tokens).transpose(-1, -2) * own.scale, dim=-1)
    assert att.diagonal(dim1=-2, dim2=-1).min() > 0.99
    assert rows.shape == tokens.shape
    soft = SelfAttention3(256, "soft")  # self logit ~1: starts on its own token, gradient not saturated
    with torch.no_grad():
        att = torch.softmax(soft.q(tokens) @ soft.k(tokens).transpose(-1, -2) * soft.scale, dim=-1)
    diagonal = att.diagonal(dim1=-2, dim2=-1)
    assert 0.45 < diagonal.mean() < 0.7 and diagonal.min() > 1 / 3
    rand = SelfAttention3(256, "random")
    with torch.no_grad():
        att = torch.softmax(rand.q(tokens) @ rand.k(tokens).transpose(-1, -2) * rand.scale, dim=-1)
    assert att.diagonal(dim1=-2, dim2=-1).mean() < 0.5  # near uniform (1/3)


def test_track_apex_carries_the_onset_points_by_the_drift_free_flow():
    """A 40 px square moving by (3, -1) px on a background drifting by (0.5, 0.5): landmarks in the
    square get apex = onset + (3, -1), those on the background stay put; mirroring commutes."""
    from model.augment import mirror_flow, mirror_landmarks
    from model.gcn import track_apex

    flow = torch.full((1, 2, 224, 224), 0.5)
    flow[:, 0, 60:100, 60:100] += 3.0
    flow[:, 1, 60:100, 60:100] -= 1.0
    landmarks = torch.zeros(1, 51, 4)
    landmarks[0, :, 0:2] = torch.tensor([170.0, 170.0])  # background
    landmarks[0, 0, 0:2] = torch.tensor([80.0, 80.0])  # square centre
    landmarks[0, :, 2:4] = 5.0  # dlib's apex points: replaced
    tracked = track_apex(landmarks, flow)
    assert torch.equal(tracked[..., 0:2], landmarks[..., 0:2])
    torch.testing.assert_close(tracked[0, 0, 2:4], torch.tensor([83.0, 79.0]))
    torch.testing.assert_close(tracked[0, 1:, 2:4], landmarks[0, 1:, 0:2])
    mirrored = track_apex(mirror_landmarks(landmarks, 224), mirror_flow(flow))
    torch.testing.assert_close(mirrored, mirror_landmarks(tracked, 224), atol=1e-4, rtol=0)
