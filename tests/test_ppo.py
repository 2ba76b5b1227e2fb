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
from conftest import REPO, TINY, alignkit, rerun, summary, unwrap
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
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.json", "ppo_state.json"} <= {
        p.name for p in kept.iterdir()
    }
    assert (kept / "value" / "model.safetensors").is_file()
    assert json.loads((kept / "ppo_state.json").read_text())["episode"] == 4 * 8
    again = _run(killed, env=env)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "ppo: resuming from " in unwrap(err) and summary(out) == {"ppo": "trained"}

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
    code, out, err = rerun(
        capsys,
        run_copy,
        "ppo",
        "stages.ppo.trainer.bf16=true",
        "stages.ppo.trainer.total_episodes=64",
    )
    assert code == 0, err
    logged = json.loads((run_copy / "ppo" / "metrics.json").read_text())["log_history"]
    assert all(math.isfinite(h["objective/kl"]) for h in logged if "objective/kl" in h)


@needs_cuda
def test_qlora_ppo_on_a_gpu(run_copy, capsys):
    code, out, err = rerun(
        capsys,
        run_copy,
        "ppo",
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


def _tiny_trainer(run_dir, tmp_path, checkpointing: bool = False, **settings):
    """alignkit's PPOTrainer over the tiny run's sft and reward models, as the ppo stage builds it (dropout off),
    with `settings` on the trainer block; returns (trainer, prompts, tokenizer)."""
    import copy

    from datasets import Dataset

    from alignkit import models
    from alignkit.recipe import load_recipe
    from alignkit.stages.ppo import STAGE
    from alignkit.stages.ppo_trainer import PPOTrainer

    recipe = load_recipe(TINY)
    args = copy.deepcopy(recipe.configs["ppo"].args)
    args.output_dir = str(tmp_path)
    for key, value in settings.items():
        setattr(args, key, value)
    sft, reward = str(run_dir / "sft"), str(run_dir / "reward")
    tokenizer = models.load_tokenizer(recipe, sft)
    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"
    policy, ref = (models.load_causal_lm(recipe, sft, tokenizer, "ppo", dropout=False) for _ in range(2))
    # settings of the model's own that must not reach PPO's sampling: answers would never stop early
    policy.generation_config.min_new_tokens = args.response_length
    policy.generation_config.repetition_penalty = 5.0
    rm, value = (models.load_reward_model(recipe, reward, tokenizer, "ppo", dropout=False) for _ in range(2))
    if checkpointing:  # as the ppo stage does with gradient_checkpointing on (TRL's default, the real recipes')
        for model in (policy, value):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
    return trainer, prompts, tokenizer


def test_the_rollout_records_what_the_update_recomputes(run_dir, tmp_path):
    """Before any update the policy's recomputed log-probabilities and values equal what the rollout recorded (the
    token alignment, masks, dropout and sampling settings are consistent), and the reference equals the policy."""
    from alignkit.stages.ppo_trainer import token_logprobs

    trainer, prompts, tokenizer = _tiny_trainer(run_dir, tmp_path)
    args = trainer.args
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


def test_sampling_keeps_the_kv_cache_under_gradient_checkpointing(run_dir, tmp_path):
    """With gradient checkpointing on and the policy in train mode (the real recipes' settings), transformers' GPT-2
    drops its KV cache: each sampled token would see itself alone. generate()'s log-probabilities of what it sampled
    equal a full forward's (fp32, 1e-4), and the model's checkpointing is back on afterwards."""
    from alignkit.stages.ppo_trainer import positions, token_logprobs

    trainer, prompts, _ = _tiny_trainer(run_dir, tmp_path, checkpointing=True)
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    assert policy.training and policy.transformer.gradient_checkpointing
    queries, query_mask = trainer._pad(prompts, left=True)
    torch.manual_seed(0)
    responses, sampled = trainer._sample(policy, queries, query_mask)
    mask = trainer._response_mask(responses).float()
    sequences = torch.cat([queries, responses], dim=1)
    attention = torch.cat([query_mask, mask.long()], dim=1)
    with torch.no_grad():
        logits = policy(input_ids=sequences, attention_mask=attention, position_ids=positions(attention)).logits
    width = queries.shape[1]
    full = token_logprobs(logits[:, width - 1 : -1], responses, trainer.args.temperature)
    assert mask[:, 1:].sum() > 8  # answers of more than one token: the cache is read
    assert torch.allclose(sampled * mask, full * mask, atol=1e-4), (sampled - full).abs().max()
    assert policy.transformer.gradient_checkpointing  # switched back on for the update


def test_policy_and_value_gradients_are_clipped_each_by_its_own_norm(run_dir, tmp_path):
    """A large value gradient leaves the policy's step alone (one norm over both would shrink it 100 times here)."""
    trainer, _, _ = _tiny_trainer(run_dir, tmp_path, max_grad_norm=1.0)
    model = trainer.accelerator.unwrap_model(trainer.model)
    for part, size in ((model.policy, 0.5), (model.value_model, 100.0)):
        params = [p for p in part.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.ones_like(p)
        scale = size / torch.sqrt(sum((p.grad**2).sum() for p in params))
        for p in params:
            p.grad *= scale
    norms = trainer._clip_gradients(1.0)
    assert norms["policy"].item() == pytest.approx(0.5, rel=1e-4)
    assert norms["value"].item() == pytest.approx(100.0, rel=1e-4)

    def norm(part):
        return torch.sqrt(sum((p.grad**2).sum() for p in part.parameters() if p.grad is not None)).item()

    assert norm(model.policy) == pytest.approx(0.5, rel=1e-4)  # under the limit: untouched
    assert norm(model.value_model) == pytest.approx(1.0, rel=1e-4)


def test_the_first_update_has_ratios_of_one_under_bf16_and_checkpointing(run_copy, capsys):
    """The rollout's log-probabilities come from the update's own kind of forward: under bf16 autocast and gradient
    checkpointing (the real recipes' settings) the first mini-batch's ratios are 1, and the sampled answers' KL to
    the reference (the same model then) is 0; the checks' figures are logged."""
    code, out, err = rerun(
        capsys,
        run_copy,
        "ppo",
        "~eval",
        "stages.ppo.trainer.total_episodes=16",
        "stages.ppo.trainer.num_ppo_epochs=1",
        "stages.ppo.trainer.bf16=true",
        "stages.ppo.trainer.gradient_checkpointing=true",
    )
    assert code == 0, err
    first = json.loads((run_copy / "ppo" / "metrics.json").read_text())["log_history"][0]
    # one epoch of one mini-batch: every ratio of the first update was taken before any optimizer step
    assert first["val/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert first["policy/approxkl_avg"] < 1e-10 and first["policy/clipfrac_avg"] == 0
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["check/first_kl"] < 1e-6 and first["check/first_ratio"] < 1e-6
    assert 0 <= first["check/first_sampler"] < 0.05  # bf16's incremental forward against the full one
    assert {"policy/grad_norm", "val/grad_norm"} <= set(first)


def test_the_first_update_check_stops_ppo_when_dropout_is_left_on(run_copy, capsys, monkeypatch):
    """Dropout left on in the policy (an architecture that applies it from elsewhere, say): policy and reference
    differ before any update. The stage stops at the first update, naming what differs and the likely causes."""
    from alignkit import models

    load = models.load_causal_lm
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, dropout=True, **k: load(*a, dropout=True, **k))
    before = load_file(run_copy / "ppo" / "model.safetensors")
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *PPO, "--force", "~eval")
    assert code == 2, err
    assert "ppo: the first update's check failed" in err and "Traceback" not in err
    assert "KL to the reference" in err and "dropout" in err and "check_first_update: false" in err
    after = load_file(run_copy / "ppo" / "model.safetensors")  # the finished stage it was to replace is kept
    assert all(torch.equal(before[k], after[k]) for k in before)
    code, out, err = alignkit(
        capsys,
        "run",
        TINY,
        f"output_dir={run_copy}",
        *PPO,
        "--force",
        "~eval",
        "stages.ppo.trainer.check_first_update=false",
    )
    assert code == 0, err  # the user's way past it


def test_the_first_update_check_stops_ppo_when_sampling_loses_its_cache(run_copy, capsys, monkeypatch):
    """Sampling under gradient checkpointing without alignkit's switch (the bug this check was built for): the
    sampler's log-probabilities disagree with the forward's, and the stage stops naming the cache."""
    import contextlib

    from alignkit.stages import ppo_trainer

    monkeypatch.setattr(ppo_trainer, "without_checkpointing", lambda model: contextlib.nullcontext())
    code, out, err = alignkit(
        capsys,
        "run",
        TINY,
        f"output_dir={run_copy}",
        *PPO,
        "--force",
        "~eval",
        "stages.ppo.trainer.gradient_checkpointing=true",
    )
    assert code == 2, err
    assert "generate()'s log-probabilities" in err and "KV cache" in err and "Traceback" not in err


def test_the_first_update_check_tolerances():
    """fp32 and low precision have their own tolerances; a NaN fails."""
    from alignkit.stages.ppo_trainer import FIRST_UPDATE_TOLERANCE, first_update_problems

    assert first_update_problems({"kl": (1e-6, 1e-5), "sampler": (1e-6, 1e-5), "ratio": (0.0, 0.0)}, False) == []
    assert first_update_problems({"sampler": (0.02, 0.13)}, True) == []  # bf16's measured gap
    failed = first_update_problems({"sampler": (0.02, 0.13)}, False)
    assert len(failed) == 1 and f"tolerance {FIRST_UPDATE_TOLERANCE['sampler'][0]:g}" in failed[0]
    assert len(first_update_problems({"sampler": (1.0, 7.0)}, True)) == 1  # a lost cache, in bf16 too
    assert len(first_update_problems({"kl": (float("nan"), float("nan"))}, True)) == 1


def test_a_checkpoint_of_other_batch_sizes_is_not_resumed(run_dir, tmp_path):
    """A checkpoint written with another rollout batch (num_mini_batches meant a split before alignkit took TRL
    1.12's sizes) would resume at the wrong data position and schedule: refused, naming both sizes and the fix."""
    from alignkit.errors import UserError
    from alignkit.stages.ppo_trainer import STATE_FILE

    trainer, _, _ = _tiny_trainer(run_dir, tmp_path)  # 8 responses per update
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / STATE_FILE).write_text(json.dumps({"update": 2, "episode": 32, "kl_coef": 0.3, "ptx_position": 0}))
    with pytest.raises(UserError, match="rollout batches of 16 responses, these settings make 8.*--force"):
        trainer._resume(folder)
