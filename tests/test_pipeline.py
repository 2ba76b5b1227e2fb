"""The whole pipeline on a tiny GPT-2, through the real entry point: training, outputs, EOS, skip and rerun."""

import json
import shutil

import torch
from conftest import FAST, TINY, alignkit, rerun, summary
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, pipeline

from alignkit.models import DEFAULT_CHAT_TEMPLATE

STAGES = ["pretrain", "sft", "reward", "ppo"]


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict, after: dict, prefix: str) -> float:
    """Share of the transformer blocks' tensors that differ."""
    keys = [k for k in before if ".h." in k and k.startswith(prefix) and k in after]
    assert keys
    return sum(not torch.equal(before[k], after[k]) for k in keys) / len(keys)


def _prompts():
    with open("data/tiny/ppo.jsonl") as f:
        return [json.loads(line)["prompt"] for line in f]


def _eos_rate(folder) -> float:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ended = 0
    for messages in _prompts():
        inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = model.generate(**inputs, max_new_tokens=30, do_sample=False)
        ended += tok.eos_token_id in out[0, inputs["input_ids"].shape[1] :].tolist()
    return ended / len(_prompts())


def test_every_stage_output_is_complete(run_dir):
    for stage in STAGES:
        folder = run_dir / stage
        manifest = json.loads((folder / "alignkit_stage.json").read_text())
        assert manifest["status"] == "complete" and manifest["stage"] == stage
        assert (folder / "model.safetensors").stat().st_size > 0
        assert "stages:" in (folder / "recipe.yaml").read_text()
        assert json.loads((folder / "metrics.json").read_text())["log_history"]
        assert not (folder / "checkpoints").exists()
    # the stages, the eval section's report and the run folder's lock; no .partial folder or .tmp file left
    kept = ("report.md", "report.json", ".alignkit.lock")
    assert sorted(p.name for p in run_dir.iterdir() if p.name not in kept and p.suffix != ".png") == sorted(STAGES)
    assert (run_dir / ".alignkit.lock").is_file()


def test_every_stage_changes_its_parameters(run_dir):
    from alignkit.models import build_model, load_tokenizer
    from alignkit.recipe import load_recipe

    recipe = load_recipe(TINY, [f"output_dir={run_dir}"])
    init = _weights(build_model(recipe, load_tokenizer(recipe)))  # the same seed gives the same initial weights
    pretrain = _weights(AutoModelForCausalLM.from_pretrained(run_dir / "pretrain"))
    sft = _weights(AutoModelForCausalLM.from_pretrained(run_dir / "sft"))
    reward = _weights(AutoModelForSequenceClassification.from_pretrained(run_dir / "reward"))
    ppo = _weights(AutoModelForCausalLM.from_pretrained(run_dir / "ppo"))
    assert _changed(init, pretrain, "transformer") == 1.0
    assert _changed(pretrain, sft, "transformer") == 1.0
    assert _changed(sft, reward, "transformer") == 1.0
    assert _changed(sft, ppo, "transformer") == 1.0
    for stage in ("pretrain", "sft", "reward"):
        losses = [
            h["loss"] for h in json.loads((run_dir / stage / "metrics.json").read_text())["log_history"] if "loss" in h
        ]
        assert losses[-1] < losses[0], stage


