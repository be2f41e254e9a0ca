"""Learning-based motion magnification (Oh et al., ECCV 2018), trained here on synthetic motion.

The network, its training data (scenes the project renders itself: exact ground truth, seeded) and
its trainer. Stage `train_magnifier` (stages/train_magnifier.py, pipeline magnification/dvc.yaml)
writes the weights to `magnify.weights` atomically, same params → same bytes;
`magnify.method: learned` (stages/magnify.py) loads them.

Network after the official code (12dmodel/deep_motion_mag, MIT), static two-frame mode
(reference = onset): encoder → texture (1/4 res) and shape (1/2 res) representations, manipulator
M_b + h((α − 1)·g(M_b − M_a)) on the shape, decoder back to RGB. 32 channels, reflect padding,
no normalisation. Three documented changes for CPU-sized training (docs/magnification.md):

* the decoder predicts a residual added to the apex (its last conv starts at 0.1× its default
  init), so an untrained net is ≈ the identity and the CPU steps go into motion, not reconstruction;
* a LeakyReLU before that last conv (a ReLU there died and froze the net at the identity);
* h has no biases, so h(0) = 0 and α = 1 is *exactly* the net's reconstruction of the apex.

No stage but the magnifier's own depends on this file (dvc.yaml lists model files one by one), so
editing it never invalidates `train`, nor editing MiHF-Tr the magnifier.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mer.common import PipelineError, atomic_path

# The decoder's last conv starts at this × PyTorch's default init: output ≈ apex at step 0. With a
# near-zero residual, L1 drives the ReLU before that conv to die within ~50 Adam steps (measured: all
# activations 0, the net frozen at the identity), hence a LeakyReLU there.
INIT_SCALE = 0.1
ANTI_ALIAS = 1.5  # σ of the scene blur before rendering, pixels at 2× (see render)


# ---------------------------------------------------------------------------------------------
# Network. Shapes for an N×3×H×W input, H and W multiples of 4.


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2, padding_mode="reflect", bias=bias)


class ResBlock(nn.Module):
    """x + conv(relu(conv(relu(x)))): pre-activation residual block, channels unchanged."""

    def __init__(self, ch: int, bias: bool = True):
        super().__init__()
        self.c1, self.c2 = _conv(ch, ch, bias=bias), _conv(ch, ch, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c2(F.relu(self.c1(F.relu(x))))


class Encoder(nn.Module):
    """N×3×H×W in [-1, 1] → texture N×32×H/4×W/4, shape N×32×H/2×W/2."""

    def __init__(self, ch: int = 32):
        super().__init__()
        self.stem = nn.Sequential(_conv(3, 16, 7), nn.ReLU(),                      # N×16×H×W
                                  _conv(16, ch, 3, 2), nn.ReLU(),                  # N×32×H/2×W/2
                                  *[ResBlock(ch) for _ in range(3)])
        self.texture = nn.Sequential(_conv(ch, ch, 3, 2), nn.ReLU(),               # N×32×H/4×W/4
                                     *[ResBlock(ch) for _ in range(2)])
        self.shape = nn.Sequential(_conv(ch, ch), nn.ReLU(),                       # N×32×H/2×W/2
                                   *[ResBlock(ch) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.stem(x)
        return self.texture(f), self.shape(f)


class Manipulator(nn.Module):
    """M_b + h((α − 1)·g(M_b − M_a)); α is the total factor, α = 1 returns M_b exactly."""

    def __init__(self, ch: int = 32):
        super().__init__()
        self.g = nn.Sequential(_conv(ch, ch), nn.ReLU())                           # motion features
        self.h = nn.Sequential(_conv(ch, ch, bias=False), ResBlock(ch, bias=False))  # h(0) = 0

    def forward(self, shape_a: torch.Tensor, shape_b: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return shape_b + self.h((alpha.view(-1, 1, 1, 1) - 1) * self.g(shape_b - shape_a))


class Decoder(nn.Module):
    """texture N×32×H/4×W/4 + shape N×32×H/2×W/2 → N×3×H×W change added to the apex."""

    def __init__(self, ch: int = 32):
        super().__init__()
        self.texture = nn.Sequential(nn.Upsample(scale_factor=2), _conv(ch, ch), nn.ReLU())  # N×32×H/2
        self.body = nn.Sequential(*[ResBlock(2 * ch) for _ in range(9)])                     # N×64×H/2
        self.out = nn.Sequential(nn.Upsample(scale_factor=2), _conv(2 * ch, ch),             # N×32×H
                                 nn.LeakyReLU(0.2),  # official: ReLU, which dies here (see INIT_SCALE)
                                 _conv(ch, 3, 7))                                            # N×3×H
        with torch.no_grad():  # starts near the identity (a residual on the apex)
            self.out[-1].weight.mul_(INIT_SCALE)
            self.out[-1].bias.zero_()

    def forward(self, texture: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(torch.cat([self.texture(texture), shape], 1)))


class Magnifier(nn.Module):
    """(onset, apex, α) → apex with α × the onset → apex motion; frames N×3×H×W in [-1, 1]."""

    def __init__(self, ch: int = 32):
        super().__init__()
        self.encoder, self.manipulator, self.decoder = Encoder(ch), Manipulator(ch), Decoder(ch)

    def forward(self, onset: torch.Tensor, apex: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        _, shape_a = self.encoder(onset)
        texture_b, shape_b = self.encoder(apex)
        return apex + self.decoder(texture_b, self.manipulator(shape_a, shape_b, alpha))

    def reconstruct(self, image: torch.Tensor) -> torch.Tensor:
        """decoder(encoder(image)): what α = 1 gives."""
        texture, shape = self.encoder(image)
        return image + self.decoder(texture, shape)


# ---------------------------------------------------------------------------------------------
# Synthetic training data: pure functions of (params, rng). A scene is a float32 RGB image in
# [0, 255] at 2× the patch resolution; frames are rendered by warping it at 2× and area-downsampling.


def _procedural(rng: np.random.Generator, size: int) -> np.ndarray:
    """Multi-scale coloured noise plus random filled shapes, size²×3 float32 in [0, 255]."""
    image = np.zeros((size, size, 3), np.float32)
    for scale in (1.0, 2.0, 4.0, 8.0, 16.0):
        noise = rng.normal(size=(size, size, 3)).astype(np.float32)
        noise = cv2.GaussianBlur(noise, (0, 0), scale)
        image += rng.uniform(0.2, 1.0) * noise / (noise.std() + 1e-6)
    image = 128 + 40 * image / (image.std() + 1e-6)
    for _ in range(int(rng.integers(0, 6))):
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        centre = tuple(int(c) for c in rng.integers(0, size, 2))
        if rng.random() < 0.5:
            cv2.circle(image, centre, int(rng.integers(size // 16, size // 4)), colour, -1, cv2.LINE_AA)
        else:
            half = rng.integers(size // 16, size // 4, 2)
            cv2.rectangle(image, tuple(int(c - h) for c, h in zip(centre, half)),
                          tuple(int(c + h) for c, h in zip(centre, half)), colour, -1, cv2.LINE_AA)
    return np.clip(image, 0, 255)


def _photo_crop(rng: np.random.Generator, photo: np.ndarray, size: int) -> np.ndarray:
    """size² crop of a photograph at a random scale (0.5–1.5 photo pixels per scene pixel)."""
    scale = rng.uniform(0.5, 1.5)
    side = min(int(size * scale), *photo.shape[:2])
    y, x = (int(rng.integers(0, photo.shape[i] - side + 1)) for i in (0, 1))
    crop = photo[y:y + side, x:x + side].astype(np.float32)
    crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_CUBIC)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(np.clip(crop, 0, 255))


def training_photos() -> list[np.ndarray]:
    """scikit-image sample photographs used for training (astronaut is held out for evaluation)."""
    from skimage import data

    grey = [data.camera(), data.brick(), data.grass(), data.gravel(), data.coins()]
    colour = [data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    return colour + [np.repeat(g[..., None], 3, axis=2) for g in grey]


def flow_field(rng: np.random.Generator, size: int, magnitude: float, kind: str) -> np.ndarray:
    """size²×2 (dx, dy) displacement, max |u| = magnitude: `global` (one shift) or `local` (1–3 smooth
    Gaussian bumps, each moving its own way)."""
    angle = rng.uniform(0, 2 * np.pi)
    if kind == "global":
        return np.broadcast_to(np.float32([np.cos(angle), np.sin(angle)]) * magnitude,
                               (size, size, 2)).copy()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    flow = np.zeros((size, size, 2), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        sigma = rng.uniform(0.08, 0.25) * size
        bump = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        a = rng.uniform(0, 2 * np.pi)
        flow += bump[..., None] * np.float32([np.cos(a), np.sin(a)])
    return flow * np.float32(magnitude / (np.linalg.norm(flow, axis=2).max() + 1e-6))


def render(scene: np.ndarray, flow: np.ndarray, t: float) -> np.ndarray:
    """The scene moved by t × flow (flow at output resolution, scene at 2×), float32 at output size.

    Backward warp I(x) = scene(x − t·u(x)) at 2× with bicubic interpolation, then a 2× area
    downsample; every frame (t = 0 included) goes through the same path, so they differ by motion only.
    The scene is first blurred (σ = 1.5 px at 2×): without it the box downsample aliases and a global
    shift measures up to 0.07 px off (tests/test_magnifier.py checks ≤ 0.03).
    """
    scene = cv2.GaussianBlur(scene, (0, 0), ANTI_ALIAS, borderType=cv2.BORDER_REFLECT_101)
    big = scene.shape[0]
    up = cv2.resize(flow, (big, big), interpolation=cv2.INTER_LINEAR) * 2  # pixels at 2×
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32)
    warped = cv2.remap(scene, xx - t * up[..., 0], yy - t * up[..., 1], cv2.INTER_CUBIC,
                       borderMode=cv2.BORDER_REFLECT_101)
    return cv2.resize(warped, (big // 2, big // 2), interpolation=cv2.INTER_AREA)


def quantise(image: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """8-bit capture: Gaussian sensor noise (σ in grey levels) + uniform dither, rounded, clipped."""
    noisy = image + rng.normal(0, noise, image.shape) + rng.uniform(-0.5, 0.5, image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def sample_alpha(rng: np.random.Generator, p: dict[str, Any]) -> float:
    """α over [alpha_min, alpha_max], with probability alpha_focus_p drawn from alpha_focus instead."""
    lo, hi = p["alpha_focus"] if rng.random() < p["alpha_focus_p"] else (p["alpha_min"], p["alpha_max"])
    return float(rng.uniform(lo, hi))


def make_example(rng: np.random.Generator, p: dict[str, Any],
                 photos: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(onset, apex, target) patch²×3 uint8 and α: target = the scene moved α × as far as the apex."""
    size = p["patch"]
    scene = _procedural(rng, 2 * size) if rng.random() < p["procedural_p"] else \
        _photo_crop(rng, photos[int(rng.integers(len(photos)))], 2 * size)
    alpha = sample_alpha(rng, p)
    # Apex motion log-uniform over motion_px, shrunk so the magnified motion stays within reach.
    d = math.exp(rng.uniform(*np.log(p["motion_px"])))
    d = min(d, p["max_magnified_px"] / max(alpha, 1.0))
    flow = flow_field(rng, size, d, "global" if rng.random() < 0.5 else "local")
    noise = rng.uniform(0, p["noise_max"])
    onset, apex = (quantise(render(scene, flow, t), rng, noise) for t in (0.0, 1.0))
    target = quantise(render(scene, flow, alpha), rng, 0.0)
    return onset, apex, target, alpha


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """N×H×W×3 uint8 → N×3×H×W float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """N×3×H×W in [-1, 1] → N×H×W×3 uint8."""
    out = ((images.detach() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1).numpy()


def make_batch(rng: np.random.Generator, p: dict[str, Any], photos: list[np.ndarray]):
    examples = [make_example(rng, p, photos) for _ in range(p["batch"])]
    onset, apex, target = (to_tensor(np.stack([e[i] for e in examples])) for i in range(3))
    return onset, apex, target, torch.tensor([e[3] for e in examples], dtype=torch.float32)


def colour_perturb(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image, per-channel random gain and offset (the paper's colour perturbation, simplified)."""
    n = images.shape[0]
    gain = 1 + 0.4 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5)
    offset = 0.4 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5)
    return (images * gain + offset).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# Training.


