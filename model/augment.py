"""Training-time augmentation that keeps appearance, motion and geometry consistent.

Horizontal mirror: the apex crop is flipped left-right, the flow too with u negated (a movement to
the right becomes one to the left), and every landmark x becomes (W - 1) - x (pixel centres), with
the points renumbered by dlib's 68-point mirror permutation (the subject's left brow becomes the
right brow: point 17 <-> 26, ...), so that node n of the GCN and the n-th LAMiF token still mean the
same facial point. Micro-expression classes do not depend on the side of the face.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.gcn import DLIB_OFFSET, NUM_LANDMARKS

# dlib 68 points: each point's mirror image (jaw 0-16, brows, nose, eyes, lips)
_DLIB_PAIRS = (
    [(i, 16 - i) for i in range(8)]
    + [(17 + i, 26 - i) for i in range(5)]
    + [(31, 35), (32, 34)]
    + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
    + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)]
)
DLIB_MIRROR = list(range(68))
for _a, _b in _DLIB_PAIRS:
    DLIB_MIRROR[_a], DLIB_MIRROR[_b] = _b, _a
# the same on the 51 kept points (jaw dropped): kept index n is dlib point n + 17
KEPT_MIRROR = [DLIB_MIRROR[n + DLIB_OFFSET] - DLIB_OFFSET for n in range(NUM_LANDMARKS)]


def mirror_images(images: Tensor) -> Tensor:
    """B x C x H x W apex crops -> flipped left-right."""
    return images.flip(-1)


def mirror_flow(flow: Tensor) -> Tensor:
    """B x 2 x H x W flow (u, v) -> flipped left-right, u negated."""
    flipped = flow.flip(-1)
    return torch.cat([-flipped[:, :1], flipped[:, 1:]], dim=1)


def mirror_landmarks(landmarks: Tensor, width: int) -> Tensor:
    """B x 51 x 4 (x_onset, y_onset, x_apex, y_apex) crop pixels -> mirrored and renumbered."""
    out = landmarks[:, KEPT_MIRROR].clone()
    out[..., 0::2] = (width - 1) - out[..., 0::2]
    return out
