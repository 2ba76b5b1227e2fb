"""alignkit's own PPO: its math against hand computations, and through the real entry point: exact resume after a
kill, PPO-ptx pulling the policy towards the pretraining text, checkpoints that hold everything."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, TINY, alignkit, summary
from safetensors.torch import load_file

from alignkit.stages.ppo_trainer import AdaptiveKL, clipped_losses, gae, masked_whiten, per_token_rewards

# --- the math --------------------------------------------------------------------------------------------------------


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 9.0]])  # 9.0 lies past the second response's end
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 1: deltas 0.1, 0.1, 0.3 (the state after the last token is terminal); A_t = delta_t + 0.95 A_{t+1}
    # row 2: ends after two tokens: deltas 0.1, 1 - 0.6 = 0.4
    expected = torch.tensor([[0.1 + 0.95 * (0.1 + 0.95 * 0.3), 0.1 + 0.95 * 0.3, 0.3], [0.1 + 0.95 * 0.4, 0.4, 0.0]])
    assert torch.allclose(advantages, expected)
    assert torch.allclose(returns, (expected + values) * mask)
    # with discounting: gamma 0.5, lam 1 on row 1: A_2 = 0.3, A_1 = (0 + 0.5 * 0.7 - 0.6) + 0.5 * 0.3, ...
    advantages, _ = gae(rewards[:1], values[:1], mask[:1], gamma=0.5, lam=1.0)
    a2 = 1 - 0.7
    a1 = 0.5 * 0.7 - 0.6 + 0.5 * a2
    a0 = 0.5 * 0.6 - 0.5 + 0.5 * a1
    assert torch.allclose(advantages, torch.tensor([[a0, a1, a2]]))


def test_whitening_matches_a_hand_computation():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    std = math.sqrt(5 / 3)  # unbiased: squared deviations 2.25, 0.25, 0.25, 2.25 over 3
    expected = torch.tensor([[-1.5, -0.5, 0.5, 1.5]]) / std
    assert torch.allclose(masked_whiten(values, torch.ones_like(values)), expected, atol=1e-6)
    # masked entries take no part and come out 0; shift_mean=False keeps the mean
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert torch.allclose(masked_whiten(values, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6)
    assert torch.allclose(
        masked_whiten(values, mask, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0, 0.0]]), atol=1e-6
    )


def test_rewards_are_the_kl_penalty_per_token_and_the_score_on_the_last():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards, kl = per_token_rewards(logprobs, ref_logprobs, torch.tensor([2.0]), mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 2.0, 0.0]]))
    # k3 = (r - 1) - log r with r = p_ref / p_policy: never negative
    _, k3 = per_token_rewards(logprobs, ref_logprobs, torch.tensor([2.0]), mask, 0.1, "k3")
    assert torch.allclose(k3, torch.tensor([[math.exp(-0.5) - 1 + 0.5, 0.0, 0.0]]))


def test_clipped_losses_match_a_hand_computation():
    one = torch.ones(1, 1)
    policy_loss, value_loss, stats = clipped_losses(
        new_logprobs=one * math.log(1.5),
        old_logprobs=one * 0,
        advantages=one,
        new_values=one * 1.0,
        old_values=one * 0.5,
        returns=one * 2.0,
        mask=one,
        cliprange=0.2,
        cliprange_value=0.2,
    )
    assert policy_loss.item() == pytest.approx(-1.2)  # ratio 1.5 clipped to 1.2: max(-1.5, -1.2)
    assert value_loss.item() == pytest.approx(0.5 * (0.7 - 2.0) ** 2)  # clipped to 0.5 + 0.2, the larger loss
    assert stats["policy_clipfrac"].item() == 1 and stats["value_clipfrac"].item() == 1
    # a negative advantage is not clipped where the ratio moves against it
    policy_loss, _, stats = clipped_losses(one * math.log(1.5), one * 0, -one, one, one, one, one, 0.2, 0.2)
    assert policy_loss.item() == pytest.approx(1.5) and stats["policy_clipfrac"].item() == 0


def test_adaptive_kl_moves_beta_towards_the_target():
    kl = AdaptiveKL(0.1, target=1.0, horizon=100)
    kl.update(2.0, episodes=10)  # error clipped at +0.2: beta x (1 + 0.2 x 10 / 100)
    assert kl.value == pytest.approx(0.102)
    kl.update(0.9, episodes=10)  # error -0.1
    assert kl.value == pytest.approx(0.102 * (1 - 0.1 * 0.1))
    fixed = AdaptiveKL(0.1, target=None, horizon=100)
    fixed.update(5.0, episodes=10)
    assert fixed.value == 0.1


# --- through the entry point -----------------------------------------------------------------------------------------

PPO = ["--only", "ppo", "stages.ppo.trainer.total_episodes=64", "stages.ppo.trainer.save_steps=2"]


def _run(out, *extra, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "alignkit", "run", str(TINY), f"output_dir={out}", *PPO, *extra],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_killed_ppo_stage_resumes_and_ends_with_the_weights_of_an_uninterrupted_run(run_dir, tmp_path):
    import shutil

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # one thread: sums in one order
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for folder in (whole, killed):
        shutil.copytree(run_dir, folder)
    done = _run(whole, "--force", env=env)
    _, err = done.communicate(timeout=600)
    assert done.returncode == 0, err[-3000:]

    proc = _run(killed, "--force", env=env)
    checkpoint = killed / "ppo.partial" / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the stage ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the checkpoint holds everything to go on: both models, optimizer, schedule, RNG, PPO's own state
    kept = checkpoint.parent
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pth", "ppo_state.json"} <= {
        p.name for p in kept.iterdir()
    }
    assert (kept / "value" / "model.safetensors").is_file()
    assert json.loads((kept / "ppo_state.json").read_text())["episode"] == 4 * 8
    again = _run(killed, env=env)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "ppo: resuming from " in err and summary(out) == {"ppo": "trained"}

    a, b = load_file(whole / "ppo" / "model.safetensors"), load_file(killed / "ppo" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit, on one CPU thread
    logs = [json.loads((f / "ppo" / "metrics.json").read_text())["log_history"] for f in (whole, killed)]
    assert logs[0][-1]["episode"] == logs[1][-1]["episode"] == 64
    assert [h["objective/scores"] for h in logs[0]] == [h["objective/scores"] for h in logs[1]]


def test_ppo_logs_what_the_report_reads_every_update(run_copy, capsys):
    code, out, err = alignkit(
        capsys,
        "run",
        TINY,
        f"output_dir={run_copy}",
        *PPO,
        "--force",
        "stages.ppo.trainer.save_total_limit=1",
        "stages.ppo.separate_reference=true",
    )
    assert code == 0, err
    assert "separate_reference has no effect without LoRA" in err  # said, not silently ignored
    metrics = json.loads((run_copy / "ppo" / "metrics.json").read_text())
    assert metrics["parameters"]["value"]["trainable"] > 0
    logged = [h for h in metrics["log_history"] if "objective/kl" in h]
    assert len(logged) == 8 and {"eps", "policy/clipfrac_avg", "loss/value_avg", "kl_coef"} <= set(logged[-1])
    assert all(h["eps"] > 0 for h in logged)


def test_ptx_pulls_the_policy_towards_the_pretraining_text(run_copy, capsys):
    """PPO-ptx adds a language-modelling loss on pretraining text to every step: the policy it trains fits that text
    better than the one plain PPO trains from the same start."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fast = ["stages.ppo.trainer.learning_rate=1e-3", "stages.ppo.trainer.total_episodes=64"]
    losses = {}
    tokenizer = AutoTokenizer.from_pretrained(run_copy / "sft")
    texts = [json.loads(line)["text"] for line in (REPO / "data" / "tiny" / "pretrain.jsonl").read_text().splitlines()]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)

    def text_loss(folder):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            return model(**batch, labels=labels).loss.item()

    for coef in (0.0, 1.0):
        code, out, err = alignkit(
            capsys,
            "run",
            TINY,
            f"output_dir={run_copy}",
            "--only",
            "ppo",
            *fast,
            f"stages.ppo.trainer.ptx_coef={coef}",
        )
        assert code == 0, err
        losses[coef] = text_loss(run_copy / "ppo")
        if coef:
            assert "PPO-ptx: " in err and "data/tiny/pretrain.jsonl" in err
            logged = json.loads((run_copy / "ppo" / "metrics.json").read_text())["log_history"]
            assert all("loss/ptx_avg" in h for h in logged if "objective/kl" in h)
    assert losses[1.0] < losses[0.0] - 0.05, losses


