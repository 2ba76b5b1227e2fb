"""Scaling paths on the tiny model: two processes, LoRA and QLoRA with the value model's adapter, the PPO
reference."""

import json
import shutil

import pytest
import torch
from conftest import FAST, TINY, alignkit, launched, rerun, summary
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

STAGES = ["pretrain", "sft", "reward", "ppo"]


def _last_step(run, stage):
    history = json.loads((run / stage / "metrics.json").read_text())["log_history"]
    return max(entry.get("step", 0) for entry in history)


def test_two_processes_train_the_pipeline_and_only_the_main_one_writes(run_dir, tmp_path):
    """Two CPU processes over gloo are a real distributed run: each trains half of every epoch's batches."""
    out = tmp_path / "run"
    done = launched("run", TINY, f"output_dir={out}", *FAST, "--num-processes", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary(done.stdout) == dict.fromkeys(STAGES, "trained")  # printed once, by the main process
    assert done.stderr.count("[alignkit] sft: done") == 1  # one process speaks for all
    for stage in STAGES:
        manifest = json.loads((out / stage / "alignkit_stage.json").read_text())
        assert manifest["status"] == "complete" and manifest["processes"] == 2
        assert not (out / f"{stage}.partial").exists()
    for stage in ("pretrain", "sft", "reward"):  # the same epochs in about half the optimizer steps
        single, double = _last_step(run_dir, stage), _last_step(out, stage)
        assert double < 0.7 * single, (stage, single, double)
    ppo_steps = _last_step(out, "ppo")
    assert ppo_steps == _last_step(run_dir, "ppo") // 2
    # the outputs load and generate
    model = AutoModelForCausalLM.from_pretrained(out / "ppo")
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape[-1] == model.config.vocab_size
    assert AutoModelForSequenceClassification.from_pretrained(out / "reward").config.num_labels == 1
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(STAGES)  # no .partial folder left
    assert (out / "report.md").is_file()


def test_a_failing_process_ends_the_run_with_its_message_and_no_launcher_traceback(run_copy):
    """A child's error reaches the user as alignkit's own message and exit status, not torchrun's failure table."""
    before = json.loads((run_copy / "ppo" / "alignkit_stage.json").read_text())
    # a reward model folder whose weights are gone: its config passes validation, loading it fails in each process
    broken = run_copy.parent / "reward-without-weights"
    shutil.copytree(run_copy / "reward", broken)
    (broken / "model.safetensors").unlink()
    done = launched(
        "run",
        TINY,
        f"output_dir={run_copy}",
        "--only",
        "ppo",
        f"stages.ppo.reward_model={broken}",
        "--num-processes",
        "2",
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]  # the child's status: bad input
    assert f"cannot load the model '{broken}'" in done.stderr, done.stderr[-3000:]
    assert "alignkit: process " in done.stderr and "of 2 failed (exit status 2)" in done.stderr
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr[-3000:]
    # the earlier ppo output is kept as it was; the failed attempt is marked as not finished
    assert json.loads((run_copy / "ppo" / "alignkit_stage.json").read_text()) == before
    assert json.loads((run_copy / "ppo.partial" / "alignkit_stage.json").read_text())["status"] == "running"


def test_a_missing_upstream_stage_is_named_once_before_any_process_starts(tmp_path):
    out = tmp_path / "run"
    done = launched("run", TINY, f"output_dir={out}", "--only", "reward", "--num-processes", "2", timeout=300)
    assert done.returncode == 2
    assert done.stderr.count(f"reward needs the sft stage's output, but {out / 'sft'} is missing") == 1
    assert "[alignkit]" not in done.stderr  # no process got as far as loading anything
    assert "failed (exit status" not in done.stderr and "Traceback" not in done.stderr
    assert not out.exists()


def _lora_count(config, r, extra=0):
    """LoRA on GPT-2's fused attention (c_attn: n_embd -> 3 n_embd): r * (n_embd + 3 n_embd) per layer."""
    return config.n_layer * r * (config.n_embd + 3 * config.n_embd) + extra


@pytest.mark.parametrize("quantize", [False, True], ids=["lora", "qlora"])
def test_lora_trains_adapters_only_and_the_value_model_gets_one(run_copy, capsys, quantize):
    settings = ["lora.r=4", "lora.lora_alpha=8"]
    if quantize:
        settings += ["quantization.load_in_4bit=true", *[f"stages.{s}.trainer.bf16=true" for s in STAGES[1:]]]
    else:  # a stage may set its own: the reward model trains in full here
        settings += ["stages.reward.lora=false"]
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, "--from", "sft", *settings)
    assert code == 0, err
    assert summary(out) == {"sft": "trained", "reward": "trained", "ppo": "trained"}
    config = AutoModelForCausalLM.from_pretrained(run_copy / "pretrain").config
    params = {s: json.loads((run_copy / s / "metrics.json").read_text())["parameters"] for s in STAGES[1:]}
    head = config.n_embd  # the score head (modules_to_save) trains in full: n_embd -> 1
    assert params["sft"]["model"]["trainable"] == _lora_count(config, 4)
    reward = params["reward"]["model"]
    assert reward["trainable"] == (_lora_count(config, 4, head) if quantize else reward["total"])
    assert (run_copy / "reward" / "adapter").exists() == quantize
    assert params["ppo"]["policy"]["trainable"] == _lora_count(config, 4)
    assert params["ppo"]["value"]["trainable"] == _lora_count(config, 4, head)  # not the whole value model
    for part in ("policy", "value"):
        assert params["ppo"][part]["trainable"] < 0.1 * params["ppo"][part]["total"]

    # frozen base: outside LoRA's target (c_attn), the merged PPO model equals the SFT model it started from
    sft = AutoModelForCausalLM.from_pretrained(run_copy / "sft").state_dict()
    ppo = AutoModelForCausalLM.from_pretrained(run_copy / "ppo").state_dict()
    frozen = [k for k in sft if "c_attn" not in k]
    assert frozen and all(torch.equal(sft[k], ppo[k]) for k in frozen)
    assert any(not torch.equal(sft[k], ppo[k]) for k in sft if k.endswith("c_attn.weight"))

    # the reference PPO was kept near is the policy with its adapter off, which is the SFT model
    from peft import PeftModel

    policy = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(run_copy / "sft"), run_copy / "ppo" / "adapter"
    ).eval()
    reference = AutoModelForCausalLM.from_pretrained(run_copy / "sft").eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        with policy.disable_adapter():
            assert torch.allclose(policy(input_ids=ids).logits, reference(input_ids=ids).logits)
        assert not torch.allclose(policy(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_ppo_refuses_to_run_sharded(run_copy, capsys, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")  # as `accelerate launch` with zero3.yaml sets it
    before = (run_copy / "ppo" / "model.safetensors").read_bytes()
    code, out, err = rerun(capsys, run_copy, "ppo", *FAST)
    assert code == 2 and "cannot run sharded (ZeRO-3 or FSDP)" in err and "zero2.yaml" in err
    assert (run_copy / "ppo" / "model.safetensors").read_bytes() == before  # the old output is whole


def test_a_separate_reference_copy_trains_the_same_lora_policy(run_copy, capsys):
    """With LoRA the reference is the policy with its adapter disabled; `separate_reference` loads a second frozen
    copy instead. Both compute the same reference, so PPO trains the same adapter either way."""
    from safetensors.torch import load_file

    adapters = {}
    for separate in ("false", "true"):
        code, out, err = rerun(
            capsys,
            run_copy,
            "ppo",
            *FAST,
            "--accept-upstream",  # the shared sft was trained without LoRA; only ppo gets an adapter here
            "lora.r=4",
            "lora.lora_alpha=8",
            f"stages.ppo.separate_reference={separate}",
        )
        assert code == 0, err
        wanted = "a second frozen copy" if separate == "true" else "the policy with its adapter disabled"
        assert f"reference: {wanted}" in err
        adapters[separate] = load_file(run_copy / "ppo" / "adapter" / "adapter_model.safetensors")
    assert adapters["true"].keys() == adapters["false"].keys()
    for name, tensor in adapters["true"].items():
        assert torch.allclose(tensor, adapters["false"][name], atol=1e-5), name
    assert any("lora_B" in name and tensor.abs().max() > 0 for name, tensor in adapters["true"].items())  # trained
