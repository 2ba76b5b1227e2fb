"""What a kill, a signal and a NaN each do to a run, through the real entry point on a very small pipeline.

Kills are simulated deterministically: the file operation at the chosen moment (os.replace, shutil.rmtree, a
manifest write) is hooked to raise `Killed`, a BaseException nothing in alignkit catches, so the run stops there
exactly as a SIGKILL would leave the disk. Then the same command runs again and must finish with outputs that load.
"""

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO, TINY, alignkit, summary
from transformers import AutoModelForCausalLM


class Killed(BaseException):
    """Stands for SIGKILL at the hooked moment."""


def micro(tmp_path: Path, **trainer) -> Path:
    """pretrain -> sft on a 1-layer GPT-2 in a few steps, checkpoints every step."""
    settings = {
        "max_steps": 3,
        "save_steps": 1,
        "per_device_train_batch_size": 4,
        "learning_rate": 1.0e-3,
        "gradient_checkpointing": False,
        "bf16": False,
        "logging_steps": 1,
        **trainer,
    }
    recipe = tmp_path / "micro.yaml"
    recipe.write_text(f"""\
output_dir: {tmp_path / "run"}
model:
  config: {{model_type: gpt2, n_layer: 1, n_head: 2, n_embd: 32, n_positions: 64}}
  tokenizer: {REPO / "data/tiny/tokenizer"}
stages:
  pretrain:
    dataset: {{path: {REPO / "data/tiny/pretrain.jsonl"}}}
    trainer: {json.dumps(settings)}
  sft:
    dataset: {{path: {REPO / "data/tiny/sft.jsonl"}}}
    trainer: {json.dumps(settings)}
""")
    return recipe


def loads(run: Path, *stages: str) -> None:
    """Every named stage is complete, in place, and its model loads and computes finite logits."""
    for stage in stages:
        manifest = json.loads((run / stage / "alignkit_stage.json").read_text())
        assert manifest["status"] == "complete"
        model = AutoModelForCausalLM.from_pretrained(run / stage)
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    assert not [p.name for p in run.iterdir() if p.name.endswith((".partial", ".old"))]


def hook(monkeypatch, module, name: str, when):
    """Replace module.name by a call that runs `when(original, *args)`; it may raise Killed."""
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args, **kwargs: when(original, *args, **kwargs))


# --- kills ---------------------------------------------------------------------------------------------------------