def test_ptx_needs_pretraining_text(tmp_path, capsys):
    code, out, err = alignkit(
        capsys,
        "validate",
        TINY,
        "~stages.pretrain",
        "~model.config",
        f"model.name_or_path={tmp_path}",
        "stages.ppo.trainer.ptx_coef=1",
    )
    assert code == 2 and "stages.ppo.trainer.ptx_coef: PPO-ptx needs pretraining text" in err


# --- GPU paths: run where a GPU is, skipped elsewhere (CI has none) ---------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_ppo_in_bf16_on_a_gpu(run_copy, capsys):
    code, out, err = alignkit(
        capsys,
        "run",
        TINY,
        f"output_dir={run_copy}",
        "--only",
        "ppo",
        "--force",
        "stages.ppo.trainer.bf16=true",
        "stages.ppo.trainer.total_episodes=64",
    )
    assert code == 0, err
    logged = json.loads((run_copy / "ppo" / "metrics.json").read_text())["log_history"]
    assert all(math.isfinite(h["objective/kl"]) for h in logged if "objective/kl" in h)


@needs_cuda
def test_qlora_ppo_on_a_gpu(run_copy, capsys):
    code, out, err = alignkit(
        capsys,
        "run",
        TINY,
        f"output_dir={run_copy}",
        "--only",
        "ppo",
        "--force",
        "lora.r=4",
        "lora.lora_alpha=8",
        "quantization.load_in_4bit=true",
        "stages.ppo.trainer.bf16=true",
        "stages.ppo.trainer.total_episodes=64",
    )
    assert code == 0, err
    parameters = json.loads((run_copy / "ppo" / "metrics.json").read_text())["parameters"]
    assert 0 < parameters["policy"]["trainable"] < parameters["policy"]["total"] // 10
    assert (run_copy / "ppo" / "adapter" / "adapter_config.json").is_file()


