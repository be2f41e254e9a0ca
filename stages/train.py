"""Stage `train`: Leave-One-Subject-Out training and evaluation of MiHF-Tr, `python -m stages.train`.

Reads the processed HDF5 (docs/hdf5.md); every path comes from dvc.yaml's command line.
One fold per subject (sklearn `LeaveOneGroupOut` over the `subject` array): a fresh model is
trained on the other subjects for a FIXED number of epochs (`train.epochs`) and the model of the
last epoch predicts the held-out subject. Nothing (epoch, checkpoint, threshold) is ever chosen on
the test subject. The predictions of all folds are pooled and scored with the MEGC2019 definition
(mer/metrics.py).

Optimisation (paper §4.2): Adam, lr `train.lr` (1e-3), divided by 10 (`lr_gamma`) every `lr_step`
(20) epochs (StepLR), `epochs` (100), batches of at most `batch_size` (64). An epoch's shuffled
training samples are cut into ceil(n / batch_size) batches of near-equal size (never a batch of
one). The loss is `model.loss` with the class counts of the training fold.

Frozen stems (`model.freeze_stems: true`, the CPU default): the stems never change, so AF and MF
are computed once for every sample (no gradients, eval mode, `train.stem_batch` at a time, with
stems initialised from `train.seed`, or the `model.pretrained` weights) and each fold trains only
the head on these cached maps. Trainable stems (the paper): the whole model runs on every batch;
the processed arrays are put on the device once and batches gathered there.

Fold-batched training (`train.fold_batch`: K folds at a time, 0 = all; 1 = each fold alone, the
default): the K fold models are stacked into one set of parameters and trained with one forward /
backward (torch.func.vmap over the folds) and one optimiser step (MaskedAdamW) per step. Each fold
still has its own initialisation, training samples, batch order and augmentation, class weights,
Adam state and (trainable stems: each fold's stems run on its own batch) batch-norm statistics;
batches are padded to the largest and each fold's loss is the mean over its own samples; a fold
whose epoch has no batch left waits. It gives each fold's results of training it alone (float
rounding aside, tests/test_train.py) except for dropout (the transformer's 0.1), drawn for the
group at once: results depend on `fold_batch`, not on `workers`. It is meant for GPUs; on CPU it
runs about as fast as the folds alone per core (docs/benchmarks.md).
`train.amp: bf16` runs the forward in bf16 autocast, `train.channels_last` keeps apex, flow and
convolutions in NHWC memory format (trainable stems).

Determinism: everything random in fold k (head initialisation, dropout, landmark jitter, batch
order, augmentation) is seeded from (train.seed, k), the landmark jitter from a torch generator of
the fold's own, so the results do not depend on the order or the number of processes the folds run
in. On CPU folds (or groups of folds) run in a pool of `workers` processes (top-level `workers`, 0 =
all cores), one thread each (the serial path uses one thread too, so 1 worker and N workers give
the same bytes; one group of folds alone runs on `workers` threads); on CUDA (`train.device: auto`
picks it when available) one after the other, with deterministic algorithms when
`train.deterministic: true` (auto: the fastest ones). Same params + seed on the same machine ->
byte-identical `metrics/loso.json`, `metrics/predictions.csv`, `metrics/per_fold.csv` and
`data/features.h5`.

Outputs (atomic):
- `metrics/loso.json`: `uf1`, `uar` (pooled), `accuracy`, `per_class`, `per_fold_mean`, `n_samples`,
  `n_subjects`, `n_folds`, `n_params`, and for a composite (megc2019) `per_dataset`:
  {dataset: {uf1, uar, n}}; sorted keys, floats rounded to 6 decimals (deterministic).
- `metrics/timing.json`: wall-clock seconds (stems, training, total), samples/s, device, workers,
  fold_batch.
  Not deterministic, hence a file of its own (dvc.yaml: cache: false).
- `metrics/predictions.csv`: `subject`, `sample`, `true`, `pred` (class names), `p_<class>`.
- `metrics/per_fold.csv`: `subject`, `n`, `uf1`, `uar`, `accuracy` of each fold (test subject) alone
  (`stages.metrics.fold_scores`), one row per subject in fold order: the paired samples of the Wilcoxon
  test between two variants (`python -m stages.report wilcoxon`).
- `data/features.h5` (mer.common.write_h5, deterministic): the out-of-fold fused feature F_ME of
  every sample (`features`, N x d float32: the held-out subject through its fold's final model, eval
  mode, the same forward that gives the probabilities) with `subject`, `sample`, `label`, `pred`
  (class indices), rows in the order of predictions.csv; attrs `classes`, `dataset`, `model` (JSON).
  Input of `python -m stages.report tsne` (t-SNE, ARa / AEr, paper §4.3).
- `metrics/train_loss.csv`: `epoch`, `loss` (mean over folds of the fold's mean training loss), `lr`.
- `metrics/confusion.png`: the pooled confusion matrix (and one per dataset for a composite).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import os
import queue
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import LeaveOneGroupOut
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from tqdm import tqdm

from mer.common import (
    PipelineError,
    atomic_path,
    class_names,
    load_params,
    new_figure,
    read_h5,
    run_main,
    save_figure,
    stage_paths,
    worker_count,
    write_h5,
)
from mer.metrics import (
    confusion_matrix,
    fold_scores,
    per_dataset_scores,
    per_fold_mean,
    pooled_scores,
    round_floats,
    subject_datasets,
)
from model import MiHFTr, ModelConfig, build_loss, count_parameters, prepare_batch
from model.augment import mirror_flow, mirror_images, mirror_landmarks
from model.loss import focal_terms, loss_terms
from model.mihf_tr import model_inputs

OUTPUTS = ("loso", "timing", "predictions", "per_fold", "features", "loss", "confusion")
ARRAYS = ("apex", "flow", "landmarks", "label", "subject", "sample")


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
        for name in ("mirror", "balance_inputs", "channels_last"):
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"train.device is {name} but CUDA is not available: "
                            "set train.device: auto or cpu")
    return device


def epoch_batches(indices: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled indices cut into ceil(n / batch_size) near-equal batches (no batch of one unless n = 1)."""
    order = rng.permutation(indices)
    return np.array_split(order, max(1, math.ceil(len(order) / batch_size)))