def test_outputs_load_with_plain_transformers(run_dir):
    for stage in ("pretrain", "sft", "ppo"):
        tok = AutoTokenizer.from_pretrained(run_dir / stage)
        assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
        assert "Assistant:" in tok.chat_template
        model = AutoModelForCausalLM.from_pretrained(run_dir / stage)
        assert model.config.pad_token_id == tok.pad_token_id
    chat = pipeline("text-generation", model=str(run_dir / "sft"))
    reply = chat([{"role": "user", "content": "What is two plus three?"}], max_new_tokens=20, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"
    assert reply[0]["generated_text"][-1]["content"].strip()
    rm = AutoModelForSequenceClassification.from_pretrained(run_dir / "reward")
    assert rm.config.num_labels == 1


def test_sft_and_ppo_answers_end_with_eos(run_dir):
    assert _eos_rate(run_dir / "sft") >= 0.9
    assert _eos_rate(run_dir / "ppo") >= 0.9
    history = json.loads((run_dir / "ppo" / "metrics.json").read_text())["log_history"]
    assert sum(h.get("val/num_eos_tokens", 0) for h in history) > 0  # PPO's rollouts stopped at EOS


def test_reward_model_scores_at_eos_and_ranks_pairs(run_dir):
    tok = AutoTokenizer.from_pretrained(run_dir / "reward")
    rm = AutoModelForSequenceClassification.from_pretrained(run_dir / "reward").eval()
    with open("data/tiny/reward.jsonl") as f:
        rows = [json.loads(line) for line in f]
    wins = 0
    for row in rows:
        scores = []
        for side in ("chosen", "rejected"):
            ids = tok.apply_chat_template(row["prompt"] + row[side], return_tensors="pt", return_dict=True)[
                "input_ids"
            ]
            padded = torch.cat([ids, torch.full((1, 3), tok.pad_token_id)], dim=1)
            with torch.no_grad():
                score = rm(input_ids=padded).logits[0, 0]
                hidden = rm.transformer(input_ids=padded).last_hidden_state
            eos_at = (ids[0] == tok.eos_token_id).nonzero()[-1].item()
            assert eos_at == ids.shape[1] - 1  # the chat ends with the answer's EOS
            # the score is read at the last non-pad token: the EOS, not a pad (pad != eos)
            assert torch.allclose(score, rm.score(hidden[0, eos_at]).squeeze(), atol=1e-5)
            scores.append(score.item())
        wins += scores[0] > scores[1]
    assert wins / len(rows) >= 0.8  # it learned the training comparisons


def test_second_run_skips_and_a_ppo_change_reruns_only_ppo(run_copy, capsys):
    before = {s: (run_copy / s / "model.safetensors").stat().st_mtime_ns for s in STAGES}
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST)
    assert code == 0
    assert summary(out) == dict.fromkeys(STAGES, "reused")
    assert err.count("up to date") == 4
    assert before == {s: (run_copy / s / "model.safetensors").stat().st_mtime_ns for s in STAGES}

    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, "stages.ppo.trainer.kl_coef=0.2")
    assert code == 0
    assert summary(out) == {"pretrain": "reused", "sft": "reused", "reward": "reused", "ppo": "trained"}
    assert "ppo: training (its config changed)" in err
    assert json.loads((run_copy / "ppo" / "alignkit_stage.json").read_text())["status"] == "complete"


def test_changed_data_reruns_the_stage_and_everything_downstream(run_copy, capsys):
    code, out, err = alignkit(
        capsys, "run", TINY, f"output_dir={run_copy}", *FAST, "stages.reward.dataset.max_rows=30"
    )
    assert code == 0
    assert summary(out) == {"pretrain": "reused", "sft": "reused", "reward": "trained", "ppo": "trained"}
    assert "ppo: training (an upstream stage changed)" in err


def test_only_needs_its_upstream(tmp_path, capsys):
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={tmp_path / 'fresh'}", "--only", "sft")
    assert code == 2
    assert "sft needs the pretrain stage's output" in err and "--only pretrain" in err
    assert not (tmp_path / "fresh" / "sft").exists()


def test_overlength_error_keeps_the_old_output(run_copy, capsys):
    before = (run_copy / "sft" / "model.safetensors").read_bytes()
    code, out, err = alignkit(
        capsys,
        "run",
        TINY,
        f"output_dir={run_copy}",
        "--only",
        "sft",
        "stages.sft.overlength=error",
        "stages.sft.trainer.max_length=12",
    )
    assert code == 2
    assert "stages.sft: " in err and "longer than 12 tokens" in err and "overlength: truncate" in err
    assert "Traceback" not in err
    assert (run_copy / "sft" / "model.safetensors").read_bytes() == before
    assert json.loads((run_copy / "sft" / "alignkit_stage.json").read_text())["status"] == "complete"


