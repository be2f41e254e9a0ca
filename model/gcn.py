"""GCN (eq. 2): geometric features GF (51 x d) from the onset/apex landmarks FL (51 x 4).

Node n here is dlib point n + 17 (the jaw, dlib 0-16, is dropped). Graph edges, in dlib numbering:
- chains: right brow 17-18-19-20-21, left brow 22-23-24-25-26, nose bridge 27-28-29-30,
  nostrils 31-32-33-34-35, nose tip 30-31, 30-33, 30-35;
- loops: right eye 36..41 (41-36), left eye 42..47 (47-42), outer lip 48..59 (59-48),
  inner lip 60..67 (67-60);
- within the mouth: outer/inner corners and mid-lips 48-60, 51-62, 54-64, 57-66;
- cross-region: brow-eye 17-36, 19-37, 21-39, 22-42, 24-44, 26-45; glabella 21-27, 22-27;
  eye-nose 39-27, 42-27; nose-mouth 31-48, 33-51, 35-54;
- symmetric (left-right) links: brow ends 17-26, brow peaks 19-24, inner brows 21-22,
  outer eye corners 36-45, inner eye corners 39-42, mouth corners 48-54.
Each edge has a learnable positive weight (exp of a parameter, 1 at init, shared by both directions);
the adjacency gets self-loops (weight 1) and is normalised symmetrically, D^-1/2 (A + I) D^-1/2.

The paper gives the GCN's input (51 x 4), output (51 x d) and depth (2 layers), not its layers.
Two choices, measured on development data (docs/model.md, "The geometry path"):
- `weights: node` (default): the first layer gives each landmark its own 6 -> d map (H' = Â [X_n W_n]),
  the second is shared. The 51 nodes are fixed facial points, not interchangeable ones: a brow
  raise and a lip-corner pull mean different classes, and with one shared map the model can only
  tell the nodes apart through their coordinates. `shared`: one map for all nodes (Kipf & Welling).
- `activation: none` (default): no ReLU between the graph convolutions (linear, as SGC, Wu et al.
  2019), so each node's output is linear in its neighbourhood's displacement: on ~100 training
  samples a nonlinear map of the movement fits the training subjects and generalises less.
  `relu`: a ReLU between them.

Node input (6 features, from the 4 columns x_onset, y_onset, x_apex, y_apex in crop pixels):
the four coordinates centred and scaled to [-1, 1] ((p - 112) / 112), and the apex - onset
displacement times `displacement_scale` (/112 would make it vanish next to the positions): with
`train.balance_geometry` (the default recipe), 1 / the RMS displacement of the fold's training
samples, set per fold as `balance_inputs` scales LAMiF's blocks (hard set +0.05 / +0.04 / 0.00 at
train.seed 0 / 1 / 2, SAMM -0.006 over 5 seeds; docs/experiments.md); without it 1 /
DISPLACEMENT_SCALE_PX, 2/3 px (chosen on the hard development set, where 2 px gave 0.755).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.stems import remove_drift

NUM_LANDMARKS = 51
DLIB_OFFSET = 17
DISPLACEMENT_SCALE_PX = 2.0 / 3
HALF = 112.0  # half the 224 crop
TRACK_WINDOW_PX = 17  # odd, so the square is centred on the point and mirror-symmetric (~ a LAMiF block)
APEX_LANDMARKS = ("flow", "dlib")
GCN_WEIGHTS = ("node", "shared")
GCN_ACTIVATIONS = ("none", "relu")


def _chain(*pts: int) -> list[tuple[int, int]]:
    return list(zip(pts[:-1], pts[1:]))


def _loop(first: int, last: int) -> list[tuple[int, int]]:
    return _chain(*range(first, last + 1), first)


DLIB_EDGES: list[tuple[int, int]] = (
    _chain(17, 18, 19, 20, 21)
    + _chain(22, 23, 24, 25, 26)
    + _chain(27, 28, 29, 30)
    + _chain(31, 32, 33, 34, 35)
    + [(30, 31), (30, 33), (30, 35)]
    + _loop(36, 41)
    + _loop(42, 47)
    + _loop(48, 59)
    + _loop(60, 67)
    + [(48, 60), (51, 62), (54, 64), (57, 66)]
    + [(17, 36), (19, 37), (21, 39), (22, 42), (24, 44), (26, 45), (21, 27), (22, 27), (39, 27), (42, 27)]
    + [(31, 48), (33, 51), (35, 54)]
    + [(17, 26), (19, 24), (21, 22), (36, 45), (39, 42), (48, 54)]
)
EDGES: list[tuple[int, int]] = [(a - DLIB_OFFSET, b - DLIB_OFFSET) for a, b in DLIB_EDGES]


def track_apex(landmarks: Tensor, flow: Tensor, window: int = TRACK_WINDOW_PX) -> Tensor:
    """B x 51 x 4 landmarks, B x 2 x H x W flow -> B x 51 x 4 whose apex points are the onset points
    carried by the flow: onset + the mean drift-free flow in a window x window square around each.

    dlib fits the apex on its own, in whole pixels, on the un-magnified apex crop; the flow goes to
    the magnified apex, sub-pixel. Tracking gives apex points that sit on the frame the flow and the
    appearance come from, with displacements the size of the (magnified) movement.
    """
    local = F.avg_pool2d(remove_drift(flow), window, stride=1, padding=window // 2,
                         count_include_pad=False)  # B x 2 x H x W
    onset = landmarks[..., 0:2]  # B x 51 x 2 (x, y), pixel centres
    h, w = flow.shape[-2:]
    scale = torch.tensor([2.0 / (w - 1), 2.0 / (h - 1)], dtype=onset.dtype, device=onset.device)
    grid = (onset * scale - 1)[:, :, None]  # B x 51 x 1 x 2 in [-1, 1]
    moved = F.grid_sample(local, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return torch.cat([onset, onset + moved[..., 0].transpose(1, 2)], dim=-1)  # B x 51 x 4


def displacements(landmarks: Tensor) -> Tensor:
    """B x 51 x 4 (onset x, y, apex x, y) -> B x 51 x 2 apex - onset, pixels."""
    return landmarks[..., 2:4] - landmarks[..., 0:2]


NODE_FEATURES = 6  # per landmark: onset x, y, apex x, y (centred), displacement x, y


def node_features(landmarks: Tensor,
                  displacement_scale: Tensor | float = 1 / DISPLACEMENT_SCALE_PX) -> Tensor:
    """B x 51 x 4 crop pixels -> B x 51 x 6 (centred positions, displacement x displacement_scale)."""
    pos = (landmarks - HALF) / HALF
    return torch.cat([pos, displacements(landmarks) * displacement_scale], dim=-1)


class NodeLinear(nn.Module):
    """A linear map of each node's own: B x N x F -> B x N x D, node n by W_n (F x D) and b_n."""

    def __init__(self, nodes: int, in_features: int, out_features: int):
        super().__init__()
        bound = in_features ** -0.5  # nn.Linear's initial range, drawn for each node independently
        self.weight = nn.Parameter(torch.empty(nodes, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(nodes, out_features).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bnf,nfd->bnd", x, self.weight) + self.bias


class GCN(nn.Module):
    """`layers` graph convolutions H' = Â H W over the facial graph (eq. 2): B x 51 x 4 -> B x 51 x d;
    `weights`: the first layer's W per node or shared; `activation`: between the layers."""

    def __init__(self, dim: int = 256, layers: int = 2, weights: str = "node", activation: str = "none"):
        super().__init__()
        if layers < 1:
            raise ValueError(f"gcn_layers must be >= 1, got {layers}")
        if weights not in GCN_WEIGHTS or activation not in GCN_ACTIVATIONS:
            raise ValueError(f"gcn weights / activation must be in {GCN_WEIGHTS} / {GCN_ACTIVATIONS}, "
                             f"got {weights!r} / {activation!r}")
        idx = torch.tensor(EDGES, dtype=torch.long).t()  # 2 x E
        self.register_buffer("edge_index", idx, persistent=False)
        self.edge_logit = nn.Parameter(torch.zeros(idx.shape[1]))  # weight = exp(0) = 1 at init
        dims = [NODE_FEATURES] + [dim] * layers
        first = (NodeLinear(NUM_LANDMARKS, NODE_FEATURES, dim) if weights == "node"
                 else nn.Linear(NODE_FEATURES, dim))
        self.linears = nn.ModuleList([first, *(nn.Linear(a, b) for a, b in zip(dims[1:-1], dims[2:]))])
        self.relu = activation == "relu"
        # 1 / the displacement unit: 1 / DISPLACEMENT_SCALE_PX, or 1 / the training samples' RMS
        # displacement (train.balance_geometry sets it per fold)
        self.register_buffer("displacement_scale", torch.tensor(1 / DISPLACEMENT_SCALE_PX))

    def adjacency(self) -> Tensor:
        """Normalised adjacency D^-1/2 (A + I) D^-1/2, 51 x 51."""
        n = NUM_LANDMARKS
        w = self.edge_logit.exp()
        a = torch.zeros(n, n, device=w.device, dtype=w.dtype)
        a = a.index_put((self.edge_index[0], self.edge_index[1]), w, accumulate=True)
        a = a.index_put((self.edge_index[1], self.edge_index[0]), w, accumulate=True)
        a = a + torch.eye(n, device=w.device, dtype=w.dtype)
        d = a.sum(dim=1).rsqrt()
        return d[:, None] * a * d[None, :]

    def forward(self, landmarks: Tensor) -> Tensor:
        adj = self.adjacency()
        h = node_features(landmarks, self.displacement_scale)  # B x 51 x 6
        for i, lin in enumerate(self.linears):
            h = adj @ lin(h)  # B x 51 x d  (eq. 2, one graph convolution)
            if self.relu and i < len(self.linears) - 1:
                h = torch.relu(h)
        return h
