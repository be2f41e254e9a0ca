"""LAMiF (paper §3.2): landmark-aligned local blocks (eq. 3) and their fusion by SC-SA (eqs. 4-6).

Alignment. Apex landmark n at crop pixel (x, y) maps to (x h0/224, y h0/224) in the feature map
(eq. 3), in feature-map *index* coordinates: cell (i, j) of AF/MF sits at (x = j, y = i). The B x B
block centred there is read with bilinear sampling (F.grid_sample, align_corners=True so that
normalised -1 / +1 are the centres of the first / last cells, padding_mode="zeros"): sample k of a
row sits at x + k - (B - 1)/2, k = 0..B-1 (B = 4: offsets -1.5, -0.5, 0.5, 1.5), one cell apart.
Everything outside the map reads as zero, so blocks at the face border stay correct and the
sampling is differentiable in the features (and landmarks). The block, flattened in (C, row, col)
order (B*B*C = 4096 values), is mapped to d by a linear layer, one per modality.

LAMiF off (Table 3 "x LAMiF"): no landmark alignment and no local fusion. AF and MF are cut into
non-overlapping B x B patches on a fixed grid ((h0/B)^2 = 196 tokens each), embedded by the same
kind of linear layer, and sent with the 51 GCN node tokens straight to the global module: "directly
performing global fusion of multi-information" (paper §4.4.1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.stems import IMAGE_SIZE

MODALITIES = ("appearance", "motion", "geometry")
LOCAL_FUSIONS = ("sc-sa", "sa-mean", "sa-max", "concat-fc")
SCSA_INITS = ("soft", "self", "random")
BLOCK_INITS = ("mean", "random")
WEAK_INDEX = {"appearance": 0, "geometry": 1}  # position of w_a, w_g in SCSA.w


def block_embedding(channels: int, dim: int, block: int, init: str) -> nn.Linear:
    """The linear map of a flattened B x B x C block ((C, row, col) order) to d.

    init "random": torch's Linear init over all B*B*C inputs. "mean": the map starts as one C -> d
    Linear (torch's init, fan-in C) applied to the block's mean over its B*B cells, i.e. each channel's
    weight repeated over the cells / B^2. It starts from what the block holds on average and learns a
    spatial pattern only where the data asks for one: with random stems most of the 4096 values are
    within-block detail, and a probe on them scores below one on their means (docs/experiments.md)."""
    if init not in BLOCK_INITS:
        raise ValueError(f"block_init must be one of {list(BLOCK_INITS)}, got {init!r}")
    proj = nn.Linear(block * block * channels, dim)
    if init == "mean":
        per_channel = nn.Linear(channels, dim)
        with torch.no_grad():
            cells = per_channel.weight[:, :, None].expand(dim, channels, block * block) / block**2
            proj.weight.copy_(cells.reshape(dim, -1))  # d x (C, row, col)
            proj.bias.copy_(per_channel.bias)
    return proj


def landmark_to_feature(points_px: Tensor, h0: int, image_size: int = IMAGE_SIZE) -> Tensor:
    """Eq. 3: crop pixels -> feature-map index coordinates, PF_n = P_n h0 / 224."""
    return points_px * (h0 / image_size)


def sample_blocks(fmap: Tensor, points: Tensor, block: int) -> Tensor:
    """B x C x H x W map, B x N x 2 points (x, y, feature index coords) -> B x N x C x block x block."""
    b, c, h, w = fmap.shape
    n = points.shape[1]
    offs = torch.arange(block, device=fmap.device, dtype=fmap.dtype) - (block - 1) / 2
    oy, ox = torch.meshgrid(offs, offs, indexing="ij")  # block x block
    xs = points[..., 0, None] + ox.reshape(1, 1, -1)  # B x N x block^2
    ys = points[..., 1, None] + oy.reshape(1, 1, -1)
    grid = torch.stack([2 * xs / (w - 1) - 1, 2 * ys / (h - 1) - 1], dim=-1)  # B x N x block^2 x 2
    out = F.grid_sample(fmap, grid.to(fmap.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.view(b, c, n, block, block).permute(0, 2, 1, 3, 4)  # B x N x C x block x block


class LocalAlignment(nn.Module):
    """Eq. 3 + flatten + linear: (AF or MF) B x C x h0 x h0, landmarks -> B x 51 x d.

    `dropout` acts on the flattened block, where the 1M-parameter embedding is most easily overfitted.
    `input_scale` (a buffer, 1 at init) multiplies the block first: training sets it to 1 / RMS of
    the modality's feature maps on the training samples, so that appearance and motion blocks enter
    their embeddings on one scale (with random stems the flow's maps are ~4x smaller, and under Adam
    a small input means a slowly learned embedding)."""

    def __init__(self, channels: int, dim: int, block: int, dropout: float = 0.0, init: str = "mean"):
        super().__init__()
        self.block = block
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.proj = block_embedding(channels, dim, block, init)
        self.register_buffer("input_scale", torch.ones(()))

    def forward(self, fmap: Tensor, apex_px: Tensor) -> Tensor:
        pts = landmark_to_feature(apex_px, fmap.shape[-1])  # B x 51 x 2, eq. 3
        blocks = sample_blocks(fmap, pts, self.block)  # B x 51 x C x B x B
        return self.proj(self.drop(blocks.flatten(2) * self.input_scale))  # B x 51 x d


class GridTokens(nn.Module):
    """LAMiF-off substitute: fixed-grid B x B patches -> B x (h0/B)^2 x d (dropout, input_scale as in
    LocalAlignment)."""

    def __init__(self, channels: int, dim: int, block: int, dropout: float = 0.0, init: str = "mean"):
        super().__init__()
        self.block = block
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.proj = block_embedding(channels, dim, block, init)
        self.register_buffer("input_scale", torch.ones(()))

    def forward(self, fmap: Tensor, apex_px: Tensor | None = None) -> Tensor:
        patches = F.unfold(fmap, self.block, stride=self.block)  # B x (C*B*B) x P, (C, row, col) order
        return self.proj(self.drop(patches.transpose(1, 2) * self.input_scale))  # B x P x d


class SelfAttention3(nn.Module):
    """Single-head self-attention among the k modality tokens of each landmark (eq. 5).

    init "self": W_Q = W_K = I (W_V as torch initialises it), so at the start each modality's row
    attends to its own token (logit |x|^2 / sqrt(d) vs x_i . x_j / sqrt(d)) and eq. 6's alpha
    really weights motion against the weak rows. On layer-normalised tokens (|x|^2 = d) the self
    logit is sqrt(d) = 16: the softmax is saturated, its gradient ~e^-16, and the attention never
    moves from the identity. "soft": W_Q = W_K = d^(-1/4) I, a self logit of 1 (self weight ~0.58
    of 3 tokens): each row starts on its own token and can still learn where to look. A random
    W_Q, W_K ("random") starts near uniform attention: every row is then the same mix of all three
    tokens and alpha does nothing.
    """

    def __init__(self, dim: int, init: str = "self"):
        super().__init__()
        if init not in SCSA_INITS:
            raise ValueError(f"scsa_init must be one of {list(SCSA_INITS)}, got {init!r}")
        self.q = nn.Linear(dim, dim, bias=False)  # W_Q
        self.k = nn.Linear(dim, dim, bias=False)  # W_K
        self.v = nn.Linear(dim, dim, bias=False)  # W_V
        self.scale = dim**-0.5
        if init in ("self", "soft"):
            gain = 1.0 if init == "self" else dim**-0.25
            with torch.no_grad():
                self.q.weight.copy_(torch.eye(dim) * gain)
                self.k.weight.copy_(torch.eye(dim) * gain)

    def forward(self, tokens: Tensor) -> Tensor:
        """B x N x k x d -> B x N x k x d; row i = Softmax(Q_i K / sqrt(d)) V^T (eq. 5)."""
        q, k, v = self.q(tokens), self.k(tokens), self.v(tokens)
        att = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)  # B x N x k x k
        return att @ v


class SCSA(nn.Module):
    """Single-core self-attention (eqs. 4-6): motion row dominant (alpha), A/G rows softmax-weighted.

    Tokens are given in `modalities` order. Without motion there is no core: it falls back to
    sa-mean over the present tokens. With motion alone the output is the motion row. With one weak
    modality its coefficient is 1 - alpha.
    """

    def __init__(self, dim: int, alpha: float, modalities: tuple[str, ...] | list[str], init: str = "self"):
        super().__init__()
        if not 0.5 <= alpha <= 1.0:
            raise ValueError(f"SC-SA alpha must be in [0.5, 1] (motion dominant), got {alpha}")
        self.alpha = float(alpha)
        self.modalities = tuple(modalities)
        self.attn = SelfAttention3(dim, init)
        self.weak = [m for m in self.modalities if m != "motion"]
        self.w = nn.Parameter(torch.zeros(2))  # (w_a, w_g), eq. 6

    def coefficients(self) -> dict[str, Tensor]:
        """Weight of each present modality's row in F_n (eq. 6); they sum to 1."""
        if "motion" not in self.modalities:
            return {m: self.w.new_tensor(1 / len(self.modalities)) for m in self.modalities}
        coef = {"motion": self.w.new_tensor(self.alpha if self.weak else 1.0)}
        if self.weak:
            w = self.w[[WEAK_INDEX[m] for m in self.weak]]
            for m, p in zip(self.weak, torch.softmax(w, dim=0)):
                coef[m] = (1 - self.alpha) * p
        return coef

    def forward(self, tokens: Tensor) -> Tensor:
        rows = self.attn(tokens)  # B x N x k x d: F~A, F~M, F~G (eq. 5)
        coef = self.coefficients()
        c = torch.stack([coef[m] for m in self.modalities]).to(rows.dtype)  # k
        return (rows * c[:, None]).sum(dim=-2)  # B x N x d, eq. 6


class SAPool(nn.Module):
    """Table 5 'SA + Mean/Max Pl': the same self-attention, then mean or max over the k rows."""

    def __init__(self, dim: int, mode: str, init: str = "self"):
        super().__init__()
        self.attn = SelfAttention3(dim, init)
        self.mode = mode

    def forward(self, tokens: Tensor) -> Tensor:
        rows = self.attn(tokens)  # B x N x k x d
        return rows.mean(dim=-2) if self.mode == "mean" else rows.amax(dim=-2)  # B x N x d


class ConcatFC(nn.Module):
    """Table 5 'Concat + FC': concatenate the k tokens (k d) and map to d."""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.fc = nn.Linear(k * dim, dim)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.fc(tokens.flatten(-2))  # B x N x k*d -> B x N x d


def build_local_fusion(
    name: str, dim: int, alpha: float, modalities: tuple[str, ...] | list[str], init: str = "self"
) -> nn.Module:
    if name == "sc-sa":
        return SCSA(dim, alpha, modalities, init)
    if name in ("sa-mean", "sa-max"):
        return SAPool(dim, name.removeprefix("sa-"), init)
    if name == "concat-fc":
        return ConcatFC(dim, len(modalities))
    raise ValueError(f"local_fusion must be one of {list(LOCAL_FUSIONS)}, got {name!r}")
