"""MiHF-Tr (paper §3): stems -> LAMiF (alignment + SC-SA) -> GCMiF -> softmax classifier.

Data flow at the paper settings (B = batch):
    apex B x 3 x 224 x 224 --Stem--> AF B x 256 x 56 x 56 --align (eq. 3)--> F^A B x 51 x 256
    flow B x 2 x 224 x 224 --Stem--> MF B x 256 x 56 x 56 --align (eq. 3)--> F^M B x 51 x 256
    landmarks B x 51 x 4   --GCN (eq. 2)-------------------------------------> F^G B x 51 x 256
    stack B x 51 x 3 x 256 --SC-SA (eqs. 4-6)--> B x 51 x 256 --GCMiF (eq. 7)--> F_ME B x 256
    --linear--> logits B x C (softmax in the loss).
`stems` and `head` are separate so that training with frozen stems can compute AF/MF once.

Apex landmarks (`apex_landmarks`): `dlib` uses the HDF5's points as they are (dlib on the onset
and on the un-magnified apex, whole pixels); `flow` (default) keeps the onset points and carries them
by the flow onto the magnified apex (model/gcn.py `track_apex`), for the GCN and the LAMiF blocks.

Landmark jitter (Table 9): each landmark position moves by exactly e crop pixels in a uniformly
random direction ("randomly deviating from the coordinate by e pixels"): onset and apex
independently with `dlib` points (detected independently), by one offset with `flow` points (the
apex point is the onset point tracked). `landmark_jitter_train` applies in train mode,
`landmark_jitter_test` in eval mode, drawn from torch's global RNG (seed it to repeat), or given to
`head` / `forward` as offsets drawn beforehand from a generator of the caller's (`MiHFTr.jitter`:
training draws each fold's from its own, so that folds trained together draw what they draw alone).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from model.augment import mirror_flow, mirror_images, mirror_landmarks
from model.gcmif import GLOBAL_FUSIONS, TRANSFORMER_HEADS, GCMiF
from model.gcn import APEX_LANDMARKS, GCN, GCN_ACTIVATIONS, GCN_WEIGHTS, NUM_LANDMARKS, track_apex
from model.lamif import (
    BLOCK_INITS,
    LOCAL_FUSIONS,
    MODALITIES,
    SCSA_INITS,
    GridTokens,
    LocalAlignment,
    build_local_fusion,
)
from model.loss import LOSSES
from model.stems import IMAGE_SIZE, VALID_LAYERS, Stem, stem_geometry


def _default_modalities() -> list[str]:
    return list(MODALITIES)


@dataclass
class ModelConfig:
    """The `model:` section of params.yaml (same keys, same defaults). Validated on construction."""

    stem_layers: int = 11
    pretrained: str = "none"
    stem_blur: float = 1.5
    freeze_stems: bool = True
    block: int = 4
    dim: int = 256
    gcn_layers: int = 2
    gcn_weights: str = "node"
    gcn_activation: str = "none"
    alpha: float = 0.7
    modalities: list[str] = field(default_factory=_default_modalities)
    lamif: bool = True
    gcmif: bool = True
    local_fusion: str = "sc-sa"
    global_fusion: str = "sa"
    loss: str = "cw-focal"
    gamma: float = 2.0
    class_weight_power: float = 1.0
    landmark_jitter_train: float = 1.0
    landmark_jitter_test: float = 0.0
    embed_norm: bool = True
    scsa_init: str = "soft"
    block_init: str = "mean"
    dropout: float = 0.0
    block_dropout: float = 0.0
    mirror_test: bool = True
    apex_landmarks: str = "flow"

    @classmethod
    def from_params(cls, section: dict[str, Any] | None) -> ModelConfig:
        section = dict(section or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(section) - set(valid))
        if unknown:
            raise ValueError(f"unknown model key(s) {unknown}; valid keys: {valid}")
        return cls(**section)

    def __post_init__(self) -> None:
        def num(name: str, kind: type, lo: float | None = None, hi: float | None = None) -> None:
            v = getattr(self, name)
            ok = (
                isinstance(v, (int, float))
                and not isinstance(v, bool)
                and (kind is float or isinstance(v, int))
            )
            if not ok:
                raise ValueError(f"model.{name} must be a {kind.__name__}, got {v!r}")
            v = kind(v)
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise ValueError(f"model.{name} must be in [{lo}, {hi}], got {v}")
            setattr(self, name, v)

        def choice(name: str, options: tuple[str, ...]) -> None:
            if getattr(self, name) not in options:
                raise ValueError(f"model.{name} must be one of {list(options)}, got {getattr(self, name)!r}")

        def flag(name: str) -> None:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.{name} must be true or false, got {getattr(self, name)!r}")

        if self.stem_layers not in VALID_LAYERS or isinstance(self.stem_layers, bool):
            raise ValueError(
                f"model.stem_layers must be one of {list(VALID_LAYERS)} (1 = conv1, 2 = +maxpool, "
                f"then 3 per bottleneck block; paper 11), got {self.stem_layers!r}"
            )
        if self.pretrained is None:
            self.pretrained = "none"
        if not isinstance(self.pretrained, str):
            raise ValueError(f"model.pretrained must be none, imagenet or a path, got {self.pretrained!r}")
        num("stem_blur", float, 0.0)
        num("block", int, 1)
        num("dim", int, 1)
        num("gcn_layers", int, 1)
        num("alpha", float, 0.5, 1.0)
        num("gamma", float, 0.0)
        num("class_weight_power", float, 0.0, 2.0)
        num("landmark_jitter_train", float, 0.0)
        num("landmark_jitter_test", float, 0.0)
        num("dropout", float, 0.0, 0.9)
        num("block_dropout", float, 0.0, 0.9)
        choice("scsa_init", SCSA_INITS)
        choice("block_init", BLOCK_INITS)
        choice("apex_landmarks", APEX_LANDMARKS)
        choice("gcn_weights", GCN_WEIGHTS)
        choice("gcn_activation", GCN_ACTIVATIONS)
        for name in ("freeze_stems", "lamif", "gcmif", "embed_norm", "mirror_test"):
            flag(name)
        choice("local_fusion", LOCAL_FUSIONS)
        choice("global_fusion", GLOBAL_FUSIONS)
        choice("loss", LOSSES)
        mods = self.modalities
        if (
            isinstance(mods, str)
            or not mods
            or any(m not in MODALITIES for m in mods)
            or len(set(mods)) != len(mods)
        ):
            raise ValueError(
                f"model.modalities must be a non-empty subset of {list(MODALITIES)}, got {mods!r}"
            )
        self.modalities = [m for m in MODALITIES if m in mods]  # canonical token order A, M, G
        if self.gcmif and self.global_fusion == "sa" and self.dim % TRANSFORMER_HEADS:
            raise ValueError(f"model.dim must be a multiple of {TRANSFORMER_HEADS} (transformer heads)")
        if self.block > stem_geometry(self.stem_layers)[1]:
            raise ValueError(f"model.block {self.block} is larger than the feature map")


def landmark_offsets(landmarks: Tensor, e: float, generator: torch.Generator | None = None,
                     together: bool = False) -> Tensor | None:
    """The moves of `jitter_landmarks` (shaped like `landmarks`, B x 51 x 4), None when e <= 0."""
    if e <= 0:
        return None
    pts = landmarks.unflatten(-1, (2, 2))  # B x 51 x 2 (onset, apex) x 2 (x, y)
    shape = (*pts.shape[:-2], 1) if together else pts.shape[:-1]
    theta = torch.rand(shape, generator=generator, device=landmarks.device) * (2 * math.pi)
    offset = torch.stack([theta.cos(), theta.sin()], dim=-1).to(landmarks.dtype) * e
    return offset.expand(pts.shape).flatten(-2)


def jitter_landmarks(landmarks: Tensor, e: float, generator: torch.Generator | None = None,
                     together: bool = False) -> Tensor:
    """Move every (x, y) point by exactly e px in a random direction: onset and apex independently
    (each detected on its own), or `together` (the apex point is the onset point tracked)."""
    offsets = landmark_offsets(landmarks, e, generator, together)
    return landmarks if offsets is None else landmarks + offsets


class MiHFTr(nn.Module):
    def __init__(self, config: ModelConfig, num_classes: int):
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        mods = config.modalities
        channels, self.h0 = stem_geometry(config.stem_layers)
        image_mods = [m for m in mods if m != "geometry"]
        stem = lambda kind: (  # noqa: E731
            Stem(config.stem_layers, config.pretrained, kind, config.stem_blur) if kind in mods else None
        )
        self.stem_appearance = stem("appearance")
        self.stem_motion = stem("motion")
        self.gcn = (
            GCN(config.dim, config.gcn_layers, weights=config.gcn_weights, activation=config.gcn_activation)
            if "geometry" in mods else None
        )
        if config.lamif:
            self.align = nn.ModuleDict(
                {m: LocalAlignment(channels, config.dim, config.block, config.block_dropout,
                                   config.block_init) for m in image_mods}
            )
            self.local_fusion = build_local_fusion(
                config.local_fusion, config.dim, config.alpha, mods, config.scsa_init
            )
            num_tokens = NUM_LANDMARKS
        else:  # no alignment, no local fusion: grid tokens of AF, MF and the GCN nodes, all to GCMiF
            self.align = nn.ModuleDict(
                {m: GridTokens(channels, config.dim, config.block, config.block_dropout, config.block_init)
                 for m in image_mods}
            )
            self.local_fusion = None
            grid = (self.h0 // config.block) ** 2
            num_tokens = grid * len(image_mods) + (NUM_LANDMARKS if "geometry" in mods else 0)
        # Each modality's tokens are layer-normalised where they are embedded, so that appearance,
        # motion and geometry enter the fusion on one scale (unnormalised, the random appearance
        # blocks are ~5x the motion ones and identity is what the head fits first).
        self.embed_norm = (
            nn.ModuleDict({m: nn.LayerNorm(config.dim) for m in mods}) if config.embed_norm else None
        )
        self.dropout = nn.Dropout(config.dropout)  # on the embedded tokens and on F_ME
        self.global_fusion = GCMiF(config.dim, num_tokens, config.global_fusion if config.gcmif else "mean")
        self.classifier = nn.Linear(config.dim, num_classes)
        if config.freeze_stems:
            for s in self._stems():
                s.freeze()

    def _stems(self) -> list[Stem]:
        return [s for s in (self.stem_appearance, self.stem_motion) if s is not None]

    def train(self, mode: bool = True) -> MiHFTr:
        super().train(mode)
        if self.config.freeze_stems:  # frozen stems keep their batch-norm statistics
            for s in self._stems():
                s.eval()
        return self

    def stems(self, apex: Tensor | None, flow: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """apex B x 3 x 224 x 224 in [0, 1], flow B x 2 x 224 x 224 px -> (AF, MF), B x 256 x 56 x 56 each."""
        af = self.stem_appearance(apex) if self.stem_appearance is not None else None
        mf = self.stem_motion(flow) if self.stem_motion is not None else None
        return af, mf

    def landmarks(self, flow: Tensor | None, landmarks: Tensor) -> Tensor:
        """The landmarks the head uses: the HDF5's (`apex_landmarks: dlib`) or their onset points with
        the apex points tracked by the flow (`flow`, model/gcn.py track_apex). B x 51 x 4 px."""
        if self.config.apex_landmarks == "dlib":
            return landmarks
        if flow is None:
            raise ValueError("model.apex_landmarks: flow needs the flow")
        return track_apex(landmarks, flow)

    def jitter(self, landmarks: Tensor, generator: torch.Generator | None = None) -> Tensor | None:
        """Landmark offsets (B x 51 x 4) of this mode's jitter (train / eval) for a batch shaped like
        `landmarks`, drawn from `generator`; None when this mode has no jitter."""
        cfg = self.config
        e = cfg.landmark_jitter_train if self.training else cfg.landmark_jitter_test
        return landmark_offsets(landmarks, e, generator, together=cfg.apex_landmarks == "flow")

    def head(
        self, af: Tensor | None, mf: Tensor | None, landmarks: Tensor, return_features: bool = False,
        jitter: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """AF, MF (None where the modality is off), the head's landmarks B x 51 x 4 px (`landmarks`)
        -> logits B x C (, F_ME B x d). `jitter`: the landmark offsets (`MiHFTr.jitter`); None: drawn
        here from torch's global RNG."""
        if jitter is None:
            jitter = self.jitter(landmarks)
        lm = landmarks if jitter is None else landmarks + jitter
        apex_px = lm[..., 2:4]  # B x 51 x 2 (x, y), crop pixels
        maps = {"appearance": af, "motion": mf}
        feats: dict[str, Tensor] = {}
        for m, align in self.align.items():
            if maps[m] is None:
                raise ValueError(f"modality {m} is on but its feature map is None")
            feats[m] = align(maps[m], apex_px)  # B x 51 x d (LAMiF) or B x P x d (grid)
        if self.gcn is not None:
            feats["geometry"] = self.gcn(lm)  # B x 51 x d, eq. 2
        for m, tokens in feats.items():
            if self.embed_norm is not None:
                tokens = self.embed_norm[m](tokens)
            feats[m] = self.dropout(tokens)
        if self.local_fusion is not None:
            tokens = torch.stack([feats[m] for m in self.config.modalities], dim=2)  # B x 51 x k x d
            tokens = self.local_fusion(tokens)  # B x 51 x d, eqs. 4-6
        else:
            tokens = torch.cat([feats[m] for m in self.config.modalities], dim=1)  # B x T x d
        f_me = self.global_fusion(tokens)  # B x d, eq. 7
        logits = self.classifier(self.dropout(f_me))  # B x C
        return (logits, f_me) if return_features else logits

    def forward(self, apex: Tensor | None, flow: Tensor | None, landmarks: Tensor,
                jitter: Tensor | None = None) -> Tensor:
        af, mf = self.stems(apex, flow)
        logits = self.head(af, mf, self.landmarks(flow, landmarks), jitter=jitter)
        if self.training or not self.config.mirror_test:
            return logits
        # eval with mirror_test: mean of the logits of the sample and of its mirror image (model/augment.py)
        width = next((x.shape[-1] for x in (apex, flow) if x is not None), IMAGE_SIZE)
        apex_m = None if apex is None else mirror_images(apex)
        flow_m = None if flow is None else mirror_flow(flow)
        af, mf = self.stems(apex_m, flow_m)
        return (logits + self.head(af, mf, self.landmarks(flow_m, mirror_landmarks(landmarks, width)))) / 2


