"""The recipe's schema: one dataclass per section, each field with its help and, for a number, its range. The YAML
key path, the attribute path and the command-line override are the same string (`stages.ppo.trainer.learning_rate`).
Imports nothing of alignkit: the stages, the checks and the loader stand on it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal


@dataclass(frozen=True)
class Range:
    """What a number must be: the rule in words (for the message) and its test. A field declares its own in its
    metadata ("range"); the checks read it from there."""

    rule: str
    test: Callable[[float], bool]


def at_least(n, note: str = "") -> Range:
    return Range(f">= {n}" + (f" ({note})" if note else ""), lambda v: v >= n)


def above(n, note: str = "") -> Range:
    return Range(f"> {n}" + (f" ({note})" if note else ""), lambda v: v > n)


def between(lo, hi, right_open: bool = False) -> Range:
    text = f"in [{lo}, {hi}{')' if right_open else ']'}"
    return Range(text, lambda v: lo <= v < hi if right_open else lo <= v <= hi)


def is_template_file(chat_template: str | None) -> bool:
    """Whether model.chat_template names a file (.jinja) rather than holding a template: a template has braces."""
    return isinstance(chat_template, str) and "{" not in chat_template


def range_of(f: dataclasses.Field) -> Range | None:
    return f.metadata.get("range")


DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

# Where a model config keeps its context length, in the order models.context_length reads them.
CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length")


@dataclass
class Dataset:
    path: str = field(metadata={"help": "a local .json/.jsonl/.csv/.parquet file, or a Hugging Face Hub dataset id"})
    split: str = field(default="train", metadata={"help": "split to read (Hub datasets; local files have 'train')"})
    name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name"})
    revision: str | None = field(default=None, metadata={"help": "Hub dataset revision (branch, tag or commit)"})
    format: Literal["auto", "alpaca", "sharegpt", "hh"] = field(
        default="auto", metadata={"help": "'auto' detects TRL's formats and the alpaca/sharegpt/hh converters"}
    )
    columns: dict[str, str] = field(
        default_factory=dict, metadata={"help": "rename columns first: {expected_name: your_column}"}
    )
    max_rows: int | None = field(default=None, metadata={"help": "use only the first N rows", "range": at_least(1)})


@dataclass
class Model:
    name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local folder of a pretrained causal LM (GPT-2 style)"}
    )
    config: dict[str, Any] | None = field(
        default=None, metadata={"help": "build an untrained model instead: {model_type: gpt2, n_layer: 2, ...}"}
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "Hub id or local folder of the tokenizer (default: name_or_path)"}
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "Jinja chat template, or a .jinja file, replacing the tokenizer's own (default: the "
            "tokenizer's, else alignkit's 'User:/Assistant:' template that ends each answer with EOS)"
        },
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the model and tokenizer"})
    fused_gelu: bool = field(
        default=True,
        metadata={
            "help": "compute GPT-2's gelu_new as gelu_pytorch_tanh, the same function in one kernel (faster; "
            "saved models say so); false: keep the model's own activation modules"
        },
    )


@dataclass
class StageSettings:
    """The keys of every `stages.<stage>` section; a stage with keys of its own declares a subclass."""

    dataset: Dataset = field(metadata={"help": "the stage's data"})
    trainer: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "settings for TRL's config class of the stage (SFTConfig, "
            "RewardConfig, ...: the stage declares it)"
        },
    )
    overlength: Literal["truncate", "error"] = field(
        default="truncate", metadata={"help": "rows longer than the context: 'truncate' (with a warning) or 'error'"}
    )
    lora: dict[str, Any] | bool | None = field(
        default=None,
        metadata={"help": "this stage's LoRA settings, replacing the recipe's lora; false: train in full"},
    )
    quantization: dict[str, Any] | bool | None = field(
        default=None, metadata={"help": "this stage's quantization, replacing the recipe's; false: full precision"}
    )


@dataclass
class RewardModelSettings(StageSettings):
    """The keys of a stage that reads a reward model."""

    reward_model: str | None = field(
        default=None, metadata={"help": "a reward model folder, instead of the reward stage's output"}
    )


@dataclass
class Eval:
    dataset: Dataset = field(metadata={"help": "held-out prompts; a 'reference' column enables gold accuracy"})
    comparisons: Dataset | None = field(
        default=None, metadata={"help": "held-out comparisons (pairs or rankings): the reward model's accuracy"}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "longest answer generated", "range": at_least(1)})
    batch_size: int = field(default=64, metadata={"help": "prompts generated at once", "range": at_least(1)})
    match: Literal["exact", "contains"] = field(
        default="exact",
        metadata={
            "help": "an answer is correct when it equals ('exact') or contains the reference, "
            "ignoring case, spacing and end punctuation"
        },
    )


@dataclass
class Rounds:
    """rounds: after the stages (round 1), each later round samples answers from the newest policy, has them ranked,
    retrains the reward model on the stages' comparisons plus every round's rankings, and continues PPO from the last
    round's policy, its KL still measured against the sft model."""

    count: int = field(
        metadata={
            "help": "rounds in all, round 1 (the stages) included: 2 or more",
            "range": at_least(2, "round 1 is the stages"),
        }
    )
    prompts: Dataset = field(
        metadata={"help": "the prompts each round samples answers to (any prompt format; never the eval prompts)"}
    )
    rank_by: str = field(
        metadata={
            "help": "who ranks: a judge function (path/to/judge.py:function or package.module:function), or "
            "'people' (the run stops until the round's rankings are filled in)"
        }
    )
    k: int = field(
        default=4, metadata={"help": "answers sampled per prompt", "range": at_least(2, "a ranking needs two answers")}
    )
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature", "range": above(0)})
    top_p: float = field(
        default=1.0, metadata={"help": "nucleus sampling (1: off)", "range": Range("in (0, 1]", lambda v: 0 < v <= 1)}
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "longest answer sampled (default: the policy stage's response_length)",
            "range": at_least(1),
        },
    )
    batch_size: int = field(default=32, metadata={"help": "answers generated at once", "range": at_least(1)})
    redraws: int = field(
        default=3, metadata={"help": "times an empty or repeated answer is drawn again", "range": at_least(0)}
    )
    reward_from: Literal["start", "previous"] = field(
        default="start",
        metadata={
            "help": "what a later round's reward model trains from: 'start', what round 1's started from, afresh on "
            "all the data so far; or 'previous', the last round's reward model, trained on with the same data (and "
            "the later rounds' trainer settings, e.g. fewer epochs)"
        },
    )
    compare_previous: bool = field(
        default=False,
        metadata={
            "help": "half of each prompt's answers from the policy before the newest (in round 2, the model the "
            "policy stage started from), shuffled in blind beside the newest's, as Llama 2 sampled two model "
            "variants per prompt: whoever ranks compares the two, and a hedge or a right answer the newest lost "
            "comes back to be ranked"
        },
    )
    rejection_sampling: bool = field(
        default=False,
        metadata={
            "help": "before PPO, a later round fine-tunes the last round's policy on each prompt's best sampled "
            "answer (Llama 2's rejection sampling): one ranked 1 (among several, the round's reward model's best), "
            "trained on as the stage the policy started from trains on demonstrations (rounds.stages.<that stage> "
            "sets its trainer); PPO goes on from the result"
        },
    )
    best_min_reward: float | None = field(
        default=None,
        metadata={
            "help": "with rejection_sampling: the least score, by the round's reward model, of a best answer trained "
            "on (default: none; 0 is the demonstrations' mean where the reward stage normalises its scores, but a "
            "ranking loss leaves each prompt's level free, so a floor across prompts is only as good as the model)",
            "range": Range("a finite number", math.isfinite),
        },
    )
    train_on_prompts: bool = field(
        default=True,
        metadata={
            "help": "later rounds' policy also trains on these prompts, beside its stage's own (what it is ranked on "
            "is what it practises on, as ChatGPT's users' conversations were)"
        },
    )
    min_ranked: int | None = field(
        default=None,
        metadata={
            "help": "with rank_by: people, the prompts ranked a round needs (default: every prompt)",
            "range": at_least(1),
        },
    )
    guidelines: str | None = field(
        default=None,
        metadata={"help": "with rank_by: people, a markdown file of guidelines the labelling page shows in a panel"},
    )
    stages: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "trainer settings that differ in rounds 2 and later, by stage (of those a round retrains): "
            "{STAGE: {num_train_epochs: 4}}"
        },
    )


