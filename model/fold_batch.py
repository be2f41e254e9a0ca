"""Fold-batched training (`train.fold_batch`: K folds at a time, 0 = all; 1 = each fold alone, the default).

The K fold models are stacked into one set of parameters and trained with one forward / backward
(torch.func.vmap over the folds) and one optimiser step (MaskedAdamW) per step. Each fold still has
its own initialisation, training samples, batch order and augmentation, class weights, Adam state
and (trainable stems: each fold's stems run on its own batch) batch-norm statistics; batches are
padded to the largest and each fold's loss is the mean over its own samples; a fold whose epoch has
no batch left waits. It gives each fold's results of training it alone (float rounding aside,
tests/test_train.py) except for dropout (the transformer's 0.1), drawn for the group at once:
results depend on `fold_batch`, not on `workers`. It is meant for GPUs; on CPU it runs about as fast
as the folds alone per core (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from model.loss import focal_terms, loss_terms
from model.mihf_tr import MiHFTr
from model.training import Fold, FoldData, TrainConfig, derive_seed, run_head, run_stems


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

    def __init__(self, net: MiHFTr, autocast: Callable[[], torch.autocast]):
        super().__init__()
        self.net = copy.deepcopy(net).to("meta")
        self.autocast = autocast

    def forward(self, stems: bool, a: Any, b: Any, lm: torch.Tensor,
                jitter: torch.Tensor | None = None) -> Any:
        with self.autocast():
            return run_stems(self.net, a, b, lm) if stems else run_head(self.net, a, b, lm, jitter)


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


def step_batches(cfg: TrainConfig, folds: list[Fold], batches: list[tuple[np.ndarray, Any, Any] | None]
                 ) -> tuple[np.ndarray, np.ndarray, Any, Any]:
    """One step of every fold (its batch, or None when its epoch has no batch left) as K x B arrays,
    B the largest batch: sample rows (padding: the fold's first training sample), weights (1 / the
    fold's batch size, 0 on padding: each fold's loss is the mean over its own batch), mirrored and
    flow scales (or None when not augmented)."""
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


def fit_group(data: FoldData, folds: list[Fold], tick: Callable[[int], Any] | None = None
              ) -> list[tuple[MiHFTr, list[float], list[float]]]:
    """`fit_net` for several folds at once: their models stacked into one set of parameters, each
    step one forward / backward for all (torch.func.vmap over the fold dimension) and one optimiser
    step. Each fold keeps what it has alone: its initialisation, training samples, batches,
    augmentation and jitter draws, class weights, Adam state; a fold whose epoch has run out of
    batches is not updated. Dropout draws for the whole group at once (torch's global RNG, seeded
    from the first fold). (model in eval mode, mean loss per epoch, lr per epoch) per fold; `tick(K)`
    after each epoch of the K folds."""
    cfg, model_cfg, device = data.train, data.model, data.device
    starts = [data.fold_start(fold.train, fold.seed) for fold in folds]
    nets = [net for net, _, _ in starts]
    torch.manual_seed(derive_seed(folds[0].seed, 3))
    params, buffers = stack_module_state(nets)
    trainable = [p for p in params.values() if p.requires_grad]
    state = {f"net.{name}": t for name, t in {**params, **buffers}.items()}
    parts = _FoldParts(nets[0], data.autocast).train()
    optimiser = MaskedAdamW(trainable, len(folds), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.StepLR(optimiser, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    power = model_cfg.class_weight_power
    terms = [loss_terms(model_cfg.loss, model_cfg.gamma, data.class_counts(fold.train), power)
             for fold in folds]
    ones = torch.ones(data.num_classes)  # fold-batched terms are weighted here, focal / ce included
    gamma, class_w = terms[0][0], torch.stack([ones if w is None else w for _, w in terms]).to(device)
    labels = torch.from_numpy(data.labels).to(device)

    def fold_loss(state: dict, a: Any, b: Any, lm: torch.Tensor, jitter: Any, y: torch.Tensor,
                  w: torch.Tensor, cw: torch.Tensor) -> torch.Tensor:  # one fold: vmap maps the folds
        logits = functional_call(parts, state, (False, a, b, lm, jitter))
        return (focal_terms(logits, y, gamma, cw) * w).sum()

    k_folds = len(folds)
    losses: list[list[float]] = [[] for _ in folds]
    lrs = []
    for _ in range(cfg.epochs):
        plans = [data.epoch_plan(fold.train, rng) for fold, (_, rng, _) in zip(folds, starts)]
        lrs.append(float(optimiser.param_groups[0]["lr"]))
        totals = torch.zeros(k_folds, dtype=torch.float64, device=device)
        for step in range(max(map(len, plans))):
            batches = [plan[step] if step < len(plan) else None for plan in plans]
            rows, weights, mirrored, scale = step_batches(cfg, folds, batches)
            sizes = [0 if batch is None else len(batch[0]) for batch in batches]
            a, b, lm = (None if x is None else x.unflatten(0, rows.shape) for x in data.inputs(
                rows.ravel(), None if mirrored is None else mirrored.ravel(),
                None if scale is None else scale.ravel()))
            if not data.cached:
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
        if tick is not None:
            tick(k_folds)
    with torch.no_grad():  # the trained slices back into each fold's own model
        for k, net in enumerate(nets):
            for name, t in [*net.named_parameters(), *net.named_buffers()]:
                t.copy_(state[f"net.{name}"][k])
    return [(net.eval(), losses[k], lrs) for k, net in enumerate(nets)]
