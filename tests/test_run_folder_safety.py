"""A run folder as something handed around and shared: files that could run code, two commands at once, outputs
trained with other settings, and stages a kill left between their two renames. Through the real entry point."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO, TINY, alignkit, summary
from test_guarantees import loads, micro

from alignkit import guard


class Planted:
    """Unpickling this runs a command: what a malicious file in a run folder would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path) -> None:
    path.unlink(missing_ok=True)
    torch.save({"state": Planted(marker)}, path)


def _stop_at(monkeypatch, stage: str, step: int) -> None:
    """SIGTERM during `step` of `stage`, as from outside: the stage saves a checkpoint there and stops."""
    original = guard._Progress.on_log

    def on_log(self, args, state, control, **kwargs):
        if state.global_step == step and self.stage == stage:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(guard._Progress, "on_log", on_log)


# --- files that could run code -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_pretrain(tmp_path_factory):
    """A micro run stopped by SIGTERM in pretrain, with a Trainer checkpoint to resume from."""
    from alignkit.cli import main

    tmp = tmp_path_factory.mktemp("stopped")
    recipe = micro(tmp, max_steps=4, save_steps=100)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        _stop_at(mp, "pretrain", 2)
        assert main(["run", str(recipe)]) == 143
    return recipe


@pytest.mark.parametrize("name", ["rng_state.pth", "optimizer.pt", "scheduler.pt"])
def test_a_pickle_planted_in_a_trainer_checkpoint_is_refused_and_never_runs(stopped_pretrain, tmp_path, capsys, name):
    run = stopped_pretrain.parent / "run"
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    checkpoint = copy / "pretrain.partial" / "checkpoints" / "checkpoint-3"
    assert (checkpoint / name).is_file()
    marker = tmp_path / "ran"
    _plant(checkpoint / name, marker)
    code, out, err = alignkit(capsys, "run", stopped_pretrain, f"output_dir={copy}")
    assert code == 2 and "Traceback" not in err
    assert f"{checkpoint / name} holds a pickle that torch refuses to load safely" in err
    assert not marker.exists()
    assert not (copy / "pretrain").exists()  # nothing marked complete


@pytest.fixture(scope="module")
def stopped_ppo(run_dir, tmp_path_factory):
    """A copy of the tiny run whose ppo stage SIGTERM stopped after its second update (a checkpoint there)."""
    from alignkit.cli import main

    copy = tmp_path_factory.mktemp("stopped_ppo") / "run"
    shutil.copytree(run_dir, copy)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        _stop_at(mp, "ppo", 2)
        assert main(["run", str(TINY), f"output_dir={copy}", *FAST, "--only", "ppo", "--force"]) == 143
    return copy


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state_0.json", "ppo_state.json"])
def test_ppo_checkpoints_load_nothing_that_could_run_code(stopped_ppo, tmp_path, capsys, name):
    """RNG states and PPO's own state are JSON; optimizer and schedule are loaded with weights_only. A pickle planted
    in any of them runs nothing and ends in a message naming the file."""
    copy = tmp_path / "run"
    shutil.copytree(stopped_ppo, copy)
    checkpoint = next((copy / "ppo.partial" / "checkpoints").glob("checkpoint-*"))
    assert (checkpoint / name).is_file()
    marker = tmp_path / "ran"
    _plant(checkpoint / name, marker)
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={copy}", *FAST, "--only", "ppo")
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert str(checkpoint / name) in err
    assert not marker.exists()
    assert not (copy / "ppo.partial" / "alignkit_stage.json").read_text().count('"complete"')


