"""Every recipe in recipes/ runs in miniature through `alignkit run` (tests/miniature.py): the model and the Hub data
swapped for local stand-ins of the same kind, the counts scaled down, every other setting as shipped. A recipe added
later is covered without editing this file (as long as its model family and Hub datasets have stand-ins).

On a machine with a CUDA GPU the same test trains on it (real bf16, QLoRA's 4-bit kernels on CUDA); with two GPUs, a
second test runs each recipe with `--num-processes 2` (NCCL). CI has no GPU: `python3 -m pytest -q -n 0
tests/test_recipes_in_miniature.py` is the one command for the first machine that has one."""

import json

import pytest
import torch
import yaml
from conftest import REPO, alignkit, launched
from miniature import miniature

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
# what the miniature may change, and nothing else (key paths; `*` any one key)
SCALED = {
    "output_dir",
    "model.name_or_path",
    "stages.*.trainer.num_train_epochs",
    "stages.*.trainer.max_steps",
    "stages.*.trainer.total_episodes",
    "rounds.stages.*.num_train_epochs",
    "rounds.stages.*.total_episodes",
}


def _flat(node, key=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _flat(v, f"{key}.{k}" if key else k)
    else:
        yield key, node


def _scaled(key: str) -> bool:
    parts = key.split(".")
    if parts[-1] == "max_rows" or (parts[-1] == "path" and len(parts) > 1):  # datasets: stand-ins, fewer rows
        return True
    return any(
        len(p := pattern.split(".")) == len(parts) and all(a in ("*", b) for a, b in zip(p, parts))
        for pattern in SCALED
    )


def test_every_recipe_is_found():
    assert {"chat", "chat-dpo", "hh-gpt2", "gpt2-xl-qlora", "multi-gpu", "tiny"} <= {r.stem for r in RECIPES}


def _miniature(recipe, tmp_path):
    """The recipe in miniature, after checking that it differs from the shipped one only where it may."""
    mini = miniature(recipe, tmp_path)
    shipped, small = yaml.safe_load(recipe.read_text()), yaml.safe_load(mini.read_text())
    changed = {k for k, v in _flat(small) if dict(_flat(shipped)).get(k, "absent") != v}
    changed |= {k for k, _ in _flat(shipped) if k not in dict(_flat(small))}
    assert all(_scaled(k) for k in changed), sorted(k for k in changed if not _scaled(k))  # the rest as shipped
    return mini, shipped


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_the_recipe_runs_in_miniature(recipe, tmp_path, capsys):
    mini, shipped = _miniature(recipe, tmp_path)
    code, out, err = alignkit(capsys, "run", mini)
    assert code == 0, err[-4000:]
    assert "Traceback" not in err
    if torch.cuda.is_available():
        assert torch.cuda.max_memory_allocated() > 0  # it trained on the GPU
    _check_outputs(shipped, tmp_path / "run")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_the_recipe_runs_in_miniature_on_two_gpus(recipe, tmp_path):
    mini, shipped = _miniature(recipe, tmp_path)
    done = launched("run", mini, "--num-processes", "2", timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    _check_outputs(shipped, tmp_path / "run")
    for stage in shipped["stages"]:
        assert json.loads((tmp_path / "run" / stage / "alignkit_stage.json").read_text())["processes"] == 2


def _check_outputs(shipped: dict, run) -> None:
    """Every stage complete and loading, the first PPO update's check passed with KL and ratios ~0, the report."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from alignkit.pipeline import BEST_OF_K
    from alignkit.stages import REGISTRY
    from alignkit.stages.ppo_trainer import FIRST_UPDATE_TOLERANCE

    for stage in shipped["stages"]:
        manifest = json.loads((run / stage / "alignkit_stage.json").read_text())
        assert manifest["status"] == "complete", stage
        loader = AutoModelForSequenceClassification if REGISTRY[stage].writes == "reward_model" else None
        model = (loader or AutoModelForCausalLM).from_pretrained(run / stage)
        out = model(input_ids=torch.tensor([[5, 6, 7]]))
        assert torch.isfinite(out.logits).all(), stage
    if "ppo" in shipped["stages"]:
        history = json.loads((run / "ppo" / "metrics.json").read_text())["log_history"]
        first = next(h for h in history if "check/first_kl" in h)
        # the first update's check passed (the stage finished), and its figures say by how much
        assert first["check/first_kl"] < 1e-4  # policy and reference: one model, one kind of forward
        assert first["check/first_ratio"] < 1e-4  # the first mini-batch's ratios: 1
        assert first["check/first_sampler"] < FIRST_UPDATE_TOLERANCE["sampler"][1]
    rounds = shipped.get("rounds") or {}
    for n in range(2, rounds.get("count", 1) + 1):  # each later round: its two stages
        for stage in ("reward", "ppo"):
            assert json.loads((run / f"round-{n}" / stage / "alignkit_stage.json").read_text())["status"] == "complete"
        if rounds.get("rejection_sampling"):  # ppo started from the fine-tune on the best answers, where any was kept
            kept = json.loads((run / f"round-{n}" / "round.json").read_text())[BEST_OF_K]["kept"]
            started = json.loads((run / f"round-{n}" / "ppo" / "alignkit_stage.json").read_text())["inputs"]["model"]
            previous = run / "ppo" if n == 2 else run / f"round-{n - 1}" / "ppo"
            assert started == str(run / f"round-{n}" / BEST_OF_K if kept else previous), (n, kept, started)
    if shipped.get("eval"):
        report = json.loads((run / "report.json").read_text())
        policies = [s for s in shipped["stages"] if REGISTRY[s].policy and s != "pretrain"]  # pretrain: "base"
        assert set(policies) <= set(report["eval"]) and report["eval_prompts"] > 0