@dataclass
class Hub:
    repo_id: str = field(
        metadata={"help": "owner/name: the last stage pushed goes here, earlier ones to owner/name-STAGE"}
    )
    stages: list[str] | None = field(
        default=None, metadata={"help": "stages to push (default: the run's last policy stage)"}
    )
    private: bool | None = field(default=None, metadata={"help": "create the repos private (default: the Hub's)"})
    weights: Literal["merged", "adapter"] = field(
        default="merged", metadata={"help": "with lora: push full merged weights, or the adapter alone"}
    )


@dataclass
class Recipe:
    output_dir: str = field(metadata={"help": "folder for every stage's output: {output_dir}/{stage}/"})
    model: Model = field(metadata={"help": "the base model and tokenizer"})
    stages: dict[str, StageSettings] = field(metadata={"help": "an ordered selection of the stages", "keyed": True})
    seed: int = field(
        default=42, metadata={"help": "random seed, unless a trainer block sets its own", "range": at_least(0)}
    )
    lora: dict[str, Any] | None = field(
        default=None, metadata={"help": "train LoRA adapters: settings for peft.LoraConfig (r, lora_alpha, ...)"}
    )
    quantization: dict[str, Any] | None = field(
        default=None, metadata={"help": "load quantized: settings for transformers.BitsAndBytesConfig"}
    )
    eval: Eval | None = field(
        default=None,
        metadata={"help": "evaluate the run's policy checkpoints on held-out prompts after a run: report.md/json"},
    )
    hub: Hub | None = field(default=None, metadata={"help": "push models to the Hugging Face Hub at the end of a run"})
    rounds: Rounds | None = field(
        default=None,
        metadata={
            "help": "more rounds after the stages: sample from the policy, rank, retrain the reward model and "
            "the policy"
        },
    )
    source: Path = field(default=Path("<recipe>"), metadata={"yaml": False})
    # each stage's trainer config (stages.spec.Built), built when the recipe loads with its trainers checked
    configs: dict[str, Any] = field(default_factory=dict, metadata={"yaml": False})
    overrides: list[str] = field(default_factory=list, metadata={"yaml": False})  # KEY=VALUE / ~KEY it loaded with

    def to_dict(self) -> dict:
        """The resolved recipe as plain data, as it would be written in YAML."""
        return plain(self)

    def adapters(self, stage: str) -> tuple[dict | None, dict | None]:
        """The LoRA and quantization settings of a stage: its own where it sets them, else the recipe's."""
        spec = self.stages[stage]
        lora = self.lora if spec.lora is None else (spec.lora or None)
        quantization = self.quantization if spec.quantization is None else (spec.quantization or None)
        return lora, quantization

    def resolve(self, path: str) -> Path:
        """A path from the recipe: relative to the current folder, else to the recipe's folder."""
        return resolve_path(path, self.source.parent) or Path(path)


def plain(obj):
    """A recipe dataclass (or a part of one) as plain data: the keys a YAML file has, without alignkit's own."""
    if dataclasses.is_dataclass(obj):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.metadata.get("yaml", True)}
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def resolve_path(path: str, base: Path) -> Path | None:
    p = Path(path).expanduser()
    for candidate in [p] if p.is_absolute() else [Path.cwd() / p, base / p]:
        try:
            if candidate.exists():
                return candidate.resolve()
        except (OSError, ValueError):  # a name too long for the file system, or with a NUL byte: nothing there
            pass
    return None