def test_what_trl_refuses_when_building_a_trainer_is_a_clear_error(run_copy, tmp_path, capsys):
    """TRL checks a chat template for answer markers only when SFTTrainer is built; that ends the run as bad input."""
    unmarked = tmp_path / "unmarked.jinja"  # no {% generation %} markers
    unmarked.write_text(
        "{% for m in messages %}{{ m.role + ': ' + m.content + eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    before = (run_copy / "sft" / "model.safetensors").read_bytes()
    code, out, err = alignkit(
        capsys,
        "run",
        TINY,
        f"output_dir={run_copy}",
        "--only",
        "sft",
        f"model.chat_template={unmarked}",
        "--accept-upstream",  # pretrain's output was saved with the other template
    )
    assert code == 2
    assert "alignkit: error: sft: TRL refused the stage's settings" in err and "chat template" in err
    assert "stages.sft.trainer.assistant_only_loss: false" in err  # the fix
    assert "Traceback" not in err
    assert (run_copy / "sft" / "model.safetensors").read_bytes() == before
    # both fixes it names work: learning whole chats, or a template that marks the answers
    code, out, err = alignkit(
        capsys, "run", TINY, f"output_dir={run_copy}", "--only", "sft", "stages.sft.trainer.assistant_only_loss=false"
    )
    assert code == 0 and summary(out) == {"sft": "trained"}, err
    template = tmp_path / "chat.jinja"  # alignkit's marked template, written differently from the tokenizer's own
    marked = "{#- a recipe's own template -#}\n" + DEFAULT_CHAT_TEMPLATE
    template.write_text(marked)
    code, out, err = alignkit(
        capsys,
        "run",
        TINY,
        f"output_dir={run_copy}",
        "--only",
        "sft",
        f"model.chat_template={template}",
        "--accept-upstream",
    )
    assert code == 0 and summary(out) == {"sft": "trained"}, err
    assert "its chat template replaced by model.chat_template" in err
    assert AutoTokenizer.from_pretrained(run_copy / "sft").chat_template == marked


def test_qlora_stages_write_adapters_and_merged_models(run_copy, capsys):
    from peft import AutoPeftModelForCausalLM

    bf16 = [f"stages.{s}.trainer.bf16=true" for s in ("sft", "reward", "ppo")]
    code, out, err = alignkit(
        capsys,
        "run",
        TINY,
        f"output_dir={run_copy}",
        *FAST,
        "--from",
        "sft",
        "lora.r=4",
        "lora.lora_alpha=8",
        "quantization.load_in_4bit=true",
        *bf16,
    )
    assert code == 0, err
    assert summary(out) == {"sft": "trained", "reward": "trained", "ppo": "trained"}
    pretrain = _weights(AutoModelForCausalLM.from_pretrained(run_copy / "pretrain"))
    sft = _weights(AutoModelForCausalLM.from_pretrained(run_copy / "sft"))  # merged, full precision
    assert all(v.dtype == torch.float32 for v in sft.values())
    attn = [k for k in sft if k.endswith("attn.c_attn.weight")]
    assert attn and all(not torch.equal(pretrain[k], sft[k]) for k in attn)  # LoRA's targets moved
    assert all(torch.equal(pretrain[k], sft[k]) for k in sft if k.endswith("mlp.c_fc.weight"))  # the rest did not
    assert (run_copy / "reward" / "adapter" / "adapter_config.json").exists()
    # the PPO adapter over the SFT model computes what the merged PPO model computes
    adapter = AutoPeftModelForCausalLM.from_pretrained(run_copy / "ppo" / "adapter").eval()
    assert adapter.peft_config["default"].r == 4
    merged = AutoModelForCausalLM.from_pretrained(run_copy / "ppo").eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert torch.allclose(adapter(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)


def test_quantization_needs_lora_and_bf16(capsys):
    code, out, err = alignkit(capsys, "validate", TINY, "quantization.load_in_4bit=true")
    assert code == 2
    assert "quantization: the sft stage would train quantized weights in full" in err
    assert "stages.sft.trainer.bf16: with quantization TRL casts the LoRA adapters to bf16" in err
    assert "stages.pretrain.trainer.bf16" not in err  # pretraining from scratch trains in full, unquantized


def test_force_retrains_only_the_chosen_stage_and_what_was_built_on_it_follows_next_run(run_copy, capsys):
    code, out, err = rerun(capsys, run_copy, "reward", *FAST)
    assert code == 0
    assert summary(out) == {"reward": "trained"}
    assert "reward: training (forced)" in err
    manifest = json.loads((run_copy / "reward" / "alignkit_stage.json").read_text())
    assert manifest["identity"] != manifest["fingerprint"]  # the same inputs, another output
    # ppo was built on the reward model that --force replaced: the next run trains it again
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST)
    assert code == 0, err
    assert summary(out) == {"pretrain": "reused", "sft": "reused", "reward": "reused", "ppo": "trained"}
    assert "ppo: training (an upstream stage changed)" in err
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST)
    assert set(summary(out).values()) == {"reused"}  # once, not on every run


