"""A shipped recipe in miniature: what it downloads swapped for local stand-ins of the same kind, its counts scaled
down, every other setting as shipped (gradient checkpointing, normalisation, LoRA and QLoRA, bf16, num_mini_batches,
the eval section).

- The model: a GPT-2 of the recipe's architecture, scaled down (2 layers, 64 dims, a 256-token context), with the
  tokenizer in data/tiny/ (like GPT-2's: no pad token, no chat template), and peaked next-token distributions as a
  trained model has: a random model's near-uniform ones hide bugs that change which token is likely.
- The data: HH-RLHF-format rows (chosen/rejected transcripts), some longer than the stand-in's context.
- Counts: one epoch, at most 48 rows a dataset, two PPO updates.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 256
ROWS = 48  # rows read from any dataset

# A Hub model's family (a part of its id) -> the stand-in's model_type. A recipe naming another family fails the test
# until its architecture is added here.
ARCHITECTURES = {"gpt2": "gpt2"}
# Hub datasets -> the function that writes a stand-in in their format. Likewise.
DATASETS = {"Anthropic/hh-rlhf": "hh"}


def standin_model(folder: Path, model_type: str = "gpt2", peak: float = 12.0) -> Path:
    """A scaled-down model of `model_type` with the tiny tokenizer; the final norm's weight scaled by `peak`, so that
    its next-token distributions are peaked (the most likely token holds about half the mass)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    assert model_type == "gpt2", f"no stand-in for {model_type}: add one to tests/miniature.py"
    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "tiny" / "tokenizer")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        n_layer=2,
        n_head=4,
        n_embd=64,
        n_positions=CONTEXT,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.transformer.ln_f.weight *= peak
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


WORDS = (
    "the capital of zorbia is quell marnia tesk river mountain city north south old new small large bridge market "
    "road lake forest harbour tower castle garden what where which how many people live there tell me about please "
    "thank you sure here is a short answer long story about the history of its kings and queens"
).split()


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def hh_rows(path: Path, count: int = 40, long_every: int = 8, seed: int = 0) -> Path:
    """HH-RLHF rows ("chosen"/"rejected": '\\n\\nHuman: ...\\n\\nAssistant: ...' transcripts sharing all but the
    last answer); every `long_every`-th dialogue has enough turns to be longer than the stand-in's context."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(count):
            turns = 5 if i % long_every == long_every - 1 else rng.randint(1, 2)
            dialogue = ""
            for t in range(turns):
                dialogue += f"\n\nHuman: {_sentence(rng, rng.randint(4, 10))}"
                if t < turns - 1:
                    dialogue += f"\n\nAssistant: {_sentence(rng, rng.randint(6, 14))}"
            good, bad = _sentence(rng, rng.randint(4, 10)), _sentence(rng, rng.randint(4, 10))
            row = {"chosen": f"{dialogue}\n\nAssistant: {good}", "rejected": f"{dialogue}\n\nAssistant: {bad}"}
            f.write(json.dumps(row) + "\n")
    return path


def _datasets(node, key: str = ""):
    """Every dataset mapping in a recipe (a mapping with a `path`), with its key."""
    if isinstance(node, dict):
        if "path" in node and isinstance(node["path"], str):
            yield key, node
            return
        for k, v in node.items():
            yield from _datasets(v, f"{key}.{k}" if key else k)


def miniature(recipe: Path, folder: Path) -> Path:
    """Write `recipe` in miniature into `folder` (with its stand-ins) and return the new recipe's path."""
    settings = yaml.safe_load(recipe.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    model = settings.get("model", {})
    name = model.get("name_or_path")
    if name and not (REPO / name).exists():  # a Hub id
        family = next((t for part, t in ARCHITECTURES.items() if part in name.lower()), None)
        assert family, f"{recipe.name}: no stand-in architecture for {name}; add it to ARCHITECTURES"
        model["name_or_path"] = str(standin_model(folder / "model", family))
    stand_ins = {}
    for key, spec in _datasets(settings):
        if not (REPO / spec["path"]).exists():  # a Hub dataset
            kind = DATASETS.get(spec["path"])
            assert kind, f"{recipe.name}: {key}: no stand-in for the Hub dataset {spec['path']}; add it to DATASETS"
            if kind not in stand_ins:
                stand_ins[kind] = str(hh_rows(folder / f"{kind}.jsonl"))
            spec["path"] = stand_ins[kind]
        spec["max_rows"] = min(spec.get("max_rows") or ROWS, ROWS)
    for stage, block in (settings.get("stages") or {}).items():
        trainer = (block or {}).get("trainer") or {}
        if "num_train_epochs" in trainer:
            trainer["num_train_epochs"] = 1
        if "max_steps" in trainer:
            trainer["max_steps"] = min(trainer["max_steps"], 2)
        if stage == "ppo":  # two updates of the recipe's rollout batch (TRL 1.12's sizes)
            rollout = (
                trainer.get("per_device_train_batch_size", 8)
                * trainer.get("gradient_accumulation_steps", 1)
                * trainer.get("num_mini_batches", 1)
            )
            trainer["total_episodes"] = 2 * rollout
    later = ((settings.get("rounds") or {}).get("stages")) or {}  # trainer settings of later rounds, scaled alike
    for stage, trainer in later.items():
        if "num_train_epochs" in (trainer or {}):
            trainer["num_train_epochs"] = 1
        if "total_episodes" in (trainer or {}):
            trainer["total_episodes"] = settings["stages"][stage]["trainer"]["total_episodes"]
    settings["output_dir"] = str(folder / "run")
    out = folder / recipe.name
    out.write_text(yaml.safe_dump(settings, sort_keys=False))
    return out


def clean(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
