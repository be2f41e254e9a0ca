"""Stage `fit`: the final model, trained on ALL subjects with the LOSO recipe, for `predict`.

Same params (`model`, `train`), same fixed epochs and augmentation as every LOSO fold, the same
shared stems; the head is seeded from (train.seed, 2), a stream no fold uses. Nothing is chosen
on any score. Writes `models/mihf_tr.pt` (model/checkpoint.py: weights with the stems, config,
class names, the preprocessing params, package versions) and `models/mihf_tr.json`, the model
card: dataset, sample / subject / class counts, the LOSO metrics of the same run (what to expect on
a new subject), and a hash of the params that made the model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mer.common import atomic_path, load_params, run_main, stage_paths
from model import MiHFTr
from model.checkpoint import save_checkpoint
from stages import train

CARD_SECTIONS = ("data", "frames", "magnify", "flow", "landmarks", "model", "train")


def params_hash(params: dict[str, Any]) -> str:
    """sha256 of the params sections that made the model (sorted JSON)."""
    text = json.dumps({s: params.get(s) for s in CARD_SECTIONS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def fit_final(params: dict[str, Any], h5_path: Path) -> tuple[MiHFTr, dict[str, Any], list[str]]:
    """(model trained on every sample of the processed file, model card without metrics, classes)."""
    cfg, model_cfg, device = train.configure(params)
    arrays, attrs, classes = train.load_processed(h5_path)
    train.setup_state(cfg, model_cfg, device, arrays, len(classes))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the LOSO folds: the same bytes on any machine
    try:
        net, losses, _ = train.fit_net(np.arange(len(arrays["label"])), train.derive_seed(cfg.seed, 2),
                                       tick=False)
    finally:
        torch.set_num_threads(threads)
        train._STATE.clear()
    labels = arrays["label"].astype(np.int64)
    card = {
        "dataset": str(attrs.get("dataset", h5_path.stem)),
        "n_samples": int(len(labels)),
        "n_subjects": int(len(np.unique(arrays["subject"]))),
        "class_counts": {c: int((labels == i).sum()) for i, c in enumerate(classes)},
        "classes": classes,
        "epochs": cfg.epochs,
        "final_train_loss": round(float(losses[-1]), 6),
        "params_sha256": params_hash(params),
    }
    return net.cpu(), card, classes


def main(argv: Sequence[str] | None = None) -> None:
    paths = stage_paths("fit", ["processed", "loso", "model", "card"], argv)
    params = load_params()
    net, card, classes = fit_final(params, paths.processed)
    loso = json.loads(paths.loso.read_text()) if paths.loso.exists() else {}
    card["loso"] = {k: loso[k] for k in ("uf1", "uar", "accuracy", "n_folds") if k in loso}
    save_checkpoint(paths.model, net, classes, params, card)
    with atomic_path(paths.card) as tmp:
        tmp.write_text(json.dumps(card, sort_keys=True, indent=2) + "\n")
    print(f"fit: MiHF-Tr on all {card['n_samples']} samples of {card['n_subjects']} subjects "
          f"(LOSO UF1 {card['loso'].get('uf1', float('nan')):.4f}) -> {paths.model}, {paths.card}")


if __name__ == "__main__":
    run_main(main)
