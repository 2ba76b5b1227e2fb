"""Recipe loading: every shipped recipe validates; bad keys, types and paths are named with file, line and fix."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY, alignkit, rerun

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path, capsys):
    code, out, err = alignkit(capsys, "validate", path)
    assert code == 0, err
    assert ": ok (" in out


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


BAD = """\
output_dir: runs/bad
model:
  name_or_path: openai-community/gpt2
stages:
  sft:
    dataset: {path: data/tiny/sft.jsonl}
    trainer:
      learing_rate: 1.0e-4
      num_train_epochs: three
  ppo:
    dataset: {path: data/missing.jsonl}
"""


def test_every_problem_is_named_at_once(tmp_path, capsys):
    path = _write(tmp_path, BAD)
    code, out, err = alignkit(capsys, "validate", path)
    assert code == 2
    assert f"{path}:8: stages.sft.trainer.learing_rate: unknown key for SFTConfig; did you mean learning_rate?" in err
    assert f"{path}:9: stages.sft.trainer.num_train_epochs: expected a number, got 'three'" in err
    assert f"{path}:11: stages.ppo.dataset.path: file not found: data/missing.jsonl" in err
    assert "stages.ppo.reward_model: ppo needs a reward model" in err
    assert "4 problems" in err


def test_overrides_are_checked_and_named_as_command_line(capsys):
    code, out, err = alignkit(
        capsys, "validate", TINY, "stages.ppo.trainer.learing_rate=1e-5", "stages.sfft.dataset.path=x"
    )
    assert code == 2
    assert (
        "command line: stages.ppo.trainer.learing_rate: unknown key for PPOConfig; did you mean learning_rate?" in err
    )
    assert "command line: stages.sfft: unknown stage; did you mean sft?" in err


def test_overrides_set_values_and_yaml_exponents_are_numbers(tmp_path):
    from alignkit.recipe import load_recipe

    recipe = load_recipe(TINY, ["output_dir=/tmp/x", "stages.ppo.trainer.learning_rate=1e-5", "seed=7"])
    assert recipe.output_dir == "/tmp/x" and recipe.seed == 7
    assert recipe.stages["ppo"].trainer["learning_rate"] == 1e-5  # YAML 1.1 reads "1e-5" as a string


def test_wrong_types_unknown_keys_and_stage_order(tmp_path, capsys):
    path = _write(
        tmp_path,
        """\
output_dir: 3
seed: many
modle: {}
model:
  config: {model_type: gpt2, n_layr: 2}
stages:
  ppo:
    dataset: {path: data/tiny/ppo.jsonl}
    reward_model: data/no/such/model
  sft:
    dataset: {path: data/tiny/sft.jsonl, format: csv}
    overlength: cut