def test_a_stage_whose_upstream_was_retrained_since_is_refused_by_only(run_copy, capsys):
    # sft's own settings are unchanged, but it was built on the pretrain model that --only pretrain just replaced
    changed = "stages.pretrain.trainer.learning_rate=2e-3"
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, changed, "--only", "pretrain")
    assert code == 0 and summary(out) == {"pretrain": "trained"}, err
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, changed, "--only", "ppo")
    assert code == 2 and "Traceback" not in err
    assert (
        f"sft: {run_copy / 'sft'} was trained with other settings than this recipe gives: pretrain, which it was "
        "built on, was trained again since" in err
    )
    assert "--from sft" in err and "--accept-upstream" in err


def test_the_report_leaves_out_outputs_built_on_one_trained_again_and_stages_the_recipe_dropped(run_copy, capsys):
    changed = "stages.sft.trainer.learning_rate=2e-3"
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, changed, "--only", "sft")
    assert code == 0 and summary(out) == {"sft": "trained"}, err
    shutil.copytree(run_copy / "ppo", run_copy / "dpo")  # a dpo output left from a recipe that had the stage
    manifest = json.loads((run_copy / "dpo" / "alignkit_stage.json").read_text())
    (run_copy / "dpo" / "alignkit_stage.json").write_text(json.dumps({**manifest, "stage": "dpo"}))
    code, out, err = alignkit(capsys, "eval", TINY, f"output_dir={run_copy}", *FAST, changed)
    assert code == 0, err
    assert "eval: left out of the report: ppo: built on " in err and "alignkit run" in err
    assert "eval: left out of the report: dpo: the recipe has no dpo stage now" in err
    assert "eval: left out of the report: reward: built on sft, which was trained again since" in err
    report = json.loads((run_copy / "report.json").read_text())
    assert list(report["eval"]) == ["base", "sft"]  # the new sft alone: no ppo built on the old one
    assert report["reward_model"] is None  # nor scored by a reward model trained from the old sft