# ---- fold training (runs in this process or in forked workers that inherit _STATE) -------------

_STATE: dict[str, Any] = {}  # set before the pool forks: data, cached features, configs
_PROGRESS: Any = None  # a Queue (workers) or a callable (in process): one tick per fold epoch


def _tick(n: int = 1) -> None:
    if callable(_PROGRESS):
        _PROGRESS(n)
    elif _PROGRESS is not None:
        _PROGRESS.put(n)


def _inputs(idx: np.ndarray, mirrored: np.ndarray | None = None,
            flow_scale: np.ndarray | None = None) -> tuple[Any, Any, torch.Tensor]:
    """(AF, MF, the head's landmarks) of frozen stems, or (apex, flow, landmarks) for trainable stems,
    on the device; `mirrored` (bool per sample) and `flow_scale` (factor per sample) augment (train only)."""
    s = _STATE
    device = s["device"]
    if s["cached"]:
        rows = idx if mirrored is None else idx + s["n"] * mirrored  # mirrored rows follow the originals
        t = torch.from_numpy(rows).to(s["features_device"])
        a, b = (_gather(name, t) for name in ("af", "mf"))
        lm = s["landmarks"][t].to(device)
    else:  # the arrays live on the device: a batch is gathered there, never copied from numpy
        t = torch.from_numpy(idx).to(device)
        a, b, lm = model_inputs(*(s[name].index_select(0, t) for name in ("apex", "flow", "landmarks")),
                                channels_last=s["train"].channels_last)
        if mirrored is not None:
            m = torch.from_numpy(mirrored).to(device)
            a = torch.where(m[:, None, None, None], mirror_images(a), a)
            b = torch.where(m[:, None, None, None], mirror_flow(b), b)
            lm = torch.where(m[:, None, None], mirror_landmarks(lm, s["width"]), lm)
    if flow_scale is not None and b is not None:
        # The flow, or its frozen-stem map MF: a stem without biases (random init, batch norm at its
        # initial statistics) is positively homogeneous, MF(c flow) = c MF(flow), so both are the same.
        b = b * torch.from_numpy(flow_scale).to(b.device, b.dtype)[:, None, None, None]
    return a, b, lm


def _gather(name: str, t: torch.Tensor) -> torch.Tensor | None:
    """Rows t of a cached feature array, into a reused buffer (a fresh 200 MB tensor per batch costs
    more in page faults than the copy itself); it grows to the largest batch (all folds' rows when
    folds train together)."""
    s = _STATE
    if s[name] is None:
        return None
    buffers = s.setdefault("buffers", {})
    if name not in buffers or len(buffers[name]) < len(t):
        buffers[name] = torch.empty((max(s["train"].batch_size, len(t)), *s[name].shape[1:]),
                                    dtype=s[name].dtype, device=s[name].device)
    out = buffers[name][: len(t)]
    torch.index_select(s[name], 0, t, out=out)
    return out.to(s["device"])


def _autocast() -> torch.autocast:
    return torch.autocast(_STATE["device"].type, dtype=torch.bfloat16, enabled=_STATE["train"].amp == "bf16")


def _forward(net: MiHFTr, a: Any, b: Any, lm: torch.Tensor, jitter: torch.Tensor | None = None,
             features: bool = False) -> Any:
    """Logits (with `features`: and F_ME), float32, of the head on the cached AF / MF or of the whole
    model (stems, then the head; as MiHFTr.forward without its mirror averaging); `jitter`: landmark
    offsets; `train.amp`: bf16 autocast."""
    with _autocast():
        if not _STATE["cached"]:
            a, b, lm = _stems(net, a, b, lm)
        return _head(net, a, b, lm, jitter, features)