def check_params(p: dict[str, Any]) -> None:
    needed = ("seed", "steps", "batch", "patch", "lr", "lr_final", "alpha_min", "alpha_max", "alpha_focus",
              "alpha_focus_p", "motion_px", "max_magnified_px", "noise_max", "procedural_p", "reg_weight")
    missing = [k for k in needed if k not in p]
    if missing:
        raise PipelineError(f"params.yaml magnifier: missing {', '.join(missing)}")
    if p["patch"] % 4 or p["patch"] < 16:
        raise PipelineError(f"magnifier.patch is {p['patch']}: use a multiple of 4, >= 16")
    if p["steps"] < 0 or p["batch"] < 1:
        raise PipelineError(f"magnifier.steps={p['steps']}, batch={p['batch']}: use steps >= 0, batch >= 1")


def train_magnifier(p: dict[str, Any], log: bool = True) -> dict[str, torch.Tensor]:
    """Train from scratch on synthetic pairs; returns the state_dict. Deterministic for fixed params."""
    check_params(p)
    torch.set_num_threads(1)  # deterministic, and the caller's other core stays free
    torch.manual_seed(p["seed"])
    rng = np.random.default_rng(p["seed"])
    generator = torch.Generator().manual_seed(p["seed"])
    photos = training_photos()
    device = torch.device(p.get("device", "cpu") if p.get("device", "cpu") != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    model = Magnifier().to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=p["lr"])
    # Cosine decay from lr to lr_final over the run.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: p["lr_final"] / p["lr"] + (
        1 - p["lr_final"] / p["lr"]) * 0.5 * (1 + math.cos(math.pi * s / max(p["steps"], 1))))
    start = time.perf_counter()
    for step in range(p["steps"]):
        onset, apex, target, alpha = (x.to(device) for x in make_batch(rng, p, photos))
        loss = F.l1_loss(model(onset, apex, alpha), target)
        if p["reg_weight"] > 0:
            # texture is motion-invariant (target vs onset), shape is colour-invariant (target vs perturbed).
            target_perturbed = colour_perturb(target.cpu(), generator).to(device)
            texture_target, shape_target = model.encoder(target)
            texture_onset, _ = model.encoder(onset)
            _, shape_perturbed = model.encoder(target_perturbed)
            loss = loss + p["reg_weight"] * (F.l1_loss(texture_target, texture_onset) +
                                             F.l1_loss(shape_target, shape_perturbed))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if log and (step % 50 == 0 or step == p["steps"] - 1):
            print(f"train_magnifier: step {step + 1}/{p['steps']} loss {loss.item():.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    return {k: v.cpu() for k, v in model.state_dict().items()}


def save_weights(state: dict[str, torch.Tensor], path: Path | str) -> None:
    """Atomic and byte-stable: serialised in memory (torch.save names the zip's records after the
    file it writes, and the temp file's name holds a pid), then written in one go."""
    buffer = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in state.items()}, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def load_model(path: Path | str) -> Magnifier:
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path} is missing: run `dvc repro magnification/dvc.yaml:train_magnifier`")
    model = Magnifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()