def prepare_batch(
    apex_uint8_nhwc: np.ndarray, flow_nhwc: np.ndarray, landmarks: np.ndarray, device: torch.device | str
) -> tuple[Tensor, Tensor, Tensor]:
    """HDF5 arrays (N x 224 x 224 x 3 uint8, N x 224 x 224 x 2 float32 px, N x 51 x 4 px) -> model inputs:
    apex N x 3 x 224 x 224 float in [0, 1], flow N x 2 x 224 x 224 float32, landmarks N x 51 x 4 float32."""
    return model_inputs(
        torch.from_numpy(np.ascontiguousarray(apex_uint8_nhwc)).to(device),
        torch.from_numpy(np.ascontiguousarray(flow_nhwc, dtype=np.float32)).to(device),
        torch.from_numpy(np.ascontiguousarray(landmarks, dtype=np.float32)).to(device),
    )


def model_inputs(
    apex_uint8_nhwc: Tensor, flow_nhwc: Tensor, landmarks: Tensor, channels_last: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """`prepare_batch` on tensors already where the model runs (float32 flow and landmarks);
    `channels_last`: apex and flow in that memory format (the NHWC layout they come in)."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    apex = apex_uint8_nhwc.permute(0, 3, 1, 2).float() / 255.0
    flow = flow_nhwc.permute(0, 3, 1, 2)
    return apex.contiguous(memory_format=layout), flow.contiguous(memory_format=layout), landmarks


def components(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) per component: top-level children with parameters, ModuleDicts split
    (align_appearance, ...)."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if not any(True for _ in child.parameters()):
            continue  # dropout
        if isinstance(child, nn.ModuleDict):
            out += [(f"{name}_{sub}", mod) for sub, mod in child.items()]
        else:
            out.append((name, child))
    return out


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters per component (all, frozen included), then 'total' and 'trainable' (whole model)."""
    out = {name: sum(p.numel() for p in mod.parameters()) for name, mod in components(model)}
    out["total"] = sum(p.numel() for p in model.parameters())
    out["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return out
