"""How much of the GCN's input can a head use? Small heads on the tracked landmark displacements.

The GCN (eq. 2) reads, per landmark, the onset point and the apex point that the flow carries it to
(`model.gcn.track_apex`). This trains small heads on those 51 x 2 displacements (standardised on the
training subjects) with the model's own recipe from params.yaml (`model.loss`, `model.gamma`, Adam,
`train.batch_size`, `train.epochs`, StepLR, `train.mirror` augmentation, mirror test averaging), in
the same LOSO folds, and prints each head's pooled UF1 / UAR (MEGC2019):

- `linear`: a softmax regression, every landmark its own weights (what the `flow_landmarks`
  baseline fits, on the tracked points);
- `linear, k smoothing steps`: the same after multiplying the displacements by the GCN's normalised
  adjacency k times (what k graph convolutions do to a landmark's own movement);
- `per-landmark map, shared map, mean pool`: the GCN's two layers without the graph (each landmark
  its own 2 -> 256 map, then one shared 256 -> 256 map), eq. 7's mean pooling, a linear classifier;
  linear, or with a ReLU between the maps.

Usage (`dvc repro baselines` writes the HDF5):

    python -m benchmarks.geometry_heads [data/processed/synthetic.h5]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

from mer.common import class_names, load_params, read_h5
from mer.metrics import pooled_scores
from model.augment import mirror_flow, mirror_landmarks
from model.gcn import GCN, NUM_LANDMARKS, NodeLinear, track_apex
from model.loss import build_loss
from model.training import loso_splits

HIDDEN = 256


class LandmarkMapsMeanPool(nn.Module):
    """The GCN's two layers without the graph, then eq. 7's mean pooling and the classifier:
    B x 51 x 2 -> per-landmark 2 -> HIDDEN map (`model.gcn_weights: node`), ReLU or not
    (`model.gcn_activation`), a shared HIDDEN -> HIDDEN map, mean over the landmarks -> logits."""

    def __init__(self, classes: int, relu: bool):
        super().__init__()
        self.first = NodeLinear(NUM_LANDMARKS, 2, HIDDEN)
        self.relu = relu
        self.second = nn.Linear(HIDDEN, HIDDEN)
        self.classifier = nn.Linear(HIDDEN, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x.view(len(x), NUM_LANDMARKS, 2))
        return self.classifier(self.second(torch.relu(h) if self.relu else h).mean(dim=1))


def displacements(flow: np.ndarray, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N x 102 tracked apex - onset displacements, the same of the mirror images)."""
    f = torch.from_numpy(flow).permute(0, 3, 1, 2).float()
    lm = torch.from_numpy(landmarks).float()
    with torch.no_grad():
        tracked = track_apex(lm, f), track_apex(mirror_landmarks(lm, f.shape[-1]), mirror_flow(f))
    return tuple((t[..., 2:4] - t[..., 0:2]).reshape(len(t), -1).numpy() for t in tracked)


def smoothed(x: np.ndarray, adj: np.ndarray, steps: int) -> np.ndarray:
    """N x 102 -> the same multiplied by the normalised adjacency `adj` (51 x 51) `steps` times."""
    z = np.einsum("ij,bjc->bic", np.linalg.matrix_power(adj, steps), x.reshape(len(x), NUM_LANDMARKS, 2))
    return z.reshape(len(x), -1)


def loso_head(x: np.ndarray, x_mirror: np.ndarray, y: np.ndarray, subjects: np.ndarray, params: dict,
              make_head, lr: float) -> tuple[float, float]:
    """Pooled (UF1, UAR) of a head trained per LOSO fold with the model's recipe."""
    train_cfg, model_cfg = params["train"], params["model"]
    classes = int(y.max()) + 1
    pred = np.zeros(len(y), dtype=int)
    for fold in loso_splits(subjects, train_cfg["seed"]):
        torch.manual_seed(fold.seed)
        rng = np.random.default_rng(fold.seed)
        mean, std = x[fold.train].mean(axis=0), x[fold.train].std(axis=0) + 1e-6
        z, z_mirror = (torch.from_numpy((a - mean) / std).float() for a in (x, x_mirror))
        head = make_head(classes)
        counts = np.bincount(y[fold.train], minlength=classes)
        loss_fn = build_loss(model_cfg["loss"], model_cfg["gamma"], counts)
        optimiser = torch.optim.Adam(head.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.StepLR(optimiser, train_cfg["lr_step"], train_cfg["lr_gamma"])
        labels = torch.from_numpy(y)
        batch = train_cfg["batch_size"]
        for _ in range(train_cfg["epochs"]):
            order = rng.permutation(fold.train)
            for start in range(0, len(order), batch):
                idx = order[start:start + batch]
                flip = torch.from_numpy((rng.random(len(idx)) < 0.5) & train_cfg["mirror"])
                loss = loss_fn(head(torch.where(flip[:, None], z_mirror[idx], z[idx])), labels[idx])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            schedule.step()
        with torch.no_grad():
            logits = head(z[fold.test]) + (head(z_mirror[fold.test]) if model_cfg["mirror_test"] else 0)
        pred[fold.test] = logits.argmax(dim=1).numpy()
    scores = pooled_scores(y, pred, [str(c) for c in range(classes)])
    return scores["uf1"], scores["uar"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("h5", nargs="?", default="data/processed/synthetic.h5")
    parser.add_argument("--linear-lr", type=float, default=1e-2, help="Adam lr of the linear heads")
    args = parser.parse_args()
    params = load_params()
    arrays, attrs = read_h5(args.h5, ["flow", "landmarks", "label", "subject"])
    x, x_mirror = displacements(arrays["flow"], arrays["landmarks"])
    y, subjects = arrays["label"], arrays["subject"]
    lr = params["train"]["lr"]
    print(f"{args.h5}: {len(y)} samples, {len(np.unique(subjects))} subjects, classes {class_names(attrs)}")
    rows = [("linear", lambda c: nn.Linear(x.shape[1], c), args.linear_lr, 0)]
    rows += [(f"linear, {k} smoothing steps", rows[0][1], args.linear_lr, k) for k in (1, 2)]
    rows += [("per-landmark map, shared map, mean pool", lambda c: LandmarkMapsMeanPool(c, False), lr, 0),
             ("the same with a ReLU between the maps", lambda c: LandmarkMapsMeanPool(c, True), lr, 0)]
    adj = GCN(8, weights="shared").adjacency().detach().numpy()  # unit edge weights, as at initialisation
    print(f"{'head':40s} {'lr':>8s} {'UF1':>7s} {'UAR':>7s}")
    for name, make_head, head_lr, steps in rows:
        inputs = smoothed(x, adj, steps), smoothed(x_mirror, adj, steps)
        uf1, uar = loso_head(*inputs, y, subjects, params, make_head, head_lr)
        print(f"{name:40s} {head_lr:8.0e} {uf1:7.4f} {uar:7.4f}")


if __name__ == "__main__":
    main()