def test_a_kill_while_old_checkpoints_are_deleted_leaves_a_complete_stage(tmp_path, capsys, monkeypatch):
    """Checkpoints are deleted after the stage is marked complete and in place; a kill halfway through that deletion
    (one checkpoint's weights gone, its trainer_state.json still there) leaves a stage the next run reuses."""
    recipe, run = micro(tmp_path), tmp_path / "run"

    def rmtree(original, path, *args, **kwargs):
        path = Path(path)
        if path.name == "checkpoints" and path.parent == run / "pretrain":
            (path / "checkpoint-3" / "model.safetensors").unlink()
            raise Killed
        return original(path, *args, **kwargs)

    hook(monkeypatch, shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        alignkit(capsys, "run", recipe)
    monkeypatch.undo()
    assert (run / "pretrain" / "checkpoints" / "checkpoint-3" / "trainer_state.json").exists()
    code, out, err = alignkit(capsys, "run", recipe)
    assert code == 0, err
    assert summary(out) == {"pretrain": "reused", "sft": "trained"}
    assert not (run / "pretrain" / "checkpoints").exists()
    loads(run, "pretrain", "sft")


@pytest.mark.parametrize("moment", ["marked complete", "old output moved aside", "new output moved in"])
def test_a_kill_while_a_rerun_stage_is_put_in_place_keeps_a_whole_output(tmp_path, capsys, monkeypatch, moment):
    """A stage that reruns replaces its old output; a kill at any point of that leaves the old output or the new one,
    whole, and the next run finishes the move."""
    recipe, run = micro(tmp_path), tmp_path / "run"
    assert alignkit(capsys, "run", recipe, "--only", "pretrain")[0] == 0
    old_weights = (run / "pretrain" / "model.safetensors").read_bytes()

    def replace(original, src, dst, *args, **kwargs):
        src, dst = Path(src), Path(dst)
        done = original(src, dst, *args, **kwargs)
        if (
            moment == "marked complete"
            and dst == run / "pretrain.partial" / "alignkit_stage.json"
            and json.loads(dst.read_text())["status"] == "complete"
        ):
            raise Killed
        if moment == "old output moved aside" and (src, dst) == (run / "pretrain", run / "pretrain.old"):
            raise Killed
        if moment == "new output moved in" and (src, dst) == (run / "pretrain.partial", run / "pretrain"):
            raise Killed
        return done

    hook(monkeypatch, os, "replace", replace)
    with pytest.raises(Killed):
        alignkit(capsys, "run", recipe, "--only", "pretrain", "stages.pretrain.trainer.learning_rate=2e-3")
    monkeypatch.undo()
    if moment != "new output moved in":  # the new output is complete, waiting in pretrain.partial
        assert json.loads((run / "pretrain.partial" / "alignkit_stage.json").read_text())["status"] == "complete"
    code, out, err = alignkit(
        capsys, "run", recipe, "--only", "pretrain", "stages.pretrain.trainer.learning_rate=2e-3"
    )
    assert code == 0, err
    assert summary(out) == {"pretrain": "reused"}  # the run that was killed had finished training
    assert (run / "pretrain" / "model.safetensors").read_bytes() != old_weights
    loads(run, "pretrain")


def test_a_reused_stage_whose_files_are_gone_is_trained_again(tmp_path, capsys):
    recipe, run = micro(tmp_path), tmp_path / "run"
    assert alignkit(capsys, "run", recipe)[0] == 0
    (run / "pretrain" / "model.safetensors").unlink()
    code, out, err = alignkit(capsys, "run", recipe)
    assert code == 0, err
    assert "pretrain: training (its output is damaged: model.safetensors missing or cut)" in err
    # the same inputs train the same pretrain stage again, so sft (whose fingerprint covers them) stays up to date
    assert summary(out) == {"pretrain": "trained", "sft": "reused"}
    loads(run, "pretrain", "sft")


def test_a_checkpoint_cut_off_while_being_deleted_is_not_resumed_from(tmp_path, capsys, monkeypatch):
    """The Trainer deletes old checkpoints as it goes (save_total_limit); a kill then can leave the newest complete
    checkpoint beside one with trainer_state.json but no weights. Resume takes a complete one."""
    recipe, run = micro(tmp_path, max_steps=4, save_total_limit=1), tmp_path / "run"
    checkpoints = run / "pretrain.partial" / "checkpoints"

    def rmtree(original, path, *args, **kwargs):
        path = Path(path)
        if path.parent == checkpoints and path.name == "checkpoint-2":
            (path / "model.safetensors").unlink()
            (path / "optimizer.pt").unlink()
            raise Killed
        return original(path, *args, **kwargs)

    hook(monkeypatch, shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        alignkit(capsys, "run", recipe, "--only", "pretrain")
    monkeypatch.undo()
    # make the cut one the newest, as a kill during a rename-based rotation could
    os.replace(checkpoints / "checkpoint-2", checkpoints / "checkpoint-9")
    code, out, err = alignkit(capsys, "run", recipe, "--only", "pretrain")
    assert code == 0, err
    assert f"ignoring {checkpoints / 'checkpoint-9'}: the run was stopped while it was being written" in err
    assert f"pretrain: resuming from {checkpoints / 'checkpoint-3'}" in err
    loads(run, "pretrain")


def test_checkpoints_without_weights_or_state_are_cut_off(tmp_path):
    from alignkit.pipeline import last_checkpoint

    def checkpoint(step, *names):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in names:
            (folder / name).write_text("{}")

    checkpoint(10, "trainer_state.json", "model.safetensors", "optimizer.pt")
    checkpoint(20, "trainer_state.json", "optimizer.pt")  # weights deleted
    checkpoint(30, "trainer_state.json", "model.safetensors")  # optimizer state deleted
    checkpoint(40, "model.safetensors", "optimizer.pt")  # state not yet written
    resume, broken = last_checkpoint(tmp_path)
    assert resume == str(tmp_path / "checkpoint-10")
    assert [p.name for p in broken] == ["checkpoint-40", "checkpoint-30", "checkpoint-20"]


def test_files_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from alignkit import files

    report = tmp_path / "report.md"
    files.write_text(report, "old report\n")

    def replace(original, src, dst, *args, **kwargs):
        raise Killed

    hook(monkeypatch, os, "replace", replace)
    with pytest.raises(Killed):
        files.write_text(report, "new report\n")
    monkeypatch.undo()
    assert report.read_text() == "old report\n"  # never empty, never half-written


# --- signals -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_at_the_step_boundary_and_the_rerun_resumes(
    tmp_path, capsys, monkeypatch, signum, status
):
    from alignkit import guard

    recipe, run = micro(tmp_path, max_steps=6, save_steps=100), tmp_path / "run"  # no regular checkpoint before 100
    original = guard._Progress.on_log

    def on_log(self, args, state, control, **kwargs):  # the signal arrives during step 2, as from outside
        if state.global_step == 2 and self.stage == "pretrain":
            os.kill(os.getpid(), signum)
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(guard._Progress, "on_log", on_log)
    code, out, err = alignkit(capsys, "run", recipe)
    monkeypatch.undo()
    checkpoint = run / "pretrain.partial" / "checkpoints" / "checkpoint-3"
    assert code == status
    assert f"{signal.Signals(signum).name} received: stopping at the end of this step" in err
    assert f"stopped by {signal.Signals(signum).name} in pretrain at step 3 of 6; saved {checkpoint}" in err
    assert f"alignkit run {recipe}" in err  # the command that resumes
    assert "Traceback" not in err
    assert (checkpoint / "trainer_state.json").exists() and (checkpoint / "model.safetensors").exists()
    assert not (run / "pretrain").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored after the run

    code, out, err = alignkit(capsys, "run", recipe)
    assert code == 0, err
    assert f"pretrain: resuming from {checkpoint}" in err
    history = json.loads((run / "pretrain" / "metrics.json").read_text())["log_history"]
    assert history[-1]["step"] == 6
    loads(run, "pretrain", "sft")


def stopped_in_pretrain(tmp_path: Path, capsys, monkeypatch) -> tuple[Path, Path]:
    """The micro recipe of 6 steps run until a SIGTERM during pretrain's step 2 stops it (exit 143), its checkpoints
    kept in pretrain.partial: (recipe, run folder)."""
    from alignkit import guard

    recipe, run = micro(tmp_path, max_steps=6), tmp_path / "run"
    original = guard._Progress.on_log

    def on_log(self, args, state, control, **kwargs):
        if state.global_step == 2 and self.stage == "pretrain":
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(guard._Progress, "on_log", on_log)
    code, out, err = alignkit(capsys, "run", recipe)
    monkeypatch.undo()
    assert code == 143, err
    return recipe, run


def test_a_stage_stopped_under_other_processes_is_not_resumed_under_these(tmp_path, capsys, monkeypatch):
    recipe, run = stopped_in_pretrain(tmp_path, capsys, monkeypatch)
    manifest = run / "pretrain.partial" / "alignkit_stage.json"
    running = json.loads(manifest.read_text())
    assert running["processes"] == 1
    manifest.write_text(json.dumps({**running, "processes": 2}))  # as `--num-processes 2` would have left it
    kept = sorted(p.name for p in (run / "pretrain.partial" / "checkpoints").iterdir())
    code, out, err = alignkit(capsys, "run", recipe)
    assert code == 2 and "Traceback" not in err
    assert f"pretrain: {run / 'pretrain.partial'} was stopped while training in 2 processes, and this run has 1" in err
    assert "--num-processes 2, or train it from the start with --force" in err
    assert sorted(p.name for p in (run / "pretrain.partial" / "checkpoints").iterdir()) == kept  # nothing lost
    manifest.write_text(json.dumps(running))
    code, out, err = alignkit(capsys, "run", recipe)
    assert code == 0 and "pretrain: resuming from" in err, err


def test_keys_that_change_no_weights_neither_retrain_nor_lose_an_interrupted_stage(tmp_path, capsys, monkeypatch):
    # logging and checkpoint cadence are in the fingerprint as written (old outputs keep theirs), but an output
    # trained, or begun, with other values of them is the same training: before, each change retrained the stage and
    # everything after it, and dropped an interrupted stage's checkpoints
    recipe, run = stopped_in_pretrain(tmp_path, capsys, monkeypatch)
    code, out, err = alignkit(capsys, "run", recipe, "stages.pretrain.trainer.logging_steps=2")
    assert code == 0, err
    assert f"pretrain: resuming from {run / 'pretrain.partial' / 'checkpoints' / 'checkpoint-'}" in err
    assert summary(out) == {"pretrain": "trained", "sft": "trained"}
    trained = {s: json.loads((run / s / "alignkit_stage.json").read_text()) for s in ("pretrain", "sft")}

    quiet = [
        "stages.pretrain.trainer.logging_steps=3",
        "stages.sft.trainer.save_steps=50",
        "stages.sft.trainer.report_to=[]",
    ]
    respelled = [f"model.tokenizer={REPO / 'data' / 'tiny' / '..' / 'tiny' / 'tokenizer'}"]  # the same folder
    for settings in (quiet, [], respelled, ["stages.pretrain.trainer.save_total_limit=1"]):
        code, out, err = alignkit(capsys, "run", recipe, *settings)
        assert code == 0 and summary(out) == {"pretrain": "reused", "sft": "reused"}, err
    said = " ".join(err.split())  # the log folds long lines
    assert (  # pretrain was resumed, and so trained, with logging_steps 2
        "(only stages.pretrain.trainer.logging_steps 2 -> 1; stages.pretrain.trainer.save_total_limit (unset) -> 1 "
        "differ, which change no weights; --force reruns it)" in said
    )
    code, out, err = alignkit(
        capsys, "run", recipe, "stages.pretrain.trainer.logging_steps=3", "--only", "sft", "--force"
    )
    assert code == 0 and summary(out) == {"sft": "trained"}, err  # pretrain, unselected, is not refused as changed
    assert {s: json.loads((run / s / "alignkit_stage.json").read_text())["fingerprint"] for s in trained} == {
        "pretrain": trained["pretrain"]["fingerprint"],  # as it was trained: the record downstream stages compare
        "sft": trained["sft"]["fingerprint"],
    }
    # forced with the values it began with (not those it was resumed with): a new identity all the same, and what
    # was built on it trains again (before, it took back the identity it had, and sft was reused on a new pretrain)
    code, out, err = alignkit(capsys, "run", recipe, "--only", "pretrain", "--force")
    assert code == 0 and summary(out) == {"pretrain": "trained"}, err
    code, out, err = alignkit(capsys, "run", recipe)
    assert code == 0 and summary(out) == {"pretrain": "reused", "sft": "trained"}, err
    code, out, err = alignkit(capsys, "run", recipe, "stages.pretrain.trainer.learning_rate=2e-3")
    assert code == 0 and summary(out) == {"pretrain": "trained", "sft": "trained"}, err  # a key that does change them


# --- non-finite values ---------------------------------------------------------------------------------------------


def test_the_gradient_check_finds_nan_and_infinity_and_lets_huge_finite_gradients_pass(tmp_path):
    """The guard looks at each gradient's 2-norm first (fast) and at the values only where that norm is not finite:
    an overflowing norm of finite values is not a divergence."""
    from types import SimpleNamespace

    from alignkit.errors import NonFinite
    from alignkit.guard import _FiniteGuard
    from alignkit.stages import REGISTRY

    guard = _FiniteGuard(REGISTRY["pretrain"])
    args = SimpleNamespace(output_dir=str(tmp_path), learning_rate=1e-3, max_grad_norm=1.0)
    state = SimpleNamespace(global_step=4)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[1].weight.grad[0, 0] = 1e30  # its square overflows float32: the norm is infinite, the values are not
    guard.on_pre_optimizer_step(args, state, None, model=model)  # passes
    for value, said in ((float("inf"), "infinite"), (float("nan"), "NaN")):
        model[0].bias.grad[2] = value
        with pytest.raises(NonFinite, match=f"diverged at step 5: the gradients hold {said} values"):
            guard.on_pre_optimizer_step(args, state, None, model=model)


def test_divergence_stops_the_stage_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    recipe, run = micro(tmp_path, learning_rate=1.0e10), tmp_path / "run"
    code, out, err = alignkit(capsys, "run", recipe)
    assert code == 2
    assert "pretrain: training diverged at step 2: the gradients hold NaN values" in err
    assert "lower stages.pretrain.trainer.learning_rate (now 1e+10)" in err
    assert "Traceback" not in err
    assert not (run / "pretrain").exists() and not (run / "sft").exists()  # nothing marked complete
    partial = run / "pretrain.partial"
    assert json.loads((partial / "alignkit_stage.json").read_text())["status"] == "running"
    assert f"its last good checkpoint is kept ({partial / 'checkpoints' / 'checkpoint-1'})" in err
    model = AutoModelForCausalLM.from_pretrained(partial / "checkpoints" / "checkpoint-1")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (partial / "checkpoints" / "checkpoint-2").exists()


def test_divergence_in_ppo_is_a_message_not_a_traceback(run_copy, capsys):
    before = (run_copy / "ppo" / "model.safetensors").read_bytes()
    code, out, err = alignkit(
        capsys,
        "run",
        TINY,
        f"output_dir={run_copy}",
        "--only",
        "ppo",
        "stages.ppo.trainer.total_episodes=48",
        "stages.ppo.trainer.learning_rate=1e10",
    )
    assert code == 2
    assert "ppo: training diverged" in err and "NaN" in err and "stages.ppo.trainer.learning_rate" in err
    assert "Traceback" not in err
    assert (run_copy / "ppo" / "model.safetensors").read_bytes() == before  # the old output is untouched


# --- what a stage shows ---------------------------------------------------------------------------------------------


def test_the_terminal_shows_progress_lines_and_the_raw_logs_go_to_the_stage_log(run_dir, tmp_path, capsys):
    recipe = micro(tmp_path)
    code, out, err = alignkit(capsys, "run", recipe)
    assert code == 0
    assert "{'loss'" not in err and "{'loss'" not in out  # no raw log dicts
    assert "[alignkit] pretrain: step 3/3  loss " in err
    assert "[alignkit] pretrain: done in " in err and ", loss " in err
    logged = [json.loads(line) for line in (tmp_path / "run" / "pretrain" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged if "loss" in row] == [1, 2, 3]
    figures = json.loads((run_dir / "reward" / "metrics.json").read_text())["figures"]
    assert 0 <= figures["accuracy"] <= 1 and figures["loss"] > 0
    figures = json.loads((run_dir / "ppo" / "metrics.json").read_text())["figures"]
    assert {"reward", "kl"} <= set(figures)


def test_ppo_runs_every_model_without_dropout_whatever_the_architecture(tmp_path):
    """OPT applies dropout from its config, functionally: switching off nn.Dropout modules does not reach it."""
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from alignkit.models import load_causal_lm, load_reward_model
    from alignkit.recipe import load_recipe

    tokenizer = AutoTokenizer.from_pretrained(REPO / "data/tiny/tokenizer")
    config = OPTConfig(
        vocab_size=len(tokenizer) + 1,
        hidden_size=32,
        num_hidden_layers=1,
        ffn_dim=64,
        num_attention_heads=2,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        dropout=0.5,
        attention_dropout=0.5,
    )
    OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    recipe = load_recipe(TINY)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])

    def varies(model) -> bool:
        model.train()  # as PPO's policy trains
        out = model(input_ids=ids).logits
        return not torch.equal(out, model(input_ids=ids).logits)

    assert varies(load_causal_lm(recipe, str(tmp_path / "opt"), tokenizer))
    assert not varies(load_causal_lm(recipe, str(tmp_path / "opt"), tokenizer, "ppo", dropout=False))
    assert not varies(load_reward_model(recipe, str(tmp_path / "opt"), tokenizer, "ppo", dropout=False))