def test_the_rollout_records_what_the_update_recomputes(run_dir, tmp_path):
    """Before any update the policy's recomputed log-probabilities and values equal what the rollout recorded (the
    token alignment, masks, dropout and sampling settings are consistent), and the reference equals the policy."""
    import copy

    from datasets import Dataset

    from alignkit import models
    from alignkit.recipe import load_recipe
    from alignkit.stages.ppo import STAGE
    from alignkit.stages.ppo_trainer import PPOTrainer, token_logprobs

    recipe = load_recipe(TINY)
    args = copy.deepcopy(recipe.configs["ppo"].args)
    args.output_dir = str(tmp_path)
    sft, reward = str(run_dir / "sft"), str(run_dir / "reward")
    tokenizer = models.load_tokenizer(recipe, sft)
    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"
    policy, ref = (models.load_causal_lm(recipe, sft, tokenizer, "ppo", dropout=False) for _ in range(2))
    # settings of the model's own that must not reach PPO's sampling: answers would never stop early
    policy.generation_config.min_new_tokens = args.response_length
    policy.generation_config.repetition_penalty = 5.0
    rm, value = (models.load_reward_model(recipe, reward, tokenizer, "ppo", dropout=False) for _ in range(2))
    questions = [f"What is the capital of {c}?" for c in ("Zorbia", "Marnia", "Quellia", "Tesk")] * 2
    prompts = [
        left.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for q in questions
    ]
    trainer = PPOTrainer(
        args,
        policy,
        ref,
        rm,
        value,
        left,
        Dataset.from_dict({"input_ids": prompts}),
        STAGE,
        stop_token_id=tokenizer.eos_token_id,
    )
    batch = trainer.rollout(prompts)
    mask, width = batch["mask"], batch["queries"].shape[1]
    assert (mask.sum(dim=1) < batch["responses"].shape[1]).any()  # some answers stopped at EOS, early
    stopped = (batch["responses"] == tokenizer.eos_token_id).any(dim=1)
    last = mask.sum(dim=1).long() - 1
    assert (batch["responses"][stopped, last[stopped]] == tokenizer.eos_token_id).all()  # the mask ends at EOS
    sequences = torch.cat([batch["queries"], batch["responses"]], dim=1)
    attention = torch.cat([batch["query_mask"], mask.long()], dim=1)
    with torch.no_grad():
        logits, values, _ = trainer.model(sequences, attention)
    recomputed = token_logprobs(logits[:, width - 1 : -1], sequences[:, width:], args.temperature) * mask
    assert torch.allclose(recomputed, batch["logprobs"], atol=1e-4)
    assert torch.allclose(values[:, width - 1 : -1] * mask, batch["values"], atol=1e-5)
    assert torch.allclose(batch["ref_logprobs"], batch["logprobs"], atol=1e-4)  # no update yet: KL 0
