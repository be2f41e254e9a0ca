"""Stems (eq. 1): the first l layers of torchvision's ResNet50, one for the apex frame, one for the flow.

How l is counted. ResNet50's 50 layers are taken in forward order as: conv1 (+bn1+relu) = layer 1,
maxpool = layer 2, then the three convolutions of each of the 16 bottleneck blocks = layers 3..50
(layer1: 3 blocks, layer2: 4, layer3: 6, layer4: 3; the 1x1 shortcut convs are not counted, and
the fc layer is not counted since the maxpool is). A stem must end on a whole block, so the valid
values are l = 1, 2 and l = 2 + 3k for k = 1..16 blocks. The paper's l = 11 is conv1 + maxpool + the
3 blocks of layer1: a 224x224 image becomes a 256x56x56 map (h0 = 56), as the paper says.

Inputs.
- Apex: float RGB in [0, 1], B x 3 x 224 x 224, normalised with the ImageNet mean/std.
- Flow: raw TV-L1 pixels of the 224 crop, B x 2 x 224 x 224 (u = x, v = y). First the sample's
  median u and v are subtracted: the crops are aligned on the onset frame only, so head drift
  between onset and apex adds one global translation to every pixel, and it is as large as the
  expression itself (measured on the synthetic set, LOSO UF1 0.34 without this step, 0.54 with it).
  The stem needs three channels (so ImageNet conv1 weights fit); the third is the flow magnitude
  sqrt(u^2 + v^2).
  All three are divided by a fixed FLOW_SCALE_PX = 2 px (not a per-sample max: micro-movements are
  sub-pixel to a few pixels after 3x magnification, a fixed scale keeps the movement's amplitude,
  which is information, and does not blow up the noise of near-static samples). A 5 px flow becomes
  2.5, about the range of an ImageNet-normalised image.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FLOW_SCALE_PX = 2.0
IMAGE_SIZE = 224
BLOCKS = (3, 4, 6, 3)  # bottleneck blocks in layer1..layer4
VALID_LAYERS = (1, 2, *(2 + 3 * k for k in range(1, sum(BLOCKS) + 1)))
# The classic torchvision ImageNet weights (76.1 % top-1, what most papers mean by ImageNet ResNet50
# stems; V2's 80.9 % recipe came in 2021). torch hub caches them at imagenet_checkpoint().
IMAGENET_WEIGHTS = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
# Per socket operation, not the whole download: a blocked network fails in seconds, not hours.
DOWNLOAD_TIMEOUT_S = 30
WEIGHTS_HINT = (
    "set model.pretrained: imagenet (torchvision's ImageNet resnet50, downloaded to or read from "
    "torch hub's cache), a path to such a state_dict (.pth), or none"
)


def stem_geometry(layers: int) -> tuple[int, int]:
    """(channels, h0) of the feature map after the first `layers` layers, for a 224x224 input."""
    if layers not in VALID_LAYERS:
        raise ValueError(f"stem_layers must be one of {list(VALID_LAYERS)} (whole blocks), got {layers}")
    if layers == 1:
        return 64, IMAGE_SIZE // 2
    if layers == 2:
        return 64, IMAGE_SIZE // 4
    k = (layers - 2) // 3
    for stage, (n, ch) in enumerate(zip(BLOCKS, (256, 512, 1024, 2048))):
        if k <= n:
            return ch, IMAGE_SIZE // (4 * 2**stage)
        k -= n
    raise AssertionError("unreachable")


def imagenet_checkpoint() -> Path:
    """Where torch hub caches (and looks for) IMAGENET_WEIGHTS: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(IMAGENET_WEIGHTS.url).path).name


