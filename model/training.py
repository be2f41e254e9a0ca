"""Training one fold of MiHF-Tr: the `train:` params, the LOSO folds and their seeds, the data every
fold shares (`FoldData`), fitting a fresh model on a fold's training samples, predicting held-out ones.

The LOSO run over all folds (workers, outputs) is model/loso.py; several folds trained as one stacked
model (`train.fold_batch`) model/fold_batch.py. Both use the functions here, as does stage `fit`.

Optimisation (paper §4.2): Adam, lr `train.lr` (1e-3), divided by 10 (`lr_gamma`) every `lr_step`
(20) epochs (StepLR), `epochs` (100), batches of at most `batch_size` (64). An epoch's shuffled
training samples are cut into ceil(n / batch_size) batches of near-equal size (never a batch of
one). The loss is `model.loss` with the class counts of the training fold.

Frozen stems (`model.freeze_stems: true`, the CPU default): the stems never change, so AF and MF
are computed once for every sample (no gradients, eval mode, `train.stem_batch` at a time, with
stems initialised from `train.seed`, or the `model.pretrained` weights) and each fold trains only
the head on these cached maps. Trainable stems (the paper): the whole model runs on every batch;
the processed arrays are put on the device once and batches gathered there.
`train.amp: bf16` runs the forward in bf16 autocast, `train.channels_last` keeps apex, flow and
convolutions in NHWC memory format (trainable stems).

Determinism: everything random in fold k (head initialisation, dropout, landmark jitter, batch
order, augmentation) is seeded from (train.seed, k), the landmark jitter from a torch generator of
the fold's own, so the results do not depend on the order or the number of processes the folds run
in.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import LeaveOneGroupOut
from tqdm import tqdm

from mer.common import PipelineError
from model import MiHFTr, ModelConfig, build_loss, count_parameters, prepare_batch
from model.augment import mirror_flow, mirror_images, mirror_landmarks
from model.gcn import displacements
from model.mihf_tr import model_inputs


@dataclass(frozen=True)
class TrainConfig:
    """The `train:` section of params.yaml (paper values in the comments of params.yaml)."""

    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    seed: int = 0
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    lr_step: int = 20  # epochs between learning-rate decays
    lr_gamma: float = 0.1  # factor of each decay (paper: divided by 10)
    weight_decay: float = 0.0  # AdamW (decoupled); 0 = the paper's Adam
    mirror: bool = False  # horizontal mirror of apex, flow (u negated) and landmarks, p = 0.5
    flow_jitter: float = 0.0  # flow magnitude x exp(U(-j, j)) per training sample
    balance_inputs: bool = False  # scale each modality's blocks to unit RMS on the training samples
    balance_geometry: bool = False  # the GCN's landmark displacements in units of their RMS on the training
    # samples (off: DISPLACEMENT_SCALE_PX, model/gcn.py)
    stem_batch: int = 16  # samples per batch when caching frozen stem features (memory only)
    fold_batch: int = 1  # folds trained together as one stacked model; 1 = one at a time, 0 = all
    amp: str = "none"  # none | bf16 (autocast of the forward)
    channels_last: bool = False  # trainable stems: apex, flow and convolutions in NHWC memory format
    deterministic: str | bool = "auto"  # CUDA kernels: auto (false on CUDA; CPU's always are) | true | false

    @classmethod
    def from_params(cls, section: dict[str, Any] | None) -> TrainConfig:
        section = dict(section or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(section) - set(valid))
        if unknown:
            raise PipelineError(f"unknown train key(s) {unknown} in params.yaml; valid keys: {valid}")
        try:
            config = cls(**section)
        except TypeError as err:
            raise PipelineError(f"params.yaml train: {err}") from err
        config.validate()
        return config

    def validate(self) -> None:
        for name in ("seed", "epochs", "batch_size", "lr_step", "stem_batch", "fold_batch"):
            value = getattr(self, name)
            low = 0 if name in ("seed", "fold_batch") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise PipelineError(f"train.{name} must be an integer >= {low}, got {value!r}")
        for name in ("mirror", "balance_inputs", "balance_geometry", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise PipelineError(f"train.{name} must be true or false, got {getattr(self, name)!r}")
        for name, low in (("lr", 0.0), ("lr_gamma", 0.0), ("weight_decay", 0.0), ("flow_jitter", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
                raise PipelineError(f"train.{name} must be a number >= {low}, got {value!r}")
        if not (self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")):
            raise PipelineError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.amp not in ("none", "bf16"):
            raise PipelineError(f"train.amp must be none or bf16, got {self.amp!r}")
        if not (self.deterministic == "auto" or isinstance(self.deterministic, bool)):
            raise PipelineError("train.deterministic must be auto, true or false,"
                                f" got {self.deterministic!r}")


def configure(params: dict) -> tuple[TrainConfig, ModelConfig, torch.device]:
    """The validated `train` and `model` sections and the device (on CUDA, deterministic kernels with
    `train.deterministic: true`, the fastest ones otherwise; CPU kernels are deterministic)."""
    cfg = TrainConfig.from_params(params.get("train"))
    try:
        model_cfg = ModelConfig.from_params(params.get("model"))
    except ValueError as err:
        raise PipelineError(f"params.yaml model: {err}") from err
    if cfg.flow_jitter and model_cfg.freeze_stems and model_cfg.pretrained != "none":
        # frozen stems: the jitter scales the cached MF, the same only for a stem without running statistics
        raise PipelineError("train.flow_jitter with frozen pretrained stems would scale their cached maps, "
                            "not the flow: set train.flow_jitter: 0 or model.freeze_stems: false")
    if cfg.fold_batch != 1 and model_cfg.global_fusion == "lstm" and model_cfg.gcmif:
        raise PipelineError("train.fold_batch must be 1 with model.global_fusion: lstm (no batched LSTM)")
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        deterministic = cfg.deterministic is True  # auto: false on CUDA
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
    return cfg, model_cfg, device


@dataclass(frozen=True)
class Fold:
    index: int
    subject: str
    train: np.ndarray  # sample indices
    test: np.ndarray
    seed: int


@dataclass
class FoldResult:
    index: int
    probs: np.ndarray  # len(test) x C, float64
    losses: list[float]  # mean training loss per epoch
    lrs: list[float]  # learning rate used in each epoch
    features: np.ndarray  # len(test) x d, float32: fused feature F_ME of the test samples (eval mode)


def derive_seed(seed: int, *keys: int) -> int:
    """A 32-bit seed from (seed, keys): independent streams for the stems and each fold."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def loso_splits(subjects: np.ndarray, seed: int = 0) -> list[Fold]:
    """One fold per subject (LeaveOneGroupOut: subjects in sorted order), each with its own seed."""
    subjects = np.asarray(subjects)
    if len(np.unique(subjects)) < 2:
        raise PipelineError(f"LOSO needs at least 2 subjects, the dataset has {len(np.unique(subjects))}")
    folds = []
    for k, (train, test) in enumerate(LeaveOneGroupOut().split(np.zeros(len(subjects)), groups=subjects)):
        folds.append(Fold(k, str(subjects[test[0]]), train, test, derive_seed(seed, 1, k)))
    return folds


