"""Sharing preprocessed data and results across a lab, with the real `git` and `dvc` in temp dirs.

Clone A is a copy of the preprocessed tiny project that pushes to a directory remote; the other
clones are `git clone`s of A, as a labmate's checkout would be. The workflow of docs/sharing.md
runs verbatim: its code blocks are parsed from the file and run by bash with `set -e`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml
from conftest import REPO, run

PREPROCESSING = {"synthesize", "frames", "magnify", "flow", "landmarks", "pack"}
AFTER_PACK = {"train", "fit", "baselines", "tsne", "preprocessing_report"}  # what `dvc repro pack` leaves
SHARING_DOC = REPO / "docs" / "sharing.md"


def workflow_blocks() -> tuple[str, str]:
    """The two bash blocks of docs/sharing.md's "Workflow": whoever preprocesses, then a labmate."""
    text = SHARING_DOC.read_text()
    section = text[text.index("## Workflow"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 2, blocks
    return blocks[0], blocks[1]


def run_block(block: str, cwd: Path, **subst: str) -> subprocess.CompletedProcess:
    """A docs block as a bash script with `set -e` (placeholders like <url> replaced): any failing
    command fails the test, as it would stop a user's script."""
    for name, value in subst.items():
        block = block.replace(f"<{name}>", value)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               GIT_AUTHOR_NAME="lab", GIT_AUTHOR_EMAIL="lab@example.com", GIT_COMMITTER_NAME="lab",
               GIT_COMMITTER_EMAIL="lab@example.com")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, f"{block}\nexit {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


class Lab(NamedTuple):
    a: Path       # the clone that preprocessed, trained and pushed
    remote: Path  # the directory remote every clone shares
    rev: str      # A's commit


def running_stages(dvc_output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", dvc_output))


def run_cached_stages(dvc_output: str) -> set[str]:
    return set(re.findall(r"Stage '([\w-]+)' is cached - skipping run", dvc_output))


def pulled_stages(dvc_output: str) -> set[str]:
    return set(re.findall(r"Pulling data for stage: '([\w-]+)'", dvc_output))


def h5_digests(project: Path) -> dict[str, str]:
    """The preprocessing outputs: data/interim/*.h5 and data/processed/*.h5."""
    return {str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((project / "data").glob("*/*.h5"))}


def data_files(project: Path) -> list[str]:
    """Every DVC-tracked workspace file under data/ (raw synthetic frames, interim and processed
    HDF5), not the files git carries (.gitignore files, train's data/features.h5)."""
    in_git = set(run(["git", "ls-files", "data"], project).stdout.split())
    files = (str(p.relative_to(project)) for p in (project / "data").rglob("*") if p.is_file())
    return sorted(f for f in files if f not in in_git)


def assert_clean(project: Path, *targets: str) -> None:
    """`dvc status` of the targets (default: the main pipeline; magnification/dvc.yaml is opt-in)."""
    status = run(["dvc", "status", *(targets or ("dvc.yaml",))], project).stdout
    assert "up to date" in status, status


def git_clone(source: Path, dest: Path) -> Path:
    run(["git", "clone", "-q", str(source), str(dest)], source.parent)
    run(["git", "config", "user.email", "labmate@example.com"], dest)
    run(["git", "config", "user.name", "labmate"], dest)
    return dest


def lock_stages(project: Path, rev: str | None = None) -> dict:
    text = (run(["git", "show", f"{rev}:dvc.lock"], project).stdout if rev
            else (project / "dvc.lock").read_text())
    return yaml.safe_load(text)["stages"]


@pytest.fixture(scope="module")
def lab(tiny_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Lab:
    """A: preprocessed (by the tiny_project fixture), trained with tiny params, committed, pushed."""
    root = tmp_path_factory.mktemp("lab")
    a, remote = root / "A", root / "remote"
    shutil.copytree(tiny_project, a, symlinks=True)
    (a / ".gitignore").write_text("__pycache__/\n")
    assert_clean(a, "pack")  # `dvc repro` already stored the preprocessing outputs in A's cache
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], a)
    trained = run(["dvc", "repro"], a)
    assert running_stages(trained.stdout) == AFTER_PACK, trained.stdout
    run(["git", "add", "-A"], a)
    run(["git", "commit", "-qm", "preprocessed + tiny training"], a)
    run(["dvc", "push"], a)
    assert_clean(a)
    return Lab(a, remote, run(["git", "rev-parse", "HEAD"], a).stdout.strip())


def test_labmate_sequence_after_a_full_push_runs_nothing_and_gives_a_s_bytes(lab: Lab,
                                                                              tmp_path: Path) -> None:
    _, labmate = workflow_blocks()
    result = run_block(labmate, tmp_path, url=str(lab.a))
    b = tmp_path / "mer"
    assert running_stages(result.stdout) == set(), result.stdout
    assert pulled_stages(result.stdout) >= PREPROCESSING | {"fit"}, result.stdout
    assert len(h5_digests(lab.a)) == 5 and h5_digests(b) == h5_digests(lab.a)
    assert data_files(b) == data_files(lab.a)
    assert (b / "models/mihf_tr.pt").read_bytes() == (lab.a / "models/mihf_tr.pt").read_bytes()
    assert_clean(b)


def test_docs_sequence_after_only_preprocessing_was_pushed(lab: Lab, tmp_path: Path) -> None:
    """The committed dvc.lock names outputs of a full run (train's, fit's model) that nobody pushed;
    someone changes a preprocessing param and runs the preprocessing block, a labmate the labmate block."""
    preprocessor, labmate = workflow_blocks()
    ref = git_clone(lab.a, tmp_path / "ref")  # the repository as published: a full run's dvc.lock
    run(["dvc", "remote", "modify", "shared", "url", str(tmp_path / "remote")], ref)
    run(["git", "commit", "-qam", "a remote of our own"], ref)
    origin = tmp_path / "origin.git"
    run(["git", "clone", "-q", "--bare", str(ref), str(origin)], tmp_path)
    p = git_clone(origin, tmp_path / "P")
    params = yaml.safe_load((p / "params.yaml").read_text())
    params["flow"]["lambda"] = 0.3  # changes the flow whatever magnify.method is
    (p / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = run_block(preprocessor, p)
    assert running_stages(ran.stdout) == PREPROCESSING, ran.stdout  # a fresh clone: nothing cached yet
    assert "fit" in lock_stages(p) and not (p / "models/mihf_tr.pt").exists()  # named, never made here

    plain = git_clone(origin, tmp_path / "plain")
    pulled = run(["dvc", "pull"], plain, check=False)  # what the docs say not to rely on
    assert pulled.returncode == 1 and "models/mihf_tr.pt" in pulled.stderr, pulled.stderr

    result = run_block(labmate, tmp_path, url=str(origin))
    b = tmp_path / "mer"
    assert not running_stages(result.stdout) & PREPROCESSING, result.stdout  # pulled, not rerun
    assert running_stages(result.stdout) == AFTER_PACK, result.stdout
    assert h5_digests(b) == h5_digests(p) and len(h5_digests(b)) == 5
    assert_clean(b)


@pytest.mark.parametrize("keep_lock", [False, True], ids=["run-cache", "dvc.lock"])
def test_repro_pull_restores_preprocessing_instead_of_running_it(lab: Lab, tmp_path: Path,
                                                                 keep_lock: bool) -> None:
    run(["dvc", "push", "--run-cache"], lab.a)
    assert any((lab.remote / "runs").rglob("*")), "run-cache entries reached the remote"
    b = git_clone(lab.a, tmp_path / "B")
    if not keep_lock:  # then nothing can be pulled by hash: only the run-cache can skip the stages
        (b / "dvc.lock").unlink()
    result = run(["dvc", "repro", "--pull", "pack"], b)
    assert running_stages(result.stdout) == set(), result.stdout
    restored = pulled_stages(result.stdout) if keep_lock else run_cached_stages(result.stdout)
    assert restored == PREPROCESSING, result.stdout
    assert h5_digests(b) == h5_digests(lab.a)
    expected = lock_stages(lab.a)
    if not keep_lock:
        # `dvc repro pack` relocks preprocessing only
        for stage in AFTER_PACK:
            del expected[stage]
    assert lock_stages(b) == expected
    assert_clean(b, "pack")


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_clones_sharing_one_cache_hold_one_copy(lab: Lab, tmp_path: Path, link: str) -> None:
    shared = tmp_path / "dvc-cache"
    clones = [git_clone(lab.a, tmp_path / name) for name in ("B", "C")]
    for clone in clones:
        run(["dvc", "cache", "dir", "--local", str(shared)], clone)
        run(["dvc", "config", "--local", "cache.shared", "group"], clone)
        run(["dvc", "config", "--local", "cache.type", link], clone)
        run(["dvc", "pull"], clone)  # the second clone finds everything in the shared cache
        assert not (clone / ".dvc" / "cache").exists()
        assert_clean(clone)
    b, c = clones
    files = data_files(b)
    assert files == data_files(lab.a) and len(files) > 5
    cache_inodes = {p.stat().st_ino for p in shared.rglob("*") if p.is_file()}
    for rel in files:
        in_b, in_c = os.stat(b / rel), os.stat(c / rel)
        assert in_b.st_ino == in_c.st_ino and in_b.st_ino in cache_inodes, rel
        assert stat.S_IMODE(in_b.st_mode) & 0o222 == 0, f"{rel}: cache files are read-only"
        assert (b / rel).is_symlink() == (link == "symlink")
    cache_dirs = [p for p in (shared / "files" / "md5").iterdir() if p.is_dir()]
    assert cache_dirs and all(stat.S_IMODE(p.stat().st_mode) & 0o2070 == 0o2070 for p in cache_dirs)

    # `dvc unprotect` turns B's link into a private writable copy; C keeps the cached file
    target = "data/processed/synthetic.h5"
    run(["dvc", "unprotect", target], b)
    assert not (b / target).is_symlink() and os.stat(b / target).st_ino != os.stat(c / target).st_ino
    assert stat.S_IMODE(os.stat(b / target).st_mode) & 0o200
    assert (b / target).read_bytes() == (c / target).read_bytes()
    assert_clean(b)
    assert_clean(c)


class ParamChange(NamedTuple):
    b: Path
    rev: str
    exp_output: str
    exp_name: str


@pytest.fixture(scope="module")
def lr_change(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> ParamChange:
    """B pulls A's preprocessing, runs an experiment with a 1000x learning rate (2 epochs on 15 samples: a
    10x or 100x one can leave every fold's argmax, hence the scores, as they were), commits it."""
    b = git_clone(lab.a, tmp_path_factory.mktemp("lr") / "B")
    run(["dvc", "pull"], b)
    exp = run(["dvc", "exp", "run", "-S", "train.lr=0.5"], b)
    names = run(["dvc", "exp", "list", "--name-only"], b).stdout.split()
    assert len(names) == 1, names
    run(["git", "add", "-A"], b)
    run(["git", "commit", "-qm", "train.lr=0.5"], b)
    return ParamChange(b, run(["git", "rev-parse", "HEAD"], b).stdout.strip(), exp.stdout, names[0])


def test_training_param_reruns_only_train_on_a_s_preprocessing(lab: Lab, lr_change: ParamChange) -> None:
    b = lr_change.b
    assert running_stages(lr_change.exp_output) == {"train", "fit", "tsne"}, lr_change.exp_output
    assert h5_digests(b) == h5_digests(lab.a)
    a_lock, b_lock = lock_stages(lab.a, lab.rev), lock_stages(b)
    assert {k: b_lock[k] for k in PREPROCESSING} == {k: a_lock[k] for k in PREPROCESSING}
    assert b_lock["train"] != a_lock["train"]
    assert yaml.safe_load((b / "params.yaml").read_text())["train"]["lr"] == 0.5
    assert_clean(b)


def test_params_and_metrics_diff_between_a_and_b(lab: Lab, lr_change: ParamChange) -> None:
    b = lr_change.b
    params = json.loads(run(["dvc", "params", "diff", "--json", lab.rev, lr_change.rev], b).stdout)
    assert set(params["params.yaml"]) == {"train.lr"}
    lr = params["params.yaml"]["train.lr"]
    committed = yaml.safe_load(run(["git", "show", f"{lab.rev}:params.yaml"], b).stdout)["train"]["lr"]
    assert (lr["old"], lr["new"]) == (committed, 0.5)

    diff = json.loads(run(["dvc", "metrics", "diff", "--all", "--json", lab.rev, lr_change.rev], b).stdout)
    old = flatten(json.loads(run(["git", "show", f"{lab.rev}:metrics/loso.json"], b).stdout))
    new = flatten(json.loads((b / "metrics" / "loso.json").read_text()))
    loso = diff["metrics/loso.json"]
    assert set(loso) == set(old) and {"uf1", "uar", "per_class.negative.f1"} <= set(loso)
    assert {k: (v["old"], v["new"]) for k, v in loso.items()} == {k: (old[k], new[k]) for k in old}
    assert old != new, "a 1000x learning rate changes the LOSO scores"
    changed = json.loads(run(["dvc", "metrics", "diff", "--json", lab.rev, lr_change.rev], b).stdout)
    assert {k for k in loso if old[k] != new[k]} == set(changed["metrics/loso.json"])


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_experiment_is_shared_through_the_git_and_dvc_remotes(lab: Lab, lr_change: ParamChange,
                                                              tmp_path: Path) -> None:
    run(["dvc", "exp", "push", "origin", lr_change.exp_name], lr_change.b)
    assert lr_change.exp_name in run(["dvc", "exp", "list", "--name-only"], lab.a).stdout
    shown = csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--csv"], lab.a).stdout))
    assert {row["Experiment"]: row["train.lr"] for row in shown}[lr_change.exp_name] == "0.5"
    c = git_clone(lab.a, tmp_path / "C")
    assert lr_change.exp_name not in run(["dvc", "exp", "list", "--name-only"], c).stdout
    run(["dvc", "exp", "pull", "origin", lr_change.exp_name], c)
    run(["dvc", "exp", "apply", lr_change.exp_name], c)
    assert yaml.safe_load((c / "params.yaml").read_text())["train"]["lr"] == 0.5
    assert (c / "metrics/loso.json").read_text() == (lr_change.b / "metrics/loso.json").read_text()


@pytest.mark.parametrize("dataset, root", [("casme2", "/licensed/CASME2/Cropped"),
                                           ("samm", "data/raw/SAMM")])
def test_licensed_frames_are_a_dependency_never_an_output(tmp_path: Path, dataset: str, root: str) -> None:
    """Real CASME II / SAMM frames enter the pipeline only as a `deps` entry of `frames`: no stage
    outputs them, so `dvc push` has nothing of theirs to upload."""
    from dvc.repo import Repo

    project = tmp_path / "project"
    project.mkdir()
    shutil.copy2(REPO / "dvc.yaml", project / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(dataset=dataset, root=root)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "init", "-q", "--no-scm"], project)
    with Repo(str(project)) as repo:
        stages = {s.name: s for s in repo.index.stages}
        deps = {s: {str(d.def_path) for d in stage.deps} for s, stage in stages.items()}
        outs = {str(o.def_path) for stage in stages.values() for o in stage.outs}
    assert root in deps["frames"]
    raw = Path(os.path.normpath(project / root))
    for out in outs:
        path = Path(os.path.normpath(project / out))
        assert not (path == raw or raw in path.parents or path in raw.parents), out
    assert f"data/processed/{dataset}.h5" in outs and "data/raw/synthetic" in outs