def test_a_reward_model_given_by_path_is_known_by_what_its_folder_holds(run_copy, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    given = tmp_path / "rm"
    shutil.copytree(run_copy / "reward", given)
    ppo = ["--only", "ppo", f"stages.ppo.reward_model={given}", "stages.ppo.trainer.total_episodes=16"]
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *ppo)
    assert code == 0 and summary(out) == {"ppo": "trained"}, err
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *ppo)
    assert summary(out) == {"ppo": "reused"}
    weights = load_file(given / "model.safetensors")  # the folder's model replaced: same name, other weights
    save_file({k: v + 0.01 for k, v in weights.items()}, given / "model.safetensors", metadata={"format": "pt"})
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *ppo)
    assert code == 0 and summary(out) == {"ppo": "trained"} and "its config changed" in err, err


def test_an_unreachable_hub_model_is_a_clear_error(tmp_path, capsys):
    code, out, err = alignkit(
        capsys,
        "run",
        TINY,
        f"output_dir={tmp_path / 'hub'}",
        "--only",
        "pretrain",
        "~model.config",
        "~model.tokenizer",
        "model.name_or_path=openai-community/gpt2",
    )
    assert code == 2
    assert "cannot load the tokenizer 'openai-community/gpt2'" in err and "HF_HUB_OFFLINE" in err
    assert "Traceback" not in err
    assert not (tmp_path / "hub" / "pretrain").exists()
    code, out, err = alignkit(
        capsys,
        "run",
        TINY,
        f"output_dir={tmp_path / 'hub'}",
        "--only",
        "pretrain",
        "~model.config",
        "model.name_or_path=openai-community/gpt2",
    )
    assert code == 2 and "cannot load the model 'openai-community/gpt2'" in err


def test_a_changed_tokenizer_folder_reruns_the_stage(tmp_path, capsys):
    import shutil

    from conftest import REPO

    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(REPO / "data" / "tiny" / "tokenizer", tokenizer)
    recipe = tmp_path / "pretrain.yaml"
    recipe.write_text(f"""\
output_dir: {tmp_path / "run"}
model:
  config: {{model_type: gpt2, n_layer: 1, n_head: 2, n_embd: 32, n_positions: 64}}
  tokenizer: {tokenizer}
stages:
  pretrain:
    dataset: {{path: {REPO / "data/tiny/pretrain.jsonl"}}}
    trainer: {{max_steps: 2, gradient_checkpointing: false, bf16: false}}
""")
    assert alignkit(capsys, "run", recipe)[0] == 0
    code, out, err = alignkit(capsys, "run", recipe)
    assert summary(out) == {"pretrain": "reused"}
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    (tokenizer / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 64}))
    code, out, err = alignkit(capsys, "run", recipe)
    assert summary(out) == {"pretrain": "trained"} and "its config changed" in err


def test_resume_skips_checkpoints_cut_off_mid_save(tmp_path):
    from alignkit.pipeline import last_checkpoint

    assert last_checkpoint(tmp_path / "none") == (None, [])
    # 10 and 20 whole; 30's state cut short; 40 has none; 50 lost its weights while being deleted
    for step, state, weights in [
        (10, "{}", True),
        (20, "{}", True),
        (30, '{"global_step": 3', True),
        (40, None, True),
        (50, "{}", False),
    ]:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
        (folder / "optimizer.pt").write_bytes(b"state")
        if weights:
            (folder / "model.safetensors").write_bytes(b"weights")
    resume, broken = last_checkpoint(tmp_path)
    assert resume == str(tmp_path / "checkpoint-20")
    assert broken == [tmp_path / f"checkpoint-{n}" for n in (50, 40, 30)]


def test_a_missing_upstream_stage_names_the_command_that_makes_it(tmp_path, capsys):
    """The suggested command keeps the overrides it was given (output_dir among them) and starts at the earliest
    stage that is missing."""
    out = tmp_path / "fresh"
    code, _, err = alignkit(capsys, "run", TINY, f"output_dir={out}", "seed=3", "--from", "ppo")
    assert code == 2
    assert f"ppo needs the sft stage's output, but {out / 'sft'} is missing" in err
    assert f"run it first: alignkit run {TINY} output_dir={out} seed=3 --from pretrain" in err
    assert not out.exists()
