"""Shared fixtures: everything offline, a tiny GPT-2 built from a config and the tokenizer in data/tiny/, and one
whole pipeline run through the real `alignkit` entry point that several tests inspect."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Set before transformers / datasets are imported anywhere: an accidental download fails loudly.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_DISABLED"] = "true"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Under pytest-xdist (pyproject.toml's `-n auto`: a worker a core), one thread a worker, for torch and for the runs a
# test launches: at torch's default (a thread per core) two jobs oversubscribe the cores (a miniature test beside
# another two-thread run took 642 s against 109 s alone).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

# Libraries that give their loggers a handler on the sys.stderr of the moment they are first imported: imported at
# collection, so that no handler keeps a test's captured stream, which is closed once that test ends.
import datasets  # noqa: E402, F401
import transformers  # noqa: E402, F401
import trl  # noqa: E402, F401

if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch  # noqa: E402

    torch.set_num_threads(1)  # in case a plugin imported torch before OMP_NUM_THREADS was set

REPO = Path(__file__).resolve().parents[1]


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker a core this process may run on (its CPU affinity, and a cgroup's CPU quota where one is
    set, which os.cpu_count() ignores), at most one a 3 GiB of memory (a worker peaked at 0.8 GiB on 2026-12-07, the
    runs and the browser it started no higher)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        cores = min(cores, max(1, memory // (3 << 30)))
    except (OSError, ValueError, AttributeError):
        pass
    return cores


TINY = REPO / "recipes" / "tiny.yaml"
# The tiny recipe, a little shorter where the tests only need the mechanics.
FAST = ["stages.ppo.trainer.total_episodes=48"]


def launched(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m alignkit ARGS` as a process of its own, from the repository (what --num-processes needs: torchrun
    starts its workers from a real command line); stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "alignkit", *map(str, args)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name their data relative to the repository


def alignkit(capsys, *argv):
    """Run the real CLI in-process; returns (exit status, stdout, stderr), lines wrapped at 100 columns joined."""
    from alignkit.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, unwrap(out), unwrap(err)


def rerun(capsys, run: Path, stage: str, *more):
    """`alignkit run` of the tiny recipe's STAGE alone on a finished run, trained again (--force), with `more`
    arguments: (exit status, stdout, stderr)."""
    return alignkit(capsys, "run", TINY, f"output_dir={run}", "--only", stage, "--force", *more)


def unwrap(text: str) -> str:
    """alignkit's output with each message on one line again, as tests match them (alignkit.log.wrap breaks a long
    one at a space and indents what follows by alignkit.log.INDENT)."""
    return text.replace("\n    ", " ")


def summary(stdout: str) -> dict:
    """The `stage status seconds folder` table that `alignkit run` prints."""
    rows = [line.split() for line in stdout.splitlines()]
    return {r[0]: r[1] for r in rows if len(r) == 4 and r[1] in ("trained", "reused")}


def run_recipe(recipe: Path, out: Path, *overrides) -> Path:
    """`alignkit run RECIPE output_dir=OUT ...` from the repository's root (for fixtures, which outlive
    monkeypatch)."""
    from alignkit.cli import main

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert main(["run", str(recipe), f"output_dir={out}", *overrides]) == 0
    finally:
        os.chdir(cwd)
    return out


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """One whole pretrain -> sft -> reward -> ppo run of recipes/tiny.yaml."""
    return run_recipe(TINY, tmp_path_factory.mktemp("tiny") / "run", *FAST)


@pytest.fixture
def run_copy(run_dir, tmp_path):
    """A private copy of the pipeline's output, for tests that rerun or break stages."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy
