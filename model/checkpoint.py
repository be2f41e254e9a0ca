"""The final model's file (`models/mihf_tr.pt`, stage `fit`), read by `predict`.

torch.save of a plain dict, read back with weights_only=True (loading runs no pickled code):

    format        FORMAT; bumped whenever a key or its meaning changes
    model_config  dataclasses.asdict(ModelConfig) as trained
    num_classes   int
    classes       class names, in the order of the logits
    state_dict    the whole MiHFTr, stems included, so it runs end to end on images
    params        the preprocessing sections the training data was made with (frames, magnify, flow,
                  landmarks; data: dataset, classes): `predict` preprocesses a new clip with exactly these
    versions      mer.common.package_versions() when saved
    extra         model card fields (dataset, samples, subjects, LOSO metrics, params hash, ...)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mer.common import PipelineError, package_versions, save_torch
from mer.processed import PREPROCESSING_SECTIONS
from model.mihf_tr import MiHFTr, ModelConfig

FORMAT = 2  # 2: state_dict holds gcn.displacement_scale (the fold-set displacement unit)
KEYS = ("format", "model_config", "num_classes", "classes", "state_dict", "params", "versions", "extra")
DATA_KEYS = ("dataset", "classes")
REFIT = "re-run `dvc repro fit` to write it with this code"


def checkpoint_params(params: dict[str, Any]) -> dict[str, Any]:
    """The sections of params.yaml (or of a processed HDF5's `params`) that preprocessing depends on."""
    missing = [s for s in (*PREPROCESSING_SECTIONS, "data") if s not in params]
    if missing:
        raise ValueError(f"params lack section(s) {missing}")
    data = {k: params["data"][k] for k in DATA_KEYS}
    return {s: params[s] for s in PREPROCESSING_SECTIONS} | {"data": data}


def save_checkpoint(path: Path | str, net: MiHFTr, classes: list[str], params: dict[str, Any],
                    extra: dict[str, Any]) -> None:
    """Write `net` and what predicting with it needs, atomically and byte-stable for equal inputs."""
    if len(classes) != net.num_classes:
        raise ValueError(f"{len(classes)} class names for a model of {net.num_classes} classes")
    payload = {
        "format": FORMAT,
        "model_config": asdict(net.config),
        "num_classes": net.num_classes,
        "classes": list(classes),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
        # Through JSON: plain types only (a numpy scalar would be refused by weights_only loading),
        # and a type JSON cannot hold fails here, at save time.
        "params": json.loads(json.dumps(checkpoint_params(params))),
        "versions": package_versions(),
        "extra": json.loads(json.dumps(extra)),
    }
    save_torch(payload, path)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu") -> tuple[MiHFTr, dict[str, Any]]:
    """(model in eval mode on `device`, every other field of the file); a file this code cannot use
    raises PipelineError naming it and the fix."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"model file {path} does not exist: run `dvc repro fit` to train it, "
                            "or give the path of one")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # a file saved on CUDA loads anywhere
    except Exception as err:  # zip, pickle and EOF errors alike: the file is damaged or not a torch file
        raise PipelineError(f"{path} is not a readable model file ({_first_line(err)}): {REFIT}") from err
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise PipelineError(f"{path} is not a MiHF-Tr model file (no `format` field): {REFIT}")
    if ckpt["format"] != FORMAT:
        raise PipelineError(f"{path} is model file format {ckpt['format']!r} but this code reads format "
                            f"{FORMAT}: {REFIT}")
    missing = [k for k in KEYS if k not in ckpt]
    if missing or len(ckpt["classes"]) != ckpt["num_classes"]:
        raise PipelineError(f"{path} is incomplete (missing {missing or 'class names'}): {REFIT}")
    try:
        # The trained weights replace every initial one, so no ImageNet file is needed to load.
        config = ModelConfig.from_params(ckpt["model_config"] | {"pretrained": "none"})
        net = MiHFTr(config, ckpt["num_classes"])
        net.load_state_dict(ckpt["state_dict"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise PipelineError(f"{path} does not fit this code's MiHF-Tr ({_first_line(err)}): {REFIT}") from err
    info = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return net.to(device).eval(), info