def _imagenet_state() -> dict[str, Tensor]:
    """IMAGENET_WEIGHTS' state_dict: from torch hub's cache, else downloaded there (hash checked)."""
    checkpoint = imagenet_checkpoint()
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return IMAGENET_WEIGHTS.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except OSError as err:  # no network, HTTP error, timeout
        reason = " ".join(str(err).split())
        raise FileNotFoundError(
            f"model.pretrained: imagenet: cannot download {IMAGENET_WEIGHTS.url} ({reason}); place "
            f"{checkpoint.name} (from that URL) in {checkpoint.parent}/ (torch hub's cache, "
            f"$TORCH_HOME/hub/checkpoints), or set model.pretrained to a path to it, or none"
        ) from err
    finally:
        socket.setdefaulttimeout(timeout)


def blur_filters_(conv: nn.Conv2d, sigma: float) -> None:
    """Smooth a conv's random k x k filters in place: each one convolved with a Gaussian of `sigma`
    (cells), then all rescaled to their former std (the layer's output scale is kept)."""
    w = conv.weight.data  # out x in x k x k
    k = w.shape[-1]
    r = torch.arange(k, dtype=w.dtype) - (k - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]  # 1 x 1 x k x k, sums to 1
    smooth = F.conv2d(w.reshape(-1, 1, k, k), g, padding=k // 2).reshape_as(w)
    w.copy_(smooth * (w.std() / smooth.std()))


def load_resnet50(pretrained: str | Path | None, blur: float = 0.0) -> torchvision.models.ResNet:
    """A torchvision resnet50: randomly initialised ("none"; conv1's filters smoothed by `blur_filters_`
    when `blur` > 0, as trained first layers are), with IMAGENET_WEIGHTS ("imagenet"), or with the
    state_dict file `pretrained` loaded."""
    net = torchvision.models.resnet50()
    if pretrained is None or str(pretrained) in ("", "none"):
        if blur > 0:
            blur_filters_(net.conv1, blur)
        return net
    if str(pretrained) == "imagenet":
        source, state = str(imagenet_checkpoint()), _imagenet_state()
    else:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.pretrained: no such file {str(path)!r}; {WEIGHTS_HINT}")
        source, state = str(path), torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"model.pretrained: {source!r} is not a torchvision resnet50 state_dict: {err}"
        ) from err
    return net


def remove_drift(flow: Tensor) -> Tensor:
    """B x 2 x H x W flow minus each sample's median (u, v): the head drift (module docstring)."""
    return flow - flow.flatten(2).median(dim=2).values[..., None, None]


class Stem(nn.Module):
    """First `layers` layers of ResNet50 (eq. 1): B x 3 x 224 x 224 -> B x C x h0 x h0."""

    def __init__(self, layers: int = 11, pretrained: str | Path | None = None, kind: str = "appearance",
                 blur: float = 0.0):
        super().__init__()
        if kind not in ("appearance", "motion"):
            raise ValueError(f"stem kind must be appearance or motion, got {kind!r}")
        self.kind = kind
        self.channels, self.h0 = stem_geometry(layers)
        net = load_resnet50(pretrained, blur)
        mods: list[nn.Module] = [net.conv1, net.bn1, net.relu]
        if layers >= 2:
            mods.append(net.maxpool)
        blocks = [b for stage in (net.layer1, net.layer2, net.layer3, net.layer4) for b in stage]
        mods += blocks[: max(0, (layers - 2) // 3)]
        self.body = nn.Sequential(*mods)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def prepare(self, x: Tensor) -> Tensor:
        """Raw input -> the 3-channel normalised image the ResNet sees."""
        if self.kind == "appearance":  # B x 3 x H x W in [0, 1]
            return (x - self.mean) / self.std
        x = remove_drift(x)
        u, v = x[:, 0:1], x[:, 1:2]  # B x 2 x H x W raw pixels -> B x 3 x H x W (u, v, |flow|)
        return torch.cat([u, v, torch.sqrt(u * u + v * v + 1e-12)], dim=1) / FLOW_SCALE_PX

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.prepare(x))  # B x C x h0 x h0 (paper: 256 x 56 x 56)

    def freeze(self) -> None:
        """No gradients, batch-norm statistics fixed (the owner keeps it in eval mode)."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