def resolve_device(name: str, setting: str = "train.device") -> torch.device:
    """The torch device `name` (auto: CUDA when available), checked to exist; errors name `setting`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise PipelineError(f"{setting} is {name!r}, not a torch device: use auto, cpu or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"{setting} is {name} but CUDA is not available: use auto or cpu")
    return device


def epoch_batches(indices: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled indices cut into ceil(n / batch_size) near-equal batches (no batch of one unless n = 1)."""
    order = rng.permutation(indices)
    return np.array_split(order, max(1, math.ceil(len(order) / batch_size)))


@dataclass
class FoldData:
    """What every fold of a run shares, built once (`FoldData.build`) and passed to each fold: the configs,
    the labels, the stems' state and, with frozen stems, their AF / MF of every sample (rows n.. 2n-1: of
    its mirror image), or the raw inputs on the device (trainable stems). Forked workers inherit it."""

    train: TrainConfig
    model: ModelConfig
    device: torch.device
    labels: np.ndarray  # N class indices, int64
    num_classes: int
    cached: bool  # frozen stems: af / mf hold the stem maps; trainable: apex / flow the inputs
    n: int  # samples (the mirrored rows follow them)
    width: int  # crop width in pixels (mirroring the landmarks)
    stem_state: dict[str, torch.Tensor]  # the stems every fold starts from
    landmarks: torch.Tensor  # the head's landmarks (cached: N or 2N x 51 x 4) or the raw landmarks
    features_device: torch.device | None = None  # where af / mf live
    af: torch.Tensor | None = None
    mf: torch.Tensor | None = None
    apex: torch.Tensor | None = None
    flow: torch.Tensor | None = None
    n_params: int = 0
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # reused gather buffers (per process)

    @classmethod
    def build(cls, cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device,
              arrays: dict[str, np.ndarray], num_classes: int) -> FoldData:
        """The stems every fold shares (initialised from (train.seed, 0), or the pretrained weights)
        and, with frozen stems, their AF / MF of every sample (and of its mirror image when
        train.mirror or model.mirror_test), computed once; `n_params`: the model's parameter count."""
        torch.manual_seed(derive_seed(cfg.seed, 0))
        try:
            stem_net = MiHFTr(model_cfg, num_classes)
        except (FileNotFoundError, ValueError) as err:
            raise PipelineError(str(err)) from err
        common = dict(train=cfg, model=model_cfg, device=device, labels=arrays["label"].astype(np.int64),
                      num_classes=num_classes, cached=model_cfg.freeze_stems, n=len(arrays["label"]),
                      width=int(arrays["apex"].shape[2]), n_params=count_parameters(stem_net)["total"],
                      stem_state={k: v for k, v in stem_net.state_dict().items() if k.startswith("stem_")})
        if model_cfg.freeze_stems:
            stem_net.to(device)
            views = [False, True] if cfg.mirror or model_cfg.mirror_test else [False]
            maps = [stem_features(stem_net, arrays["apex"], arrays["flow"], arrays["landmarks"], device,
                                  cfg.stem_batch, mirrored) for mirrored in views]
            af, mf, landmarks = (torch.cat(parts) if parts[0] is not None else None for parts in zip(*maps))
            where = next((x.device for x in (af, mf) if x is not None), device)
            return cls(**common, af=af, mf=mf, features_device=where, landmarks=landmarks.to(where))
        on_device = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device)  # noqa: E731
        return cls(**common, apex=on_device(arrays["apex"]),  # batches are gathered there (inputs)
                   flow=on_device(arrays["flow"].astype(np.float32, copy=False)),
                   landmarks=on_device(arrays["landmarks"].astype(np.float32, copy=False)))

    def inputs(self, idx: np.ndarray, mirrored: np.ndarray | None = None,
               flow_scale: np.ndarray | None = None) -> tuple[Any, Any, torch.Tensor]:
        """(AF, MF, the head's landmarks) of frozen stems, or (apex, flow, landmarks) for trainable stems,
        on the device; `mirrored` (bool per sample) and `flow_scale` (factor per sample) augment (train
        only)."""
        device = self.device
        if self.cached:
            rows = idx if mirrored is None else idx + self.n * mirrored  # mirrored rows follow the originals
            t = torch.from_numpy(rows).to(self.features_device)
            a, b = (self._gather(name, t) for name in ("af", "mf"))
            lm = self.landmarks[t].to(device)
        else:  # the arrays live on the device: a batch is gathered there, never copied from numpy
            t = torch.from_numpy(idx).to(device)
            a, b, lm = model_inputs(*(x.index_select(0, t) for x in (self.apex, self.flow, self.landmarks)),
                                    channels_last=self.train.channels_last)
            if mirrored is not None:
                m = torch.from_numpy(mirrored).to(device)
                a = torch.where(m[:, None, None, None], mirror_images(a), a)
                b = torch.where(m[:, None, None, None], mirror_flow(b), b)
                lm = torch.where(m[:, None, None], mirror_landmarks(lm, self.width), lm)
        if flow_scale is not None and b is not None:
            # The flow, or its frozen-stem map MF: a stem without biases (random init, batch norm at its
            # initial statistics) is positively homogeneous, MF(c flow) = c MF(flow), so both are the same.
            b = b * torch.from_numpy(flow_scale).to(b.device, b.dtype)[:, None, None, None]
        return a, b, lm

    def _gather(self, name: str, t: torch.Tensor) -> torch.Tensor | None:
        """Rows t of a cached feature array, into a reused buffer (a fresh 200 MB tensor per batch costs
        more in page faults than the copy itself); it grows to the largest batch (all folds' rows when
        folds train together)."""
        source = getattr(self, name)
        if source is None:
            return None
        if name not in self.buffers or len(self.buffers[name]) < len(t):
            self.buffers[name] = torch.empty((max(self.train.batch_size, len(t)), *source.shape[1:]),
                                             dtype=source.dtype, device=source.device)
        out = self.buffers[name][: len(t)]
        torch.index_select(source, 0, t, out=out)
        return out.to(self.device)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.train.amp == "bf16")

    def forward(self, net: MiHFTr, a: Any, b: Any, lm: torch.Tensor, jitter: torch.Tensor | None = None,
                features: bool = False) -> Any:
        """Logits (with `features`: and F_ME), float32, of the head on the cached AF / MF or of the whole
        model (stems, then the head; as MiHFTr.forward without its mirror averaging); `jitter`: landmark
        offsets; `train.amp`: bf16 autocast."""
        with self.autocast():
            if not self.cached:
                a, b, lm = run_stems(net, a, b, lm)
            return run_head(net, a, b, lm, jitter, features)

    def generator(self, seed: int, stream: int) -> torch.Generator:
        """A torch generator of the fold's own, on the device: stream 1 the training landmark jitter,
        2 the test jitter (`model.landmark_jitter_test`)."""
        return torch.Generator(self.device).manual_seed(derive_seed(seed, stream))

    def fold_start(self, train_idx: np.ndarray,
                   seed: int) -> tuple[MiHFTr, np.random.Generator, torch.Generator]:
        """A fresh model (the shared stems, a head initialised from `seed`, `train.balance_inputs` /
        `balance_geometry` scales from the training samples) in train mode, with the fold's random
        streams: numpy for the batch order and augmentation, torch for the landmark jitter. Dropout
        draws from torch's global RNG."""
        torch.manual_seed(seed)  # initialisation, dropout
        net = MiHFTr(self.model, self.num_classes)
        net.load_state_dict(self.stem_state, strict=False)  # the stems that made the cached AF / MF
        net.to(self.device)
        if self.train.channels_last and not self.cached:
            net.to(memory_format=torch.channels_last)
        scales = {m: align.input_scale for m, align in net.align.items()} if self.train.balance_inputs else {}
        if self.train.balance_geometry and net.gcn is not None:
            scales["geometry"] = net.gcn.displacement_scale
        if scales:
            for modality, rms in self.map_rms(net, train_idx).items():
                if modality in scales:
                    scales[modality].fill_(1.0 / max(rms, 1e-12))
        return net.train(), np.random.default_rng(seed), self.generator(seed, 1)

    def epoch_plan(self, train_idx: np.ndarray,
                   rng: np.random.Generator) -> list[tuple[np.ndarray, Any, Any]]:
        """One epoch of a fold: (sample indices, mirrored, flow scale) per batch, drawn from the fold's
        rng in a fixed order (the permutation, then each batch's mirror and flow jitter draws)."""
        cfg = self.train
        plan = []
        for idx in epoch_batches(train_idx, cfg.batch_size, rng):
            mirrored = rng.random(len(idx)) < 0.5 if cfg.mirror else None
            j = cfg.flow_jitter
            scale = np.exp(rng.uniform(-j, j, len(idx))) if j else None
            plan.append((idx, mirrored, scale))
        return plan

    def class_counts(self, train_idx: np.ndarray) -> np.ndarray:
        return np.bincount(self.labels[train_idx], minlength=self.num_classes)

    def map_rms(self, net: MiHFTr, idx: np.ndarray) -> dict[str, float]:
        """Root mean square over samples idx of the appearance / motion feature maps (AF, MF), as the
        stems give them before training (the cached maps, or the stems run once without gradients), and
        of the head's landmark displacements (geometry: apex - onset, px)."""
        total: dict[str, float] = {}
        batch = self.train.batch_size
        net.eval()  # batch norm of trainable stems: statistics untouched
        with torch.no_grad():
            for start in range(0, len(idx), batch):
                a, b, lm = self.inputs(idx[start:start + batch])
                if not self.cached:
                    a, b, lm = run_stems(net, a, b, lm)
                for modality, fmap in (("appearance", a), ("motion", b)):
                    if fmap is not None:
                        total[modality] = total.get(modality, 0.0) + float(fmap.double().pow(2).mean(
                            dim=(1, 2, 3)).sum())
                total["geometry"] = total.get("geometry", 0.0) + float(
                    displacements(lm).double().pow(2).mean(dim=(1, 2)).sum())
        return {m: (v / len(idx)) ** 0.5 for m, v in total.items()}


