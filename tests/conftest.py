"""Shared fixtures: the real params.yaml, shrunk, in a scratch copy of the project where the
real stages run through the real `dvc`."""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from mer.common import stage_command

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "params.yaml", "stages", "mer", "model", "magnification", ".dvcignore",
                 "pyproject.toml")

# Small enough for CI, big enough for every class in several subjects.
TINY_PARAMS = {
    "synthetic": {"subjects": 4, "samples": 24, "onset_to_apex": 3, "apex_to_offset": 2},
    "train": {"device": "cpu", "epochs": 2, "batch_size": 8, "lr_step": 1, "stem_batch": 8},
    "magnifier": {"steps": 2, "batch": 1, "patch": 32},  # magnification/dvc.yaml, when a test runs it
    "workers": 2,
}


@functools.cache
def stage_argv(name: str) -> tuple[str, ...]:
    """The arguments dvc.yaml gives stage `name` (its command after `python -m stages.<module>`), so
    a test calls a stage's main() with the very paths `dvc repro` passes."""
    return tuple(shlex.split(stage_command(REPO, name))[3:])


def labels_dir() -> Path:
    """Real label spreadsheets (not shipped with the project): MER_LABELS_DIR or ../shared."""
    return Path(os.environ.get("MER_LABELS_DIR", REPO.parent / "shared" / "fixtures" / "labels")).absolute()


def faceless_frame() -> np.ndarray:
    """A 640×480 RGB frame with no face that is not blank either (a grey ramp, left to right)."""
    ramp = np.linspace(40, 220, 640).astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(ramp[None, :, None], (480, 640, 3)))


def merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def make_project(dest: Path, params_update: dict) -> Path:
    """A git + DVC project holding this repo's pipeline code and shrunk params."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), params_update)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "test@example.com"], dest)
    run(["git", "config", "user.name", "test"], dest)
    run(["dvc", "init", "-q"], dest)
    run(["dvc", "config", "core.analytics", "false"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "project"], dest)
    return dest


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real pipeline run once by `dvc repro` on a tiny synthetic dataset."""
    project = make_project(tmp_path_factory.mktemp("project"), TINY_PARAMS)
    run(["dvc", "repro", "pack"], project)
    return project


@pytest.fixture(scope="session")
def processed_h5(tiny_project: Path) -> Path:
    path = tiny_project / "data" / "processed" / "synthetic.h5"
    with h5py.File(path) as f:
        assert len(f["label"]) > 0
    return path
