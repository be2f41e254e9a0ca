"""Do two code revisions give the same output bytes? For refactors that must not change a result.

    python -m benchmarks.same_outputs REV [REV_B] [--set train.fold_batch=0 ...] [--full]

Each revision (a git revision, or WORKTREE: the working tree as it is) is exported into a scratch
project with its own dvc.yaml and the params.yaml of this working tree, shrunk as the tests shrink it
(tests/conftest.py TINY_PARAMS; `--full`: not shrunk) and changed by `--set key=value`; `dvc repro`
runs there, and the md5 of every output the issue of a byte-identical refactor names (processed HDF5,
loso.json, predictions.csv, per_fold.csv, features.h5, baselines.json, the model) is printed side by
side. Exit status 1 when any differs. Outputs that say when or how fast (timing.json) are left out.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import TINY_PARAMS, merge, run  # noqa: E402

COMPARED = ("data/processed/synthetic.h5", "data/interim/frames.h5", "data/interim/flow.h5",
            "data/interim/landmarks.h5", "metrics/loso.json", "metrics/predictions.csv",
            "metrics/per_fold.csv", "data/features.h5", "metrics/baselines.json", "metrics/tsne.json",
            "metrics/preprocessing.json", "models/mihf_tr.json", "models/mihf_tr.pt")
CODE = ("dvc.yaml", "stages", "mer", "model", "magnification", ".dvcignore", "pyproject.toml")


def export(rev: str, dest: Path) -> None:
    """The code of `rev` (git) or of the working tree into dest."""
    if rev == "WORKTREE":
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", *CODE], cwd=ROOT,
                               check=True, capture_output=True, text=True).stdout.split()
        for name in files:
            if (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                (dest / name).write_bytes((ROOT / name).read_bytes())
        return
    archive = subprocess.run(["git", "archive", rev, *CODE], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")


def outputs(rev: str, params: dict, scratch: Path) -> dict[str, str]:
    """md5 of each compared output after `dvc repro` of `rev` with these params."""
    project = scratch / rev.replace("/", "_")
    project.mkdir()
    export(rev, project)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q", "--no-scm"]):
        run(cmd, project)
    print(f"{rev}: dvc repro in {project} ...", flush=True)
    run(["dvc", "repro"], project)
    return {name: hashlib.md5((project / name).read_bytes()).hexdigest() if (project / name).exists() else "-"
            for name in COMPARED}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.same_outputs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev_a", help="a git revision")
    ap.add_argument("rev_b", nargs="?", default="WORKTREE", help="a git revision or WORKTREE (default)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params change")
    ap.add_argument("--full", action="store_true", help="params.yaml as it is, not shrunk")
    args = ap.parse_args()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if not args.full:
        params = merge(params, TINY_PARAMS)
    for item in args.set:
        key, value = item.split("=", 1)
        update: dict = {}
        node = update
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
        params = merge(params, update)
    with tempfile.TemporaryDirectory(prefix="same_outputs_") as scratch:
        a, b = (outputs(rev, params, Path(scratch)) for rev in (args.rev_a, args.rev_b))
    differ = [name for name in COMPARED if a[name] != b[name]]
    for name in COMPARED:
        print(f"{'same   ' if a[name] == b[name] else 'DIFFERS'} {a[name]} {b[name]} {name}")
    print(f"{len(COMPARED) - len(differ)} of {len(COMPARED)} outputs byte-identical"
          + (f"; differ: {', '.join(differ)}" if differ else ""))
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