# --- a full disk ---------------------------------------------------------------------------------------------------


def _no_space(path) -> OSError:
    import errno

    return OSError(errno.ENOSPC, "No space left on device", str(path))


def test_a_full_disk_while_checkpointing_says_what_is_kept_and_the_rerun_resumes(tmp_path, capsys, monkeypatch):
    recipe, run = micro(tmp_path), tmp_path / "run"
    checkpoints = run / "pretrain.partial" / "checkpoints"

    def save(original, obj, path, *args, **kwargs):
        if str(path).endswith(os.path.join("checkpoint-2", "optimizer.pt")):
            raise _no_space(path)
        return original(obj, path, *args, **kwargs)

    hook(monkeypatch, torch, "save", save)
    code, out, err = alignkit(capsys, "run", recipe)
    monkeypatch.undo()
    assert code == 2 and "Traceback" not in err
    assert "pretrain: the disk is full (" in err and "optimizer.pt: No space left on device" in err
    assert f"pretrain's last whole checkpoint, {checkpoints / 'checkpoint-1'}, where it resumes" in err
    assert "Free space on that disk" in err and "GiB free now" in err and "run the same command again" in err
    assert not (checkpoints / "checkpoint-2").exists()  # cut off by the full disk: removed, it is written again
    assert not (run / "pretrain").exists()  # nothing marked complete

    code, out, err = alignkit(capsys, "run", recipe)
    assert code == 0, err
    assert f"pretrain: resuming from {checkpoints / 'checkpoint-1'}" in err
    loads(run, "pretrain", "sft")


def test_a_full_disk_while_marking_a_stage_complete_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    from alignkit import files

    recipe, run = micro(tmp_path), tmp_path / "run"
    original_fsync = os.fsync

    def write_text(original, path, text):
        if Path(path).name == "alignkit_stage.json" and '"complete"' in text and "sft" in str(path):
            monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(_no_space(path)))
        try:
            return original(path, text)
        finally:
            monkeypatch.setattr(os, "fsync", original_fsync)

    hook(monkeypatch, files, "write_text", write_text)
    code, out, err = alignkit(capsys, "run", recipe)
    monkeypatch.undo()
    assert code == 2 and "Traceback" not in err
    assert "sft: the disk is full" in err and "Kept: the finished stages (pretrain)" in err
    assert not list(run.rglob("*.tmp"))
    assert json.loads((run / "sft.partial" / "alignkit_stage.json").read_text())["status"] == "running"
    code, out, err = alignkit(capsys, "run", recipe)
    assert code == 0, err
    loads(run, "pretrain", "sft")


def test_a_full_disk_while_writing_the_report_is_a_message(run_copy, capsys, monkeypatch):
    from alignkit import evaluate

    def write_report(*args, **kwargs):
        raise _no_space(run_copy / "report.md")

    monkeypatch.setattr(evaluate, "write_report", write_report)
    code, out, err = alignkit(capsys, "eval", TINY, f"output_dir={run_copy}", *FAST)
    assert code == 2 and "Traceback" not in err
    assert f"the disk is full ({run_copy / 'report.md'}: No space left on device)" in err
    assert "Free space on that disk and run the same command again" in err
