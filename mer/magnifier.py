"""Learning-based motion magnification (Oh et al., ECCV 2018), trained here on synthetic motion.

The network, its training data (scenes the project renders itself: exact ground truth, seeded) and
its trainer. Stage `train_magnifier` (stages/train_magnifier.py, pipeline magnification/dvc.yaml)
writes the weights to `magnify.weights` atomically, same params → same bytes;
`magnify.method: learned` (mer/magnify.py) loads them.

Network after the official code (12dmodel/deep_motion_mag, MIT), static two-frame mode
(reference = onset): encoder → texture (1/4 res) and shape (1/2 res) representations, manipulator
M_b + h((α − 1)·g(M_b − M_a)) on the shape, decoder back to RGB. 32 channels, reflect padding,
no normalisation. Three documented changes for CPU-sized training (docs/magnification.md):

* the decoder predicts a residual added to the apex (its last conv starts at 0.1× its default
  init), so an untrained net is ≈ the identity and the CPU steps go into motion, not reconstruction;
* a LeakyReLU before that last conv (a ReLU there died and froze the net at the identity);
* h has no biases, so h(0) = 0 and α = 1 is *exactly* the net's reconstruction of the apex.

The stages that run the net (`magnify`, `preprocessing_report`) depend on this file, so an edit reruns
them (and, where their outputs change, `flow` → `train`); editing MiHF-Tr (model/) never reruns the
magnifier's own pipeline.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mer.common import PipelineError, round_uint8, save_torch

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
# Synthetic training data, a whole batch at once on one device (a GPU is not starved by a CPU
# generator): pure functions of (params, rng, gen). `rng` (numpy) draws each example's few scalars
# (scene kind, α, motion, shapes...), `gen` (torch, on the device) its pixel noise. A scene is
# N×3×S×S float32 RGB in [0, 255] at 2× the patch resolution; frames are rendered by warping it at
# 2× and area-downsampling.

NOISE_SCALES = (1.0, 2.0, 4.0, 8.0, 16.0)  # σ (scene pixels) of the procedural noise layers
MAX_SHAPES = 5  # filled circles / rectangles per procedural scene: 0..MAX_SHAPES
MAX_BUMPS = 3  # Gaussian bumps of a local flow: 1..MAX_BUMPS


def _tensor(values: Any, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """numpy draws → tensor on the device; to a GPU through pinned memory without waiting (a plain
    copy would stall the host until the GPU had finished the previous training step)."""
    tensor = torch.as_tensor(np.asarray(values), dtype=dtype)
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def procedural(rng: np.random.Generator, gen: torch.Generator, n: int, size: int) -> torch.Tensor:
    """N×3×size×size multi-scale coloured noise plus 0–5 random filled shapes, in [0, 255].

    Each noise layer is white noise blurred by a Gaussian of σ in NOISE_SCALES, normalised to std 1,
    weighted by U(0.2, 1). The blur is done in the Fourier domain (periodic border): for σ = 16 the
    kernel is wider than a small scene, and a texture needs no particular border."""
    device = gen.device
    freq2 = torch.fft.fftfreq(size, device=device)[:, None] ** 2 \
        + torch.fft.rfftfreq(size, device=device) ** 2
    sigma = torch.tensor(NOISE_SCALES, device=device).view(-1, 1, 1, 1)
    transfer = torch.exp(-2 * math.pi**2 * sigma**2 * freq2)  # Gaussian blur's frequency response
    white = torch.randn(n, len(NOISE_SCALES), 3, size, size, generator=gen, device=device)
    layers = torch.fft.irfft2(torch.fft.rfft2(white) * transfer, s=(size, size))
    layers = layers / (layers.std(dim=(2, 3, 4), keepdim=True) + 1e-6)
    weight = _tensor(rng.uniform(0.2, 1.0, (n, len(NOISE_SCALES))), device)
    image = (weight.view(n, -1, 1, 1, 1) * layers).sum(dim=1)
    image = 128 + 40 * image / (image.std(dim=(1, 2, 3), keepdim=True) + 1e-6)
    # Shapes painted in order over the noise, anti-aliased by their pixel coverage.
    count = rng.integers(0, MAX_SHAPES + 1, n)
    circle = rng.random((n, MAX_SHAPES)) < 0.5
    colour = rng.uniform(0, 255, (n, MAX_SHAPES, 3))
    centre = rng.integers(0, size, (n, MAX_SHAPES, 2))  # (x, y)
    extent = rng.integers(size // 16, size // 4, (n, MAX_SHAPES, 2))  # radius = x, or half sides
    pixels = torch.arange(size, dtype=torch.float32, device=device)
    for k in range(MAX_SHAPES):
        dx = pixels.view(1, 1, -1) - _tensor(centre[:, k, 0], device).view(n, 1, 1)
        dy = pixels.view(1, -1, 1) - _tensor(centre[:, k, 1], device).view(n, 1, 1)
        ex, ey = (_tensor(extent[:, k, i], device).view(n, 1, 1) for i in (0, 1))
        disc = (ex + 0.5 - torch.sqrt(dx * dx + dy * dy)).clamp(0, 1)
        box = (ex + 1 - dx.abs()).clamp(0, 1) * (ey + 1 - dy.abs()).clamp(0, 1)  # pixels c-h..c+h filled
        cover = torch.where(_tensor(circle[:, k], device, torch.bool).view(n, 1, 1), disc, box) \
            * _tensor(k < count, device).view(n, 1, 1)
        image = image + cover[:, None] * (_tensor(colour[:, k], device).view(n, 3, 1, 1) - image)
    return image.clamp(0, 255)


@dataclass(frozen=True)
class Photos:
    """Photographs on one device: images P×3×H×W float32 in [0, 255], photo i in its top-left
    sizes[i] = (height, width) corner, edge-replicated to the largest photo's H×W."""

    images: torch.Tensor
    sizes: np.ndarray