def run_stems(net: MiHFTr, apex: Any, flow: Any, landmarks: torch.Tensor) -> tuple[Any, Any, torch.Tensor]:
    """(AF, MF, the head's landmarks) of a batch of inputs."""
    af, mf = net.stems(apex, flow)
    return af, mf, net.landmarks(flow, landmarks)


def run_head(net: MiHFTr, a: Any, b: Any, lm: torch.Tensor, jitter: torch.Tensor | None,
             features: bool = False) -> Any:
    out = net.head(a, b, lm, return_features=features, jitter=jitter)
    return tuple(x.float() for x in out) if features else out.float()


def fit_net(data: FoldData, train_idx: np.ndarray, seed: int,
            tick: Callable[[int], Any] | None = None) -> tuple[MiHFTr, list[float], list[float]]:
    """A fresh model (the shared stems, a head initialised from `seed`) trained on `train_idx` for the
    fixed number of epochs: (model in eval mode, mean loss per epoch, lr per epoch); `tick(1)` after
    each epoch."""
    cfg, model_cfg, device = data.train, data.model, data.device
    net, rng, jitter_rng = data.fold_start(train_idx, seed)
    loss_fn = build_loss(model_cfg.loss, model_cfg.gamma, data.class_counts(train_idx),
                         model_cfg.class_weight_power).to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.StepLR(optimiser, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    y_all = torch.from_numpy(data.labels)
    losses, lrs = [], []
    for _ in range(cfg.epochs):
        net.train()
        total = 0.0
        lrs.append(float(optimiser.param_groups[0]["lr"]))
        for idx, mirrored, scale in data.epoch_plan(train_idx, rng):
            a, b, lm = data.inputs(idx, mirrored, scale)
            loss = loss_fn(data.forward(net, a, b, lm, net.jitter(lm, jitter_rng)), y_all[idx].to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(train_idx))
        schedule.step()
        if tick is not None:
            tick(1)
    return net.eval(), losses, lrs


def predict(data: FoldData, net: MiHFTr, idx: np.ndarray,
            generator: torch.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities len(idx) x C float64, F_ME len(idx) x d float32) of samples idx, eval mode;
    `generator`: the test jitter's draws (`model.landmark_jitter_test`)."""
    batch = data.train.batch_size
    probs, features = [], []
    net.eval()
    with torch.no_grad():
        for start in range(0, len(idx), batch):
            chunk = idx[start:start + batch]
            a, b, lm = data.inputs(chunk)
            logits, f_me = data.forward(net, a, b, lm, net.jitter(lm, generator), features=True)
            if net.config.mirror_test:  # as MiHFTr.forward: the mean over the sample and its mirror image
                a, b, lm = data.inputs(chunk, np.ones(len(chunk), bool))
                logits_m, f_me_m = data.forward(net, a, b, lm, net.jitter(lm, generator), features=True)
                logits, f_me = (logits + logits_m) / 2, (f_me + f_me_m) / 2
            probs.append(torch.softmax(logits.double(), dim=-1).cpu().numpy())
            features.append(f_me.float().cpu().numpy())
    return np.concatenate(probs), np.concatenate(features)


def stem_features(net: MiHFTr, apex: np.ndarray, flow: np.ndarray, landmarks: np.ndarray,
                  device: torch.device, batch: int,
                  mirrored: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """AF, MF (N x C x h0 x h0 float32) of every sample (mirrored: of its mirror image) through the
    frozen stems, and the landmarks the head uses (N x 51 x 4, `MiHFTr.landmarks`), `batch` at a time."""
    net.eval()
    af_parts, mf_parts, lm_parts = [], [], []
    with torch.no_grad():
        for start in tqdm(range(0, len(apex), batch), desc="stem features (mirrored)" if mirrored else
                          "stem features", unit="batch", file=sys.stderr, dynamic_ncols=True):
            sl = slice(start, start + batch)
            a, f, lm = prepare_batch(apex[sl], flow[sl], landmarks[sl], device)
            if mirrored:
                a, f, lm = mirror_images(a), mirror_flow(f), mirror_landmarks(lm, a.shape[-1])
            af, mf = net.stems(a, f)
            af_parts.append(af)
            mf_parts.append(mf)
            lm_parts.append(net.landmarks(f, lm))
    join = lambda parts: torch.cat(parts) if parts[0] is not None else None  # noqa: E731
    return join(af_parts), join(mf_parts), torch.cat(lm_parts)