def _stems(net: MiHFTr, apex: Any, flow: Any, landmarks: torch.Tensor) -> tuple[Any, Any, torch.Tensor]:
    """(AF, MF, the head's landmarks) of a batch of inputs."""
    af, mf = net.stems(apex, flow)
    return af, mf, net.landmarks(flow, landmarks)


def _head(net: MiHFTr, a: Any, b: Any, lm: torch.Tensor, jitter: torch.Tensor | None,
          features: bool = False) -> Any:
    out = net.head(a, b, lm, return_features=features, jitter=jitter)
    return tuple(x.float() for x in out) if features else out.float()


def _generator(seed: int, stream: int) -> torch.Generator:
    """A torch generator of the fold's own, on the device: stream 1 the training landmark jitter,
    2 the test jitter (`model.landmark_jitter_test`)."""
    return torch.Generator(_STATE["device"]).manual_seed(derive_seed(seed, stream))


def _fold_start(train_idx: np.ndarray, seed: int) -> tuple[MiHFTr, np.random.Generator, torch.Generator]:
    """A fresh model (the shared stems, a head initialised from `seed`, `train.balance_inputs` scales
    from the training samples) in train mode, with the fold's random streams: numpy for the batch
    order and augmentation, torch for the landmark jitter. Dropout draws from torch's global RNG."""
    s = _STATE
    torch.manual_seed(seed)  # initialisation, dropout
    net = MiHFTr(s["model"], s["num_classes"])
    net.load_state_dict(s["stem_state"], strict=False)  # the stems that made the cached AF / MF
    net.to(s["device"])
    if s["train"].channels_last and not s["cached"]:
        net.to(memory_format=torch.channels_last)
    if s["train"].balance_inputs:
        for modality, rms in map_rms(net, train_idx).items():
            net.align[modality].input_scale.fill_(1.0 / max(rms, 1e-12))
    return net.train(), np.random.default_rng(seed), _generator(seed, 1)


def _epoch_plan(train_idx: np.ndarray, rng: np.random.Generator) -> list[tuple[np.ndarray, Any, Any]]:
    """One epoch of a fold: (sample indices, mirrored, flow scale) per batch, drawn from the fold's
    rng in a fixed order (the permutation, then each batch's mirror and flow jitter draws)."""
    cfg: TrainConfig = _STATE["train"]
    plan = []
    for idx in epoch_batches(train_idx, cfg.batch_size, rng):
        mirrored = rng.random(len(idx)) < 0.5 if cfg.mirror else None
        j = cfg.flow_jitter
        scale = np.exp(rng.uniform(-j, j, len(idx))) if j else None
        plan.append((idx, mirrored, scale))
    return plan


def _class_counts(train_idx: np.ndarray) -> np.ndarray:
    return np.bincount(_STATE["labels"][train_idx], minlength=_STATE["num_classes"])