""",
    )
    code, out, err = alignkit(capsys, "validate", path)
    assert code == 2
    for needle in (
        "output_dir: expected a string, got 3",
        "seed: expected an integer, got 'many'",
        "modle: unknown key for a recipe; did you mean model?",
        "model.config.n_layr: unknown key for gpt2's config; did you mean n_layer?",
        "model.tokenizer: required with model.config",
        "stages: stages run in the order pretrain -> sft -> reward -> ppo",
        "stages.ppo.reward_model: folder not found: data/no/such/model",
        "stages.sft.dataset.format: expected one of 'auto', 'alpaca', 'sharegpt', 'hh', got 'csv'",
        "stages.sft.overlength: expected one of 'truncate', 'error', got 'cut'",
    ):
        assert needle in err, needle


def test_reserved_and_inconsistent_trainer_settings(capsys):
    code, out, err = alignkit(capsys, "validate", TINY, "stages.sft.trainer.output_dir=/tmp/y")
    assert code == 2
    assert "stages.sft.trainer.output_dir: set by alignkit" in err
    # the config class is built at load time, so its own checks run before any model loads
    code, out, err = alignkit(capsys, "validate", TINY, "stages.sft.trainer.lr_scheduler_type=sideways")
    assert code == 2 and "stages.sft.trainer: SFTConfig rejected these settings" in err and "sideways" in err


def test_ppo_batch_sizes_mean_what_they_meant_in_trl_and_are_checked_before_anything_trains(tmp_path, capsys):
    """TRL 1.12's PPOConfig: a rollout batch is num_mini_batches mini-batches of per_device_train_batch_size x
    gradient_accumulation_steps responses; whitening, which needs 8 of them, is checked with the recipe, so a run
    with too few trains nothing."""
    from alignkit.stages.ppo_trainer import PPOConfig

    args = PPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_mini_batches=3,
    )
    assert args.batch_sizes() == (24, 8, 4)  # TRL: local_batch_size, local_mini_batch_size, micro-batch
    code, _, err = alignkit(capsys, "validate", TINY, "stages.ppo.trainer.num_mini_batches=3")
    assert code == 0, err  # any split: mini-batches are whole
    out = tmp_path / "run"
    code, _, err = alignkit(
        capsys,
        "run",
        TINY,
        f"output_dir={out}",
        "stages.ppo.trainer.per_device_train_batch_size=2",
        "stages.ppo.trainer.whiten_rewards=true",
    )
    assert code == 2 and "stages.ppo.trainer.whiten_rewards: whitening needs rollout batches of at least 8" in err
    assert "these have 2" in err
    assert not out.exists()


def test_bad_yaml_names_the_line(tmp_path, capsys):
    path = _write(tmp_path, "output_dir: x\nstages: [\n")
    code, out, err = alignkit(capsys, "validate", path)
    assert code == 2 and f"{path}:" in err and "not valid YAML" in err


def test_errors_exit_2_without_traceback(tmp_path):
    path = _write(tmp_path, BAD)
    proc = subprocess.run(
        [sys.executable, "-m", "alignkit", "run", str(path)], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "learing_rate" in proc.stderr
    assert not (REPO / "runs" / "bad").exists()


HARDWARE = ["hh-gpt2.yaml", "gpt2-xl-qlora.yaml", "multi-gpu.yaml"]


@pytest.mark.parametrize("name", HARDWARE)
def test_hardware_recipes_validate_offline_and_say_what_they_need(name, capsys):
    """HF_HUB_OFFLINE is set for the whole suite (conftest): a download attempt would fail validation."""
    path = REPO / "recipes" / name
    code, out, err = alignkit(capsys, "validate", path)
    assert code == 0, err
    assert "Hub datasets, read when the recipe runs: stages.sft.dataset (Anthropic/hh-rlhf)" in out
    header = path.read_text().split("\noutput_dir:")[0]
    assert "Hardware:" in header and "Expected peak" in header and "Derived, not measured" in header


def test_accelerate_configs_load_with_accelerates_own_reader():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for path in sorted((REPO / "recipes" / "accelerate").glob("*.yaml")):
        config = load_config_from_file(str(path))
        kinds[path.stem] = (
            str(config.distributed_type).split(".")[-1],
            (config.deepspeed_config or {}).get("zero_stage"),
        )
    assert kinds == {
        "ddp": ("MULTI_GPU", None),
        "zero2": ("DEEPSPEED", 2),
        "zero3": ("DEEPSPEED", 3),
        "fsdp": ("FSDP", None),
    }


def test_stages_may_set_their_own_lora_and_quantization(capsys):
    code, out, err = alignkit(
        capsys,
        "validate",
        TINY,
        "lora.r=8",
        "stages.reward.lora=false",
        "stages.ppo.lora.r=4",
        "stages.ppo.lora.lora_alpah=8",
        "stages.sft.quantization=true",
        "stages.ppo.quantization.load_in_4bit=true",
        "stages.ppo.trainer.bf16=true",
    )
    assert code == 2
    assert "stages.ppo.lora.lora_alpah: unknown key for LoraConfig; did you mean lora_alpha?" in err
    assert "stages.sft.quantization: expected a mapping of settings, or false" in err
    from alignkit.recipe import load_recipe

    recipe = load_recipe(
        TINY,
        [
            "lora.r=8",
            "stages.reward.lora=false",
            "stages.ppo.lora.r=4",
            "stages.ppo.quantization.load_in_4bit=true",
            "stages.ppo.trainer.bf16=true",
        ],
    )
    assert recipe.adapters("sft") == ({"r": 8}, None)
    assert recipe.adapters("reward") == (None, None)
    assert recipe.adapters("ppo") == ({"r": 4}, {"load_in_4bit": True})
    code, out, err = alignkit(capsys, "validate", TINY, "stages.ppo.quantization.load_in_4bit=true")
    assert code == 2 and "stages.ppo.quantization: the ppo stage would train quantized weights in full" in err


def test_hub_ids_and_local_paths_are_told_apart():
    from alignkit.preflight import is_hub_id, is_repo_id

    assert is_hub_id("openai-community/gpt2") and is_hub_id("EleutherAI/pythia-1.4b") and is_hub_id("gpt2")
    assert not is_hub_id("data/tiny/sft.jsonl")  # exists here
    assert not any(is_hub_id(p) for p in ("runs/chat/sft", "./model", "~/model", "prompts.jsonl", "x/y.parquet"))
    assert is_repo_id("alice/tiny") and not any(is_repo_id(r) for r in ("tiny", "a/b/c", "/tiny", "alice/"))


def test_lora_targets_are_checked_against_the_models_modules(capsys):
    """Llama's names on GPT-2 match nothing: validate says so, with the names GPT-2 has, before any model loads."""
    code, out, err = alignkit(capsys, "validate", TINY, "lora.r=4", "lora.target_modules=[q_proj,v_proj]")
    assert code == 2 and "Traceback" not in err
    assert "lora.target_modules: 'q_proj' matches no module of this gpt2 model" in err
    assert "'v_proj' matches no module" in err and "c_attn" in err
    code, out, err = alignkit(capsys, "validate", TINY, "lora.r=4", "lora.target_modules=[c_atn]")
    assert code == 2 and "did you mean c_attn?" in err
    code, out, err = alignkit(capsys, "validate", TINY, "stages.sft.lora={r: 4, target_modules: [ln_f]}")
    assert code == 2 and "stages.sft.lora.target_modules: 'ln_f' names LayerNorm modules, which LoRA cannot" in err
    code, out, err = alignkit(capsys, "validate", TINY, "lora.r=4", "lora.target_modules=[c_attn,c_proj]")
    assert code == 0, err
    code, out, err = alignkit(capsys, "validate", TINY, "lora.r=4", "lora.target_modules=.*attn\\.c_(attn|proj)")
    assert code == 0, err


def test_lora_targets_that_only_loading_finds_wrong_are_a_message(run_copy, capsys, monkeypatch):
    """Where validate cannot build the model (a Hub model, here simulated), peft's refusal becomes exit 2 naming the
    key, not its traceback."""
    from conftest import FAST

    from alignkit import lora_targets

    def unknown(config):
        raise OSError("not reachable")

    monkeypatch.setattr(lora_targets, "layer_names", unknown)
    code, out, err = rerun(
        capsys,
        run_copy,
        "sft",
        *FAST,
        "~eval",
        "lora.r=4",
        "lora.target_modules=[q_proj,v_proj]",
    )
    assert code == 2 and "Traceback" not in err
    assert "sft: the LoRA target_modules ['q_proj', 'v_proj'] match no module of this model" in err