def test_a_ppo_checkpoint_with_pickled_random_states_asks_for_a_fresh_start(stopped_ppo, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(stopped_ppo, copy)
    checkpoint = next((copy / "ppo.partial" / "checkpoints").glob("checkpoint-*"))
    os.replace(checkpoint / "rng_state_0.json", checkpoint / "rng_state_0.pth")  # as alignkit wrote it before
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={copy}", *FAST, "--only", "ppo")
    assert code == 2 and "Traceback" not in err
    assert "keeps its random states as a pickle (rng_state_0.pth" in err and "--force" in err


def test_the_stopped_ppo_stage_resumes_from_json_random_states(stopped_ppo, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(stopped_ppo, copy)
    states = json.loads(next((copy / "ppo.partial" / "checkpoints").glob("checkpoint-*/rng_state_0.json")).read_text())
    assert {"python", "numpy", "cpu"} <= set(states) and len(states["cpu"]) == torch.get_rng_state().numel()
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={copy}", *FAST, "--only", "ppo")
    assert code == 0, err
    assert "ppo: resuming from" in err and summary(out) == {"ppo": "trained"}


def test_a_pickled_model_file_is_refused_by_chat(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "model"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32)).save_pretrained(folder)
    shutil.copytree(REPO / "data" / "tiny" / "tokenizer", folder, dirs_exist_ok=True)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    _plant(folder / "pytorch_model.bin", marker)
    code, out, err = alignkit(capsys, "chat", folder, "--greedy")
    assert code == 2 and "Traceback" not in err
    assert f"{folder / 'pytorch_model.bin'} holds a pickle that torch refuses to load safely" in err
    assert not marker.exists()


# --- one writer per run folder -------------------------------------------------------------------------------------


def test_a_second_command_on_a_run_folder_in_use_is_refused_and_a_killed_holder_blocks_nothing(tmp_path, capsys):
    recipe, run = micro(tmp_path, max_steps=200), tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "alignkit", "run", str(recipe)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (run / "pretrain.partial").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second started"
        code, out, err = alignkit(capsys, "run", recipe)
        assert code == 2 and "Traceback" not in err
        assert f"{run} is in use by process {first.pid} (alignkit run {recipe}" in err
        assert (run / "pretrain.partial").exists()  # the first run's work untouched
        other = tmp_path / "eval.yaml"
        other.write_text(recipe.read_text() + f"eval:\n  dataset: {{path: {REPO / 'data/tiny/eval.jsonl'}}}\n")
        code, out, err = alignkit(capsys, "eval", other)
        assert code == 2 and f"is in use by process {first.pid}" in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    code, out, err = alignkit(
        capsys, "run", recipe, "stages.pretrain.trainer.max_steps=3", "stages.sft.trainer.max_steps=3"
    )
    assert code == 0, err  # the lock died with its holder
    loads(run, "pretrain", "sft")


def test_a_refused_command_leaves_no_folder_behind(tmp_path, capsys):
    """The folder is made when the lock is taken; a run refused after that (its data is bad) removes it again."""
    recipe = micro(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    code, out, err = alignkit(capsys, "run", recipe, f"stages.sft.dataset.path={bad}")
    assert code == 2 and f"{bad}:2" in err
    assert not (tmp_path / "run").exists()


# --- outputs trained with other settings ---------------------------------------------------------------------------


def test_only_refuses_an_upstream_trained_with_other_settings_unless_accepted(tmp_path, capsys):
    recipe, run = micro(tmp_path), tmp_path / "run"
    assert alignkit(capsys, "run", recipe)[0] == 0
    before = (run / "sft" / "model.safetensors").read_bytes()
    code, out, err = alignkit(capsys, "run", recipe, "--only", "sft", "stages.pretrain.trainer.learning_rate=5e-4")
    assert code == 2 and "Traceback" not in err
    assert "pretrain: " in err and "stages.pretrain.trainer.learning_rate 0.001 -> 0.0005" in err
    assert "--accept-upstream" in err and "--from pretrain" in err
    assert (run / "sft" / "model.safetensors").read_bytes() == before  # nothing trained

    code, out, err = alignkit(
        capsys, "run", recipe, "--only", "sft", "stages.pretrain.trainer.learning_rate=5e-4", "--accept-upstream"
    )
    assert code == 0, err
    assert "used as it is (--accept-upstream)" in err and summary(out) == {"sft": "reused"}
    # the same settings as the upstream's: reused without a word
    code, out, err = alignkit(capsys, "run", recipe, "--only", "sft", "--force")
    assert code == 0 and "other settings" not in err and summary(out) == {"sft": "trained"}


# --- stages a kill left between their two renames ------------------------------------------------------------------


def _half_moved(run: Path, stage: str) -> None:
    """What a kill leaves after the old output was moved aside and before the new one was moved in."""
    shutil.copytree(run / stage, run / f"{stage}.old")
    os.replace(run / stage, run / f"{stage}.partial")


def test_eval_finishes_a_move_a_kill_interrupted(run_copy, capsys):
    _half_moved(run_copy, "ppo")
    code, out, err = alignkit(capsys, "eval", TINY, f"output_dir={run_copy}", *FAST)
    assert code == 0, err
    assert "ppo" in json.loads((run_copy / "report.json").read_text())["eval"]
    assert (run_copy / "ppo" / "alignkit_stage.json").exists()
    assert not (run_copy / "ppo.partial").exists() and not (run_copy / "ppo.old").exists()


def test_chat_and_push_see_a_stage_a_kill_left_half_moved(run_copy, capsys, monkeypatch):
    from alignkit import chat

    _half_moved(run_copy, "ppo")
    assert chat.resolve(str(run_copy), None) == str(run_copy / "ppo")
    assert not (run_copy / "ppo.partial").exists()

    from huggingface_hub import HfApi

    _half_moved(run_copy, "sft")
    pushed = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: None)  # the Hub: out of reach here
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, repo_id, **kwargs: pushed.append(repo_id))
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    code, out, err = alignkit(capsys, "push", run_copy, "--repo-id", "bob/chat", "--stage", "sft")
    assert code == 0, err
    assert pushed == ["bob/chat"] and (run_copy / "sft" / "alignkit_stage.json").exists()