def fit_net(train_idx: np.ndarray, seed: int, tick: bool = True) -> tuple[MiHFTr, list[float], list[float]]:
    """A fresh model (the shared stems, a head initialised from `seed`) trained on `train_idx` for the
    fixed number of epochs: (model in eval mode, mean loss per epoch, lr per epoch)."""
    s = _STATE
    cfg: TrainConfig = s["train"]
    model_cfg: ModelConfig = s["model"]
    device = s["device"]
    net, rng, jitter_rng = _fold_start(train_idx, seed)
    loss_fn = build_loss(model_cfg.loss, model_cfg.gamma, _class_counts(train_idx),
                         model_cfg.class_weight_power).to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.StepLR(optimiser, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    y_all = torch.from_numpy(s["labels"])
    losses, lrs = [], []
    for _ in range(cfg.epochs):
        net.train()
        total = 0.0
        lrs.append(float(optimiser.param_groups[0]["lr"]))
        for idx, mirrored, scale in _epoch_plan(train_idx, rng):
            a, b, lm = _inputs(idx, mirrored, scale)
            loss = loss_fn(_forward(net, a, b, lm, net.jitter(lm, jitter_rng)), y_all[idx].to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(train_idx))
        schedule.step()
        if tick:
            _tick()
    return net.eval(), losses, lrs


# ---- fold-batched training: K folds as one stacked set of parameters (`train.fold_batch`) ---------

class MaskedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW (decoupled weight decay, bias correction) on stacked fold parameters (dim 0:
    the fold) where only the folds `active` marks step: the others keep their parameters, moments and
    step count, as a fold trained alone that has no batch at this step. In place, as torch's (fresh
    full-size tensors per step cost more than the arithmetic on CPU)."""

    def __init__(self, params: list[torch.Tensor], folds: int, lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps})
        self.steps = np.zeros(folds, np.int64)  # Adam steps each fold has taken

    @torch.no_grad()
    def step(self, active: np.ndarray) -> None:  # type: ignore[override]
        self.steps += active
        on = np.flatnonzero(active)
        for group in self.param_groups:
            lr, wd, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
            t = self.steps[on].astype(np.float64)
            per_fold: dict[Any, tuple[Any, ...]] = {}  # (device, dtype) -> step size, sqrt(bias 2), rows
            for p in group["params"]:
                if p.grad is None:  # as torch's: a parameter without a gradient is left alone
                    continue
                state = self.state[p]
                if not state:
                    state.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                if (p.device, p.dtype) not in per_fold:
                    per_fold[p.device, p.dtype] = (
                        *(torch.from_numpy(v).to(p.device, p.dtype)
                          for v in (lr / (1 - beta1 ** t), np.sqrt(1 - beta2 ** t))),
                        None if len(on) == len(p) else torch.from_numpy(on).to(p.device))
                shape = (-1,) + (1,) * (p.dim() - 1)
                step_size, bias2_sqrt, rows = per_fold[p.device, p.dtype]
                step_size, bias2_sqrt = step_size.view(shape), bias2_sqrt.view(shape)
                full = (p, state["exp_avg"], state["exp_avg_sq"])
                param, exp_avg, exp_avg_sq, grad = (x if rows is None else x.index_select(0, rows)
                                                    for x in (*full, p.grad))
                if wd:
                    param.mul_(1 - lr * wd)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
                param.sub_((exp_avg * step_size).div_(denom))
                if rows is not None:
                    for whole, part in zip(full, (param, exp_avg, exp_avg_sq)):
                        whole.index_copy_(0, rows, part)


@contextlib.contextmanager
def _flat_linear() -> Iterator[None]:
    """F.linear with the input's leading dimensions flattened, inside the block. Under vmap with a
    batched weight, a linear on a 3-D or 4-D input (the transformer's and SC-SA's projections) is
    a matmul that broadcasts the weight over the middle dimensions, and its backward a weight
    gradient per token (15x slower, measured); on a 2-D input it is one batched matmul per fold."""
    linear = F.linear

    def flat(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() <= 2:
            return linear(x, weight, bias)
        return linear(x.reshape(-1, x.shape[-1]), weight, bias).unflatten(0, x.shape[:-1])

    F.linear = flat
    try:
        yield
    finally:
        F.linear = linear


class _FoldParts(nn.Module):
    """A fold model's stems or head as a module's forward, for torch.func.functional_call with one
    fold's slice of the stacked parameters and buffers; holds none itself (meta device)."""

    def __init__(self, net: MiHFTr):
        super().__init__()
        self.net = copy.deepcopy(net).to("meta")

    def forward(self, stems: bool, a: Any, b: Any, lm: torch.Tensor,
                jitter: torch.Tensor | None = None) -> Any:
        with _autocast():
            return _stems(self.net, a, b, lm) if stems else _head(self.net, a, b, lm, jitter)


def _fold_stems(parts: _FoldParts, state: dict[str, torch.Tensor], inputs: tuple[Any, Any, torch.Tensor],
                sizes: list[int]) -> tuple[Any, Any, torch.Tensor]:
    """Trainable stems: each fold's batch (inputs K x B x ..., its first `sizes[k]` rows) through its
    own stems, alone, so that batch norm sees that fold's samples only, as when it trains alone
    (a fold without a batch: no forward, running statistics untouched); AF, MF and the head's
    landmarks zero-padded to K x B for the batched head."""
    outs = []
    for k, n in enumerate(sizes):
        fold_state = {name: t[k] for name, t in state.items() if name.startswith("net.stem_")}
        batch = (None if x is None else x[k, :n] for x in inputs)
        outs.append(functional_call(parts, fold_state, (True, *batch)) if n else None)
    like = next(out for out in outs if out is not None)
    size = inputs[2].shape[1]

    def padded(i: int) -> torch.Tensor | None:
        if like[i] is None:
            return None
        zeros = lambda n: like[i].new_zeros(size - n, *like[i].shape[1:])  # noqa: E731
        return torch.stack([zeros(0) if out is None else torch.cat([out[i], zeros(len(out[i]))])
                            for out in outs])

    return padded(0), padded(1), padded(2)


def _step_batches(folds: list[Fold], batches: list[tuple[np.ndarray, Any, Any] | None]
                  ) -> tuple[np.ndarray, np.ndarray, Any, Any]:
    """One step of every fold (its batch, or None when its epoch has no batch left) as K x B arrays,
    B the largest batch: sample rows (padding: the fold's first training sample), weights (1 / the
    fold's batch size, 0 on padding: each fold's loss is the mean over its own batch), mirrored and
    flow scales (or None when not augmented)."""
    cfg: TrainConfig = _STATE["train"]
    size = max(len(batch[0]) for batch in batches if batch is not None)
    rows = np.array([[fold.train[0]] * size for fold in folds], dtype=np.int64)
    weights = np.zeros((len(folds), size), np.float32)
    mirrored = np.zeros((len(folds), size), bool) if cfg.mirror else None
    scale = np.ones((len(folds), size)) if cfg.flow_jitter else None
    for k, batch in enumerate(batches):
        if batch is None:
            continue
        idx, flips, factors = batch
        rows[k, :len(idx)] = idx
        weights[k, :len(idx)] = 1.0 / len(idx)
        if mirrored is not None:
            mirrored[k, :len(idx)] = flips
        if scale is not None:
            scale[k, :len(idx)] = factors
    return rows, weights, mirrored, scale


def fit_group(folds: list[Fold], tick: bool = True) -> list[tuple[MiHFTr, list[float], list[float]]]:
    """`fit_net` for several folds at once: their models stacked into one set of parameters, each
    step one forward / backward for all (torch.func.vmap over the fold dimension) and one optimiser
    step. Each fold keeps what it has alone: its initialisation, training samples, batches,
    augmentation and jitter draws, class weights, Adam state; a fold whose epoch has run out of
    batches is not updated. Dropout draws for the whole group at once (torch's global RNG, seeded
    from the first fold). (model in eval mode, mean loss per epoch, lr per epoch) per fold."""
    s = _STATE
    cfg: TrainConfig = s["train"]
    model_cfg: ModelConfig = s["model"]
    device = s["device"]
    starts = [_fold_start(fold.train, fold.seed) for fold in folds]
    nets = [net for net, _, _ in starts]
    torch.manual_seed(derive_seed(folds[0].seed, 3))
    params, buffers = stack_module_state(nets)
    trainable = [p for p in params.values() if p.requires_grad]
    state = {f"net.{name}": t for name, t in {**params, **buffers}.items()}
    parts = _FoldParts(nets[0]).train()
    optimiser = MaskedAdamW(trainable, len(folds), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.StepLR(optimiser, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    power = model_cfg.class_weight_power
    terms = [loss_terms(model_cfg.loss, model_cfg.gamma, _class_counts(fold.train), power) for fold in folds]
    ones = torch.ones(s["num_classes"])  # fold-batched terms are weighted here, focal / ce included
    gamma, class_w = terms[0][0], torch.stack([ones if w is None else w for _, w in terms]).to(device)
    labels = torch.from_numpy(s["labels"]).to(device)

    def fold_loss(state: dict, a: Any, b: Any, lm: torch.Tensor, jitter: Any, y: torch.Tensor,
                  w: torch.Tensor, cw: torch.Tensor) -> torch.Tensor:  # one fold: vmap maps the folds
        logits = functional_call(parts, state, (False, a, b, lm, jitter))
        return (focal_terms(logits, y, gamma, cw) * w).sum()

    k_folds = len(folds)
    losses: list[list[float]] = [[] for _ in folds]
    lrs = []
    for _ in range(cfg.epochs):
        plans = [_epoch_plan(fold.train, rng) for fold, (_, rng, _) in zip(folds, starts)]
        lrs.append(float(optimiser.param_groups[0]["lr"]))
        totals = torch.zeros(k_folds, dtype=torch.float64, device=device)
        for step in range(max(map(len, plans))):
            batches = [plan[step] if step < len(plan) else None for plan in plans]
            rows, weights, mirrored, scale = _step_batches(folds, batches)
            sizes = [0 if batch is None else len(batch[0]) for batch in batches]
            a, b, lm = (None if x is None else x.unflatten(0, rows.shape) for x in _inputs(
                rows.ravel(), None if mirrored is None else mirrored.ravel(),
                None if scale is None else scale.ravel()))
            if not s["cached"]:
                a, b, lm = _fold_stems(parts, state, (a, b, lm), sizes)
            jitter = None
            for k, ((net, _, jitter_rng), n) in enumerate(zip(starts, sizes)):
                offsets = net.jitter(lm[k, :n], jitter_rng) if n else None  # drawn as the fold alone draws
                if offsets is not None:
                    jitter = torch.zeros_like(lm) if jitter is None else jitter
                    jitter[k, :n] = offsets
            y = labels[torch.from_numpy(rows).to(device)]
            in_dims = (0, *(None if x is None else 0 for x in (a, b, lm, jitter)), 0, 0, 0)
            with _flat_linear(), warnings.catch_warnings():
                # CPU attention has no batching rule: vmap loops over the folds (once per step, cheap)
                warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
                fold_losses = vmap(fold_loss, in_dims=in_dims, randomness="different")(
                    state, a, b, lm, jitter, y, torch.from_numpy(weights).to(device), class_w)
            optimiser.zero_grad(set_to_none=True)
            fold_losses.sum().backward()
            optimiser.step(np.array(sizes) > 0)
            totals += fold_losses.detach().double() * torch.tensor(sizes, dtype=torch.float64,
                                                                   device=device)
        for k, total in enumerate(totals.tolist()):
            losses[k].append(total / len(folds[k].train))
        schedule.step()
        if tick:
            _tick(k_folds)
    with torch.no_grad():  # the trained slices back into each fold's own model
        for k, net in enumerate(nets):
            for name, t in [*net.named_parameters(), *net.named_buffers()]:
                t.copy_(state[f"net.{name}"][k])
    return [(net.eval(), losses[k], lrs) for k, net in enumerate(nets)]


def map_rms(net: MiHFTr, idx: np.ndarray) -> dict[str, float]:
    """Root mean square of the appearance / motion feature maps (AF, MF) over samples idx, as the
    stems give them before training (the cached maps, or the stems run once without gradients)."""
    s = _STATE
    total: dict[str, float] = {}
    batch = s["train"].batch_size
    net.eval()  # batch norm of trainable stems: statistics untouched
    with torch.no_grad():
        for start in range(0, len(idx), batch):
            a, b, _ = _inputs(idx[start:start + batch])
            if not s["cached"]:
                a, b = net.stems(a, b)
            for modality, fmap in (("appearance", a), ("motion", b)):
                if fmap is not None:
                    total[modality] = total.get(modality, 0.0) + float(fmap.double().pow(2).mean(
                        dim=(1, 2, 3)).sum())
    return {m: (v / len(idx)) ** 0.5 for m, v in total.items() if m in net.align}


def predict(net: MiHFTr, idx: np.ndarray,
            generator: torch.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities len(idx) x C float64, F_ME len(idx) x d float32) of samples idx, eval mode;
    `generator`: the test jitter's draws (`model.landmark_jitter_test`)."""
    batch = _STATE["train"].batch_size
    probs, features = [], []
    net.eval()
    with torch.no_grad():
        for start in range(0, len(idx), batch):
            chunk = idx[start:start + batch]
            a, b, lm = _inputs(chunk)
            logits, f_me = _forward(net, a, b, lm, net.jitter(lm, generator), features=True)
            if net.config.mirror_test:  # as MiHFTr.forward: the mean over the sample and its mirror image
                a, b, lm = _inputs(chunk, np.ones(len(chunk), bool))
                logits_m, f_me_m = _forward(net, a, b, lm, net.jitter(lm, generator), features=True)
                logits, f_me = (logits + logits_m) / 2, (f_me + f_me_m) / 2
            probs.append(torch.softmax(logits.double(), dim=-1).cpu().numpy())
            features.append(f_me.float().cpu().numpy())
    return np.concatenate(probs), np.concatenate(features)


def _held_out(fold: Fold) -> Fold:
    """The fold, once checked: none of its test samples (the held-out subject's) is a training sample."""
    if np.intersect1d(fold.train, fold.test).size:
        raise RuntimeError(f"fold {fold.index}: test subject {fold.subject} is in its training samples")
    return fold


def _fold_result(fold: Fold, net: MiHFTr, losses: list[float], lrs: list[float]) -> FoldResult:
    probs, features = predict(net, fold.test, _generator(fold.seed, 2))
    return FoldResult(fold.index, probs, losses, lrs, features)


def train_fold(fold: Fold) -> FoldResult:
    """Train a fresh model on fold.train for the fixed number of epochs, predict fold.test."""
    return _fold_result(fold, *fit_net(_held_out(fold).train, fold.seed))


def train_group(folds: list[Fold]) -> list[FoldResult]:
    """train_fold of each fold of a group: one at a time (`train.fold_batch: 1`), or trained together."""
    if _STATE["train"].fold_batch == 1:
        return [train_fold(fold) for fold in folds]
    fitted = fit_group([_held_out(fold) for fold in folds])
    return [_fold_result(fold, *result) for fold, result in zip(folds, fitted)]


def _init_worker() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's thread count inside the block (on CPU), restored after it."""
    before = torch.get_num_threads()
    if _STATE["device"].type == "cpu":
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_folds(folds: list[Fold], workers: int, epochs: int) -> list[FoldResult]:
    """All folds, in groups of `train.fold_batch` (1: each fold alone; 0: one group) trained together.
    On CPU the groups go to a pool of forked single-thread workers, or, one group or one worker, run
    in this process (a group trained together on `workers` threads, a fold alone on one: same
    arithmetic as in a worker, same bytes); on CUDA one after the other."""
    global _PROGRESS
    bar = tqdm(total=len(folds) * epochs, desc="train (folds x epochs)", unit="epoch",
               file=sys.stderr, dynamic_ncols=True)
    size = _STATE["train"].fold_batch or len(folds)
    groups = [folds[start:start + size] for start in range(0, len(folds), size)]
    workers = min(worker_count(workers), len(folds))
    try:
        if _STATE["device"].type != "cpu" or min(workers, len(groups)) == 1:
            _PROGRESS = bar.update
            with _threads(1 if size == 1 else workers):
                return [result for group in groups for result in train_group(group)]
        ctx = get_context("fork")  # workers inherit _STATE (data, cached features) without copying
        _PROGRESS = ctx.Queue()
        with ctx.Pool(min(workers, len(groups)), initializer=_init_worker) as pool:
            pending = pool.map_async(train_group, groups, chunksize=1)
            while not pending.ready():
                try:
                    bar.update(_PROGRESS.get(timeout=0.2))
                except queue.Empty:
                    pass
            results = [result for group in pending.get() for result in group]
        while bar.n < bar.total:  # ticks still in the queue
            try:
                bar.update(_PROGRESS.get(timeout=1.0))
            except queue.Empty:
                break
        return results
    finally:
        _PROGRESS = None
        bar.close()


# ---- stems ----------------------------------------------------------------------------------------

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


def setup_state(cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device, arrays: dict[str, np.ndarray],
                num_classes: int) -> int:
    """Fill _STATE for fit_net / predict: the stems every fold shares (initialised from (train.seed, 0),
    or the pretrained weights) and, with frozen stems, their AF / MF of every sample (and of its
    mirror image when train.mirror or model.mirror_test), computed once. Returns the parameter count."""
    torch.manual_seed(derive_seed(cfg.seed, 0))
    try:
        stem_net = MiHFTr(model_cfg, num_classes)
    except (FileNotFoundError, ValueError) as err:
        raise PipelineError(str(err)) from err
    _STATE.clear()
    _STATE.update(train=cfg, model=model_cfg, device=device, labels=arrays["label"].astype(np.int64),
                  num_classes=num_classes, cached=model_cfg.freeze_stems, n=len(arrays["label"]),
                  width=int(arrays["apex"].shape[2]),
                  stem_state={k: v for k, v in stem_net.state_dict().items() if k.startswith("stem_")})
    if model_cfg.freeze_stems:
        stem_net.to(device)
        views = [False, True] if cfg.mirror or model_cfg.mirror_test else [False]
        maps = [stem_features(stem_net, arrays["apex"], arrays["flow"], arrays["landmarks"], device,
                              cfg.stem_batch, mirrored) for mirrored in views]
        af, mf, landmarks = (torch.cat(parts) if parts[0] is not None else None for parts in zip(*maps))
        where = next((x.device for x in (af, mf) if x is not None), device)
        _STATE.update(af=af, mf=mf, features_device=where, landmarks=landmarks.to(where))
    else:  # on the device once: batches are gathered there (_inputs)
        on_device = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device)  # noqa: E731
        _STATE.update(apex=on_device(arrays["apex"]),
                      flow=on_device(arrays["flow"].astype(np.float32, copy=False)),
                      landmarks=on_device(arrays["landmarks"].astype(np.float32, copy=False)))
    return count_parameters(stem_net)["total"]


# ---- outputs --------------------------------------------------------------------------------------

def write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(round_floats(data), sort_keys=True, indent=2) + "\n")


