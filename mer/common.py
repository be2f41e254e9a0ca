"""Helpers every stage shares: params, the paths dvc.yaml passes, one-line errors, atomic files (HDF5,
figures), a process pool."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml
from tqdm import tqdm

PARAMS_FILE = Path("params.yaml")
# Per format, the metadata keys whose default (software version, date) would change a figure's bytes.
STABLE_FIGURE_METADATA = {"png": {"Software": None}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}
PACKAGES = ("numpy", "opencv-contrib-python-headless", "dlib-bin", "h5py", "scikit-image", "torch")


class PipelineError(Exception):
    """Bad input the user can fix; printed as one line naming the sample and the fix."""


def load_params(path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def stage_paths(stage: str, names: Sequence[str], argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The files a stage reads and writes, each a required `--<name> PATH` option: dvc.yaml passes
    them (the one place a path is written), so the stage's command and its deps/outs cannot disagree."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{stage}", description=f"DVC stage {stage}")
    for name in names:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, required=True)
    return parser.parse_args(argv)


def stage_command(project: Path | str, stage: str) -> str:
    """The command dvc.yaml gives `stage` in `project`, templates resolved (for benchmarks and tests
    that run a stage as `dvc repro` would)."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return next(s.cmd for s in repo.index.stages if s.name == stage)


def run_main(main: Callable[[], None]) -> None:
    """Run a stage's main(); a PipelineError becomes one `error:` line and exit status 2."""
    try:
        main()
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def worker_count(requested: int) -> int:
    """`workers: 0` means every CPU core."""
    return requested if requested > 0 else (os.cpu_count() or 1)


@contextlib.contextmanager
def thread_count(get_threads: Callable[[], int], set_threads: Callable[[int], None],
                 count: int) -> Iterator[None]:
    """A library's thread pool (torch.get/set_num_threads, cv2.get/setNumThreads) at `count` threads
    inside the block, restored after it."""
    threads = get_threads()
    set_threads(count)
    try:
        yield
    finally:
        set_threads(threads)


def single_threaded(get_threads: Callable[[], int],
                    set_threads: Callable[[int], None]) -> contextlib.AbstractContextManager[None]:
    """`thread_count` at one thread."""
    return thread_count(get_threads, set_threads, 1)


def single_threaded_opencv() -> contextlib.AbstractContextManager[None]:
    """OpenCV on one thread inside the block. Around a fork this is also a fix: OpenCV's thread
    pool does not survive fork, and a child touching a pool copied mid-wait can block forever."""
    import cv2

    return single_threaded(cv2.getNumThreads, cv2.setNumThreads)


# What this process has run that a forked child cannot use again (dlib's CNN detector: the threads of
# its pool do not survive a fork, and a child that runs it waits for them forever). While it is not
# empty, parallel_map starts fresh worker processes instead of forking.
FORK_UNSAFE: set[str] = set()


def _fresh_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # what a forked worker inherits from single_threaded_opencv


def parallel_map(
    fn: Callable[[Any], Any], items: Sequence[Any], workers: int, desc: str
) -> list[Any]:
    """fn over items in order, on a process pool of `workers` (1 = in this process), with a bar."""
    workers = min(worker_count(workers), max(len(items), 1))
    bar = dict(total=len(items), desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True)
    # One thread per process either way: one process per core needs no more, and results then
    # cannot depend on the number of workers.
    with single_threaded_opencv():
        if workers == 1:
            return [fn(item) for item in tqdm(items, **bar)]
        # fork: workers inherit loaded models and imports, so start-up costs nothing per sample.
        # "spawn" where this process ran something fork-unsafe: slower to start, never stuck.
        context = get_context("spawn" if FORK_UNSAFE else "fork")
        with context.Pool(workers, initializer=_fresh_worker if FORK_UNSAFE else None) as pool:
            return list(tqdm(pool.imap(fn, items, chunksize=1), **bar))


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temp path beside `final`; rename it into place only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_torch(obj: Any, path: Path | str) -> None:
    """torch.save, atomic and byte-stable: serialised in memory first (torch.save names the zip's
    records after the file it writes, and the temp file's name holds a pid), then written in one go."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def save_figure(fig: Any, path: Path | str, dpi: int = 100) -> None:
    """Write a matplotlib figure atomically in the format of the path's suffix (png, pdf, svg), without
    the metadata that changes bytes from run to run, then close it if pyplot made it."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, metadata=STABLE_FIGURE_METADATA.get(fmt))
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close(fig)


def new_figure(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Any, Any]:
    """(figure, axes) as `plt.subplots` gives them, on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, **kwargs)


def round_uint8(image: np.ndarray) -> np.ndarray:
    """Grey levels (float) rounded to uint8 images: the crops stay float until stored for the model or
    given to dlib."""
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _attr_value(value: Any) -> Any:
    # HDF5 attributes hold scalars/arrays; nested params go in as JSON text.
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return value


def write_h5(path: Path | str, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """Write arrays + attrs atomically and deterministically (no timestamps: same input, same bytes)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w", track_order=True) as f:
        for name, array in arrays.items():
            array = np.asarray(array)
            if array.dtype.kind in "UO":
                text = array.astype(object)
                f.create_dataset(name, data=text, dtype=h5py.string_dtype(), track_times=False)
            else:
                f.create_dataset(name, data=array, track_times=False)
        for key, value in sorted(attrs.items()):
            f.attrs[key] = _attr_value(value)


def read_h5(
    path: Path | str, names: Iterable[str] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read arrays (strings decoded to str) and root attributes of a file written by write_h5."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path} is missing: run the stage that writes it (`dvc repro`)")
    with h5py.File(path, "r") as f:
        arrays = {}
        for name in names if names is not None else f.keys():
            data = f[name]
            arrays[name] = data.asstr()[()] if h5py.check_string_dtype(data.dtype) else data[()]
        return arrays, dict(f.attrs)


def class_names(attrs: dict[str, Any]) -> list[str]:
    """The `classes` attribute of a file written by write_h5 (JSON text there), as a list of names."""
    classes = attrs["classes"]
    return json.loads(classes) if isinstance(classes, str) else list(classes)


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for package in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions
