"""CW-FLoss (eq. 8), focal loss, cross-entropy.

Eq. 8 as printed, sum_c N_c (1 - p_c)^gamma log p_c, has no minus sign and a weight that grows with
the class count, which would favour the majority class, against the paper's stated aim ("drive
the model to focus on ME classes with fewer samples", §4.4.4, Fig. 5). We implement

    loss = mean over the batch of  -w_y (1 - p_y)^gamma log p_y        (y: the true class)

with w_c the normalised inverse class count of the training fold:

    w_c = C (1 / n_c) / sum_k (1 / n_k)

so the weights average to 1 over the classes, equal counts give w_c = 1 (plain focal loss), and a
class half as frequent weighs twice as much. A class absent from the fold's training samples (a rare
class of a 4-class run) gets weight 0, which never applies, and the others average to 1 among
themselves, as they would in a run without that class. Focal = all w_c = 1;
`ce` = plain cross-entropy (gamma = 0, no weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSSES = ("cw-focal", "focal", "ce")


def class_weights(class_counts: Sequence[int] | np.ndarray | Tensor, power: float = 1.0) -> Tensor:
    """w_c = C n_c^-p / sum_k n_k^-p over the C classes present (n_c > 0; absent ones 0): the normalised
    N_c of eq. 8, larger for rarer classes (p = `power`: 1 inverse counts, 0.5 inverse square roots, 0 no
    weighting)."""
    n = torch.as_tensor(np.asarray(class_counts, dtype=np.float64))
    present = n > 0
    inv = torch.where(present, n.clamp(min=1.0) ** -float(power), 0.0)
    return (int(present.sum()) * inv / inv.sum()).float()


class FocalLoss(nn.Module):
    """-w_y (1 - p_y)^gamma log p_y, mean over the batch (eq. 8, sign and weights as documented)."""

    def __init__(self, gamma: float = 2.0, weights: Tensor | None = None):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.register_buffer("weights", None if weights is None else weights.float())

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return focal_terms(logits, target, self.gamma, self.weights).mean()


def focal_terms(logits: Tensor, target: Tensor, gamma: float, weights: Tensor | None = None) -> Tensor:
    """Each sample's -w_y (1 - p_y)^gamma log p_y (B); every loss of LOSSES is one of these (`focal`:
    no weights, `ce`: gamma 0 as well), `loss_terms` gives gamma and weights."""
    logp = F.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)  # B: log p_y
    loss = -((1 - logp.exp()) ** gamma) * logp
    if weights is not None:
        loss = loss * weights.to(loss.device)[target]
    return loss


def loss_terms(name: str, gamma: float, class_counts: Sequence[int] | np.ndarray | None = None,
               power: float = 1.0) -> tuple[float, Tensor | None]:
    """(gamma, class weights or None) with which `focal_terms` gives loss `name`'s per-sample terms;
    `cw-focal` needs the training fold's class_counts."""
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {name!r}")
    if name == "cw-focal":
        if class_counts is None or len(class_counts) == 0:
            raise ValueError("loss cw-focal needs the training fold's class_counts")
        return float(gamma), class_weights(class_counts, power)
    return (0.0 if name == "ce" else float(gamma)), None


def build_loss(
    name: str, gamma: float = 2.0, class_counts: Sequence[int] | np.ndarray | None = None, power: float = 1.0
) -> nn.Module:
    """`cw-focal` (needs the training fold's class_counts; `power`: `class_weights`) | `focal` | `ce`;
    call as loss(logits, target)."""
    gamma, weights = loss_terms(name, gamma, class_counts, power)
    return nn.CrossEntropyLoss() if name == "ce" else FocalLoss(gamma, weights)