def write_predictions(path: Path, subjects: np.ndarray, samples: np.ndarray, y_true: np.ndarray,
                      probs: np.ndarray, classes: list[str]) -> None:
    y_pred = probs.argmax(axis=1)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["subject", "sample", "true", "pred", *(f"p_{c}" for c in classes)])
        for subject, sample, t, p, row in zip(subjects, samples, y_true, y_pred, probs):
            writer.writerow([subject, sample, classes[t], classes[p], *(f"{v:.6f}" for v in row)])


def write_per_fold(path: Path, y_true: np.ndarray, y_pred: np.ndarray, folds: list[Fold]) -> None:
    """One row per fold: the test subject, its sample count, UF1 / UAR (stages.metrics.fold_scores:
    macro over the classes in that fold) and accuracy, 6 decimals."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["subject", "n", "uf1", "uar", "accuracy"])
        for fold in folds:
            t, p = y_true[fold.test], y_pred[fold.test]
            uf1, uar = fold_scores(t, p)
            accuracy = float(np.mean(t == p))
            writer.writerow([fold.subject, len(fold.test), *(f"{v:.6f}" for v in (uf1, uar, accuracy))])


def write_features(path: Path, features: np.ndarray, subjects: np.ndarray, samples: np.ndarray,
                   y_true: np.ndarray, y_pred: np.ndarray, attrs: dict[str, Any]) -> None:
    write_h5(path, {"features": features.astype(np.float32), "subject": np.asarray(subjects).astype(str),
                    "sample": np.asarray(samples).astype(str), "label": y_true.astype(np.int64),
                    "pred": y_pred.astype(np.int64)}, attrs)


def write_loss_curve(path: Path, results: list[FoldResult]) -> None:
    losses = np.mean([r.losses for r in results], axis=0)
    lrs = results[0].lrs
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["epoch", "loss", "lr"])
        for epoch, (loss, lr) in enumerate(zip(losses, lrs), start=1):
            writer.writerow([epoch, f"{loss:.6f}", f"{lr:.6g}"])


def plot_confusion(path: Path, panels: list[tuple[np.ndarray, str]], classes: list[str]) -> None:
    """One confusion matrix per (matrix, title) panel, side by side (the composite, then each dataset)."""
    side = 1.2 * len(classes) + 2.5
    fig, axes = new_figure(1, len(panels), figsize=(side * len(panels), side - 0.5), squeeze=False)
    for ax, (cm, title) in zip(axes[0], panels):
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=9)
        top = cm.max() if cm.size else 0
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > top / 2 else "black")
    fig.tight_layout()
    save_figure(fig, path)


# ---- the stage ------------------------------------------------------------------------------------

def configure(params: dict) -> tuple[TrainConfig, ModelConfig, torch.device]:
    """The validated `train` and `model` sections and the device (on CUDA, deterministic kernels with
    `train.deterministic: true`, the fastest ones otherwise; CPU kernels are deterministic)."""
    cfg = TrainConfig.from_params(params.get("train"))
    try:
        model_cfg = ModelConfig.from_params(params.get("model"))
    except ValueError as err:
        raise PipelineError(f"params.yaml model: {err}") from err
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


def load_processed(h5_path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any], list[str]]:
    """(arrays, attrs, class names) of the processed HDF5; an empty file is an error."""
    arrays, attrs = read_h5(h5_path, ARRAYS)
    classes = class_names(attrs)
    if len(arrays["label"]) == 0:
        raise PipelineError(f"{h5_path} holds no samples")
    return arrays, attrs, classes


def evaluate(params: dict, out: Any) -> dict[str, Any]:
    """Run LOSO on the processed file `out.processed` with these params; write every output to its
    path in `out` (attributes named as OUTPUTS: loso, timing, predictions, per_fold, features, loss,
    confusion); return the metrics."""
    t_start = time.perf_counter()
    cfg, model_cfg, device = configure(params)
    arrays, attrs, classes = load_processed(out.processed)
    name = attrs.get("dataset", Path(out.processed).stem)
    labels, subjects = arrays["label"].astype(np.int64), np.asarray(arrays["subject"])
    folds = loso_splits(subjects, cfg.seed)

    t_stems = time.perf_counter()
    n_params = setup_state(cfg, model_cfg, device, arrays, len(classes))
    t_train = time.perf_counter()
    results = run_folds(folds, params.get("workers", 0), cfg.epochs)
    t_end = time.perf_counter()
    _STATE.clear()

    probs = np.zeros((len(labels), len(classes)), dtype=np.float64)
    features = np.zeros((len(labels), results[0].features.shape[1]), dtype=np.float32)
    for fold, result in zip(folds, results):
        probs[fold.test] = result.probs
        features[fold.test] = result.features
    y_pred = probs.argmax(axis=1)
    scores = pooled_scores(labels, y_pred, classes)
    metrics = {
        **scores,
        "per_fold_mean": per_fold_mean(labels, y_pred, subjects),
        "n_samples": int(len(labels)),
        "n_subjects": int(len(np.unique(subjects))),
        "n_folds": len(folds),
        "n_params": int(n_params),
    }
    per_dataset = per_dataset_scores(labels, y_pred, subjects, classes)
    if per_dataset:  # a composite (megc2019): each dataset pooled over its folds, as MEGC2019 reports
        metrics["per_dataset"] = per_dataset
    write_json(out.loso, metrics)
    write_predictions(out.predictions, subjects, np.asarray(arrays["sample"]), labels, probs, classes)
    write_per_fold(out.per_fold, labels, y_pred, folds)
    write_features(out.features, features, subjects, np.asarray(arrays["sample"]), labels, y_pred,
                   {"classes": classes, "dataset": str(name),
                    "model": asdict(model_cfg)})
    write_loss_curve(out.loss, results)
    panels = [(confusion_matrix(labels, y_pred, len(classes)),
               f"{name} LOSO, pooled: UF1 {scores['uf1']:.4f}, UAR {scores['uar']:.4f}")]
    datasets = subject_datasets(subjects)
    for member, score in metrics.get("per_dataset", {}).items():
        rows = datasets == member
        panels.append((confusion_matrix(labels[rows], y_pred[rows], len(classes)),
                       f"{member} ({score['n']}): UF1 {score['uf1']:.4f}, UAR {score['uar']:.4f}"))
    plot_confusion(out.confusion, panels, classes)
    trained = sum(len(f.train) for f in folds) * cfg.epochs
    timing = {
        "device": str(device),
        "workers": min(worker_count(params.get("workers", 0)), len(folds)) if device.type == "cpu" else 1,
        "fold_batch": cfg.fold_batch,
        "stems_s": round(t_train - t_stems, 3) if model_cfg.freeze_stems else 0.0,
        "train_s": round(t_end - t_train, 3),
        "total_s": round(time.perf_counter() - t_start, 3),
        "train_samples_per_s": round(trained / max(t_end - t_train, 1e-9), 3),
    }
    with atomic_path(out.timing) as tmp:
        tmp.write_text(json.dumps(timing, sort_keys=True, indent=2) + "\n")
    return metrics


def main(argv: Sequence[str] | None = None) -> None:
    out = stage_paths("train", ["processed", *OUTPUTS], argv)
    params = load_params()
    metrics = evaluate(params, out)
    print(f"train: LOSO over {metrics['n_folds']} subjects, {metrics['n_samples']} samples: pooled UF1 "
          f"{metrics['uf1']:.4f}, UAR {metrics['uar']:.4f}, accuracy {metrics['accuracy']:.4f} "
          f"(per-fold mean, not comparable: UF1 {metrics['per_fold_mean']['uf1']:.4f}, "
          f"UAR {metrics['per_fold_mean']['uar']:.4f}) -> {out.loso}")
    for member, score in metrics.get("per_dataset", {}).items():
        print(f"  {member}: {score['n']} samples, UF1 {score['uf1']:.4f}, UAR {score['uar']:.4f}")


if __name__ == "__main__":
    run_main(main)