def training_photos(device: torch.device | str = "cpu") -> Photos:
    """scikit-image sample photographs used for training (astronaut is held out for evaluation)."""
    from skimage import data

    grey = [data.camera(), data.brick(), data.grass(), data.gravel(), data.coins()]
    colour = [data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    photos = colour + [np.repeat(g[..., None], 3, axis=2) for g in grey]
    sizes = np.array([p.shape[:2] for p in photos])
    height, width = sizes.max(axis=0)
    images = torch.stack([F.pad(torch.from_numpy(p).permute(2, 0, 1).float()[None],
                                (0, width - p.shape[1], 0, height - p.shape[0]), mode="replicate")[0]
                          for p in photos])
    return Photos(images.to(device), sizes)


def photo_crops(rng: np.random.Generator, photos: Photos, n: int, size: int) -> torch.Tensor:
    """N×3×size×size crops of random photographs at a random scale (0.5–1.5 photo pixels per scene
    pixel), half of them mirrored, in [0, 255]: bicubic resampling (a downscale is ≤ 1.5×, and
    `render` blurs the scene before use)."""
    index = rng.integers(len(photos.sizes), size=n)
    scale = rng.uniform(0.5, 1.5, n)
    height, width = photos.sizes[index].T
    side = np.minimum((size * scale).astype(int), np.minimum(height, width))
    y0, x0 = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
    flip = rng.random(n) < 0.5
    device = photos.images.device
    # Output pixel j samples crop coordinate (j + 0.5)·side/size − 0.5 (cv2.resize's pixel centres).
    j = torch.arange(size, dtype=torch.float32, device=device) + 0.5
    step = _tensor(side / size, device).view(n, 1)
    jx = torch.where(_tensor(flip, device, torch.bool).view(n, 1), size - j, j)  # mirrored: size − 1 − j
    x = _tensor(x0, device).view(n, 1) + jx * step - 0.5
    y = _tensor(y0, device).view(n, 1) + j * step - 0.5
    full_h, full_w = photos.images.shape[-2:]
    grid = torch.stack(torch.broadcast_tensors(((2 * x + 1) / full_w - 1)[:, None, :],
                                               ((2 * y + 1) / full_h - 1)[:, :, None]), dim=-1)
    chosen = photos.images[_tensor(index, device, torch.long)]
    crops = F.grid_sample(chosen, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return crops.clamp(0, 255)


def flow_fields(rng: np.random.Generator, size: int, magnitude: np.ndarray, local: np.ndarray,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """N×2×size×size (dx, dy) displacements, max |u| = magnitude[i]: one shift (local[i] false) or
    1–3 smooth Gaussian bumps, each moving its own way (local[i] true)."""
    n = len(magnitude)
    angle = rng.uniform(0, 2 * np.pi, (n, MAX_BUMPS))  # a shift moves along the first one
    bumps = rng.integers(1, MAX_BUMPS + 1, n)
    centre = rng.uniform(0.2, 0.8, (n, MAX_BUMPS, 2)) * size  # (y, x)
    sigma = rng.uniform(0.08, 0.25, (n, MAX_BUMPS)) * size
    direction = _tensor(np.stack([np.cos(angle), np.sin(angle)], axis=2), device)  # N×bumps×2
    pixels = torch.arange(size, dtype=torch.float32, device=device)
    dist2 = (pixels.view(1, 1, -1, 1) - _tensor(centre[..., 0], device).view(n, -1, 1, 1)) ** 2 \
        + (pixels.view(1, 1, 1, -1) - _tensor(centre[..., 1], device).view(n, -1, 1, 1)) ** 2
    active = _tensor(np.arange(MAX_BUMPS) < bumps[:, None], device)
    bump = torch.exp(-dist2 / (2 * _tensor(sigma, device).view(n, -1, 1, 1) ** 2)) * active.view(n, -1, 1, 1)
    bumpy = torch.einsum("nbhw,nbc->nchw", bump, direction)
    peak = bumpy.square().sum(dim=1).amax(dim=(1, 2)).sqrt()  # .norm(dim=1): ~90× slower on a CPU
    bumpy = bumpy / (peak.view(n, 1, 1, 1) + 1e-6)
    shift = direction[:, 0].view(n, 2, 1, 1).expand(n, 2, size, size)
    flow = torch.where(_tensor(local, device, torch.bool).view(n, 1, 1, 1), bumpy, shift)
    return flow * _tensor(magnitude, device).view(n, 1, 1, 1)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """cv2.GaussianBlur's float kernel (radius round(4σ)) with its default border (reflect-101)."""
    radius = round(4 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-x * x / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.pad(images, (radius,) * 4, mode="reflect")  # torch's reflect excludes the edge = reflect-101
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def render(scene: torch.Tensor, flow: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Scenes N×3×2h×2w moved by t × flow (flow N×2×h×w in output pixels, t N×K), N×K×3×h×w frames.

    Backward warp I(x) = scene(x − t·u(x)) at 2× with bicubic interpolation (reflect-101 border),
    then a 2× area downsample; every frame (t = 0 included) goes through the same path, so they
    differ by motion only. The scene is first blurred (σ = 1.5 px at 2×): without it the box
    downsample aliases and a global shift measures up to 0.07 px off (tests/test_magnifier.py checks
    ≤ 0.03).
    """
    n, k = t.shape
    big_h, big_w = scene.shape[-2:]
    blurred = gaussian_blur(scene, ANTI_ALIAS)
    up = F.interpolate(flow, size=(big_h, big_w), mode="bilinear", align_corners=False) * 2  # px at 2×
    tt = t.to(scene).view(n, k, 1, 1)
    x = torch.arange(big_w, dtype=scene.dtype, device=scene.device).view(1, 1, 1, -1) - tt * up[:, None, 0]
    y = torch.arange(big_h, dtype=scene.dtype, device=scene.device).view(1, 1, -1, 1) - tt * up[:, None, 1]
    # align_corners=True: normalised ±1 are the edge pixels' centres, so reflection is reflect-101.
    grid = torch.stack([2 * x / (big_w - 1) - 1, 2 * y / (big_h - 1) - 1], dim=-1).flatten(0, 1)
    warped = F.grid_sample(blurred.repeat_interleave(k, dim=0), grid, mode="bicubic",
                           padding_mode="reflection", align_corners=True)
    return F.avg_pool2d(warped, 2).unflatten(0, (n, k))


def quantise(images: torch.Tensor, gen: torch.Generator, noise: float | np.ndarray) -> torch.Tensor:
    """8-bit capture of N×3×H×W in [0, 255]: Gaussian sensor noise (σ in grey levels, one or one per
    image) + uniform dither, rounded, clipped; returned in [-1, 1] (grey level / 127.5 − 1)."""
    sigma = _tensor(noise, images.device).reshape(-1, 1, 1, 1)
    shape, device = images.shape, images.device
    noisy = images + sigma * torch.randn(shape, generator=gen, device=device) \
        + torch.rand(shape, generator=gen, device=device) - 0.5
    return noisy.round().clamp(0, 255) / 127.5 - 1


def sample_alpha(rng: np.random.Generator, p: dict[str, Any], n: int) -> np.ndarray:
    """n α over [alpha_min, alpha_max], each with probability alpha_focus_p drawn from alpha_focus instead."""
    focus = rng.random(n) < p["alpha_focus_p"]
    low = np.where(focus, p["alpha_focus"][0], p["alpha_min"])
    high = np.where(focus, p["alpha_focus"][1], p["alpha_max"])
    return rng.uniform(low, high)


def make_batch(rng: np.random.Generator, gen: torch.Generator, p: dict[str, Any],
               photos: Photos) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(onset, apex, target) N×3×patch×patch in [-1, 1] and α (N), N = batch, on gen's device:
    target = the scene moved α × as far as the apex, clean."""
    n, size, device = p["batch"], p["patch"], gen.device
    scene = torch.empty(n, 3, 2 * size, 2 * size, device=device)
    chosen = rng.random(n) < p["procedural_p"]
    for mask, make in ((chosen, lambda m: procedural(rng, gen, m, 2 * size)),
                       (~chosen, lambda m: photo_crops(rng, photos, m, 2 * size))):
        if mask.any():
            scene[_tensor(np.flatnonzero(mask), device, torch.long)] = make(int(mask.sum()))
    alpha = sample_alpha(rng, p, n)
    # Apex motion log-uniform over motion_px, shrunk so the magnified motion stays within reach.
    d = np.exp(rng.uniform(*np.log(p["motion_px"]), n))
    d = np.minimum(d, p["max_magnified_px"] / np.maximum(alpha, 1.0))
    flow = flow_fields(rng, size, d, rng.random(n) >= 0.5, device)  # half global, half local
    noise = rng.uniform(0, p["noise_max"], n)
    t = _tensor(np.stack([np.zeros(n), np.ones(n), alpha], axis=1), device)  # onset, apex, target
    frames = render(scene, flow, t)
    captured = quantise(frames[:, :2].flatten(0, 1), gen, np.repeat(noise, 2))
    onset, apex = captured.unflatten(0, (n, 2)).unbind(1)
    target = quantise(frames[:, 2], gen, 0.0)
    return onset, apex, target, _tensor(alpha, device)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """N×H×W×3 uint8 → N×3×H×W float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_levels(images: torch.Tensor) -> np.ndarray:
    """N×3×H×W in [-1, 1] → N×H×W×3 float32 grey levels 0..255, not rounded."""
    return ((images.detach().cpu() + 1) * 127.5).clamp(0, 255).permute(0, 2, 3, 1).numpy()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """N×3×H×W in [-1, 1] → N×H×W×3 uint8."""
    return round_uint8(to_levels(images))


def colour_perturb(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image, per-channel random gain and offset (the paper's colour perturbation, simplified)."""
    n, device = images.shape[0], images.device
    gain = 1 + 0.4 * (torch.rand(n, 3, 1, 1, generator=generator, device=device) - 0.5)
    offset = 0.4 * (torch.rand(n, 3, 1, 1, generator=generator, device=device) - 0.5)
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
    device = torch.device(p.get("device", "cpu") if p.get("device", "cpu") != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    rng = np.random.default_rng(p["seed"])  # each example's scalars
    gen = torch.Generator(device).manual_seed(p["seed"])  # pixel noise and colour perturbations
    photos = training_photos(device)
    model = Magnifier().to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=p["lr"])
    # Cosine decay from lr to lr_final over the run.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: p["lr_final"] / p["lr"] + (
        1 - p["lr_final"] / p["lr"]) * 0.5 * (1 + math.cos(math.pi * s / max(p["steps"], 1))))
    start = time.perf_counter()
    for step in range(p["steps"]):
        onset, apex, target, alpha = make_batch(rng, gen, p, photos)
        loss = F.l1_loss(model(onset, apex, alpha), target)
        if p["reg_weight"] > 0:
            # texture is motion-invariant (target vs onset), shape is colour-invariant (target vs perturbed).
            target_perturbed = colour_perturb(target, gen)
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
    """The trained state, byte-stable (same params, same file)."""
    save_torch({k: v.contiguous() for k, v in state.items()}, path)


def load_model(path: Path | str) -> Magnifier:
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path} is missing: run `dvc repro magnification/dvc.yaml:train_magnifier`")
    model = Magnifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()

