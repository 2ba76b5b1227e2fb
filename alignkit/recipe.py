"""The recipe: a small typed schema for one YAML file, loaded and checked all at once.

The YAML key path, the attribute path in code and the command-line override are the same string
(`stages.ppo.trainer.learning_rate`). A stage's `trainer:` block is handed to TRL's own config class and checked
against it here, so a typo fails before any model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from .errors import Problem, RecipeError

DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Where a model config keeps its context length, in the order models.context_length reads them.
CONTEXT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length")

# What numeric settings must be, alignkit's and TRL's alike: key -> (the rule in words, the test). Out of range they
# fail only once their stage starts, after the earlier stages have trained, or train silently wrong (epochs -1 trains
# nothing, total_episodes 0 skips PPO). A rule applies wherever its key occurs: a recipe field or a trainer block.
RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "seed": (">= 0", lambda v: v >= 0),
    "max_new_tokens": (">= 1", lambda v: v >= 1),
    "batch_size": (">= 1", lambda v: v >= 1),
    "max_rows": (">= 1", lambda v: v >= 1),
    "learning_rate": ("> 0", lambda v: v > 0),
    "per_device_train_batch_size": (">= 1", lambda v: v >= 1),
    "per_device_eval_batch_size": (">= 1", lambda v: v >= 1),
    "gradient_accumulation_steps": (">= 1", lambda v: v >= 1),
    "num_train_epochs": ("> 0 (0 or less trains nothing)", lambda v: v > 0),
    "max_steps": ("-1 (train num_train_epochs) or >= 1", lambda v: v == -1 or v >= 1),
    "total_episodes": (">= 1 (0 skips PPO)", lambda v: v >= 1),
    "response_length": (">= 1", lambda v: v >= 1),
    "kl_coef": (">= 0", lambda v: v >= 0),
    "num_mini_batches": (">= 1 (PPO splits each rollout batch into this many)", lambda v: v >= 1),
    "num_ppo_epochs": (">= 1", lambda v: v >= 1),
    "local_rollout_forward_batch_size": (">= 1", lambda v: v >= 1),
    "temperature": ("> 0", lambda v: v > 0),
    "cliprange": ("> 0", lambda v: v > 0),
    "cliprange_value": ("> 0", lambda v: v > 0),
    "vf_coef": (">= 0", lambda v: v >= 0),
    "gamma": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "lam": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "max_length": (">= 1", lambda v: v >= 1),
    "logging_steps": ("> 0", lambda v: v > 0),
    "save_steps": ("> 0", lambda v: v > 0),
    "eval_steps": ("> 0", lambda v: v > 0),
    "warmup_ratio": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "warmup_steps": (">= 0 (below 1: a share of the steps)", lambda v: v >= 0),
    "weight_decay": (">= 0", lambda v: v >= 0),
    "max_grad_norm": (">= 0", lambda v: v >= 0),
    "num_sample_generations": (">= 0", lambda v: v >= 0),
    "r": (">= 1 (LoRA's rank)", lambda v: v >= 1),
    "lora_alpha": ("> 0", lambda v: v > 0),
    "lora_dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
}


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
    max_rows: int | None = field(default=None, metadata={"help": "use only the first N rows"})


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


def _example_stage() -> str:
    """A stage for examples in messages: the first that fine-tunes a pretrained model."""
    from .stages import ORDER

    return next(s.name for s in ORDER if not s.from_scratch)


def stage_settings(name: str) -> type | None:
    """The schema of `stages.<name>`, as the stage declares it; None for a name that is not a stage."""
    from .stages import REGISTRY

    return REGISTRY[name].settings if isinstance(name, str) and name in REGISTRY else None


@dataclass
class Eval:
    dataset: Dataset = field(metadata={"help": "held-out prompts; a 'reference' column enables gold accuracy"})
    comparisons: Dataset | None = field(
        default=None, metadata={"help": "held-out comparisons (pairs or rankings): the reward model's accuracy"}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "longest answer generated"})
    batch_size: int = field(default=64, metadata={"help": "prompts generated at once"})
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

    count: int = field(metadata={"help": "rounds in all, round 1 (the stages) included: 2 or more"})
    prompts: Dataset = field(
        metadata={"help": "the prompts each round samples answers to (any prompt format; never the eval prompts)"}
    )
    rank_by: str = field(
        metadata={
            "help": "who ranks: a judge function (path/to/judge.py:function or package.module:function), or "
            "'people' (the run stops until the round's rankings are filled in)"
        }
    )
    k: int = field(default=4, metadata={"help": "answers sampled per prompt"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling (1: off)"})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "longest answer sampled (default: stages.ppo.trainer.response_length)"}
    )
    batch_size: int = field(default=32, metadata={"help": "answers generated at once"})
    redraws: int = field(default=3, metadata={"help": "times an empty or repeated answer is drawn again"})
    train_on_prompts: bool = field(
        default=True,
        metadata={
            "help": "later rounds' policy also trains on these prompts, beside its stage's own (what it is ranked on "
            "is what it practises on, as ChatGPT's users' conversations were)"
        },
    )
    min_ranked: int | None = field(
        default=None, metadata={"help": "with rank_by: people, the rankings a round needs (default: every prompt)"}
    )
    guidelines: str | None = field(
        default=None,
        metadata={"help": "with rank_by: people, a markdown file of guidelines the labelling page shows in a panel"},
    )
    stages: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "trainer settings that differ in rounds 2 and later, by stage (of the two a round retrains): "
            "{STAGE: {num_train_epochs: 4}}"
        },
    )


def round_stages(recipe: Recipe) -> tuple[str | None, str | None]:
    """(the stage a later round continues, the reward stage it reads), as the stages declare them; None where the
    recipe lacks one."""
    from .stages import ORDER

    names = list(recipe.stages or {})
    policy = next((s.name for s in ORDER if s.rounds and s.name in names), None)
    if policy is None:
        return None, None
    makers = [s.name for s in ORDER if s.writes == "reward_model" and s.name in names[: names.index(policy)]]
    return policy, (makers[-1] if makers else None)


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
    stages: dict[str, StageSettings] = field(
        metadata={"help": "an ordered selection of the stages", "schema_by_key": stage_settings}
    )
    seed: int = field(default=42, metadata={"help": "random seed, unless a trainer block sets its own"})
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


# --- loading ----------------------------------------------------------------------------------------------------


def load_recipe(path: str | os.PathLike, overrides: list[str] = (), check_trainers: bool = True) -> Recipe:
    """Read, override and check a recipe; raise RecipeError listing every problem found."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        hint = (
            "; to set a recipe key, write KEY=VALUE (e.g. seed=1)" if not path.suffix and "/" not in str(path) else ""
        )
        raise RecipeError(str(path), [Problem("", f"cannot read the recipe: {e.strerror}{hint}")]) from None
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark, as some editors write, is harmless
    except UnicodeDecodeError as e:
        line, what = utf8_error(data, e)
        raise RecipeError(str(path), [Problem("", what, where=f"line {line}")]) from None
    duplicates: list[Problem] = []
    try:
        raw = yaml.safe_load(text)
        lines = _line_map(text, duplicates)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else None
        raise RecipeError(
            str(path),
            [
                Problem(
                    "",
                    f"not valid YAML: {getattr(e, 'problem', e)}; fix the syntax there "
                    "(indentation, a missing colon or closing bracket, quotes)",
                    where=where,
                )
            ],
        ) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise RecipeError(
            str(path), [Problem("", "nested too deeply to read; a recipe is a few levels of mappings")]
        ) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(
            str(path),
            [
                Problem(
                    "",
                    "expected a mapping of keys (output_dir, model, stages, ...); write "
                    "the recipe as `key: value` lines, as recipes/tiny.yaml does",
                )
            ],
        )

    problems: list[Problem] = duplicates  # PyYAML keeps the last of two equal keys without a word
    overridden = set()
    for item in overrides:
        key = _apply_override(raw, item, problems)
        if key:
            overridden.add(key)
    recipe = _build(Recipe, raw, "", problems)
    if recipe is not None:
        recipe.source, recipe.overrides = path, list(overrides)
        _check(recipe, problems, check_trainers)
    for p in problems:
        if p.where is None and any(
            p.key == k or p.key.startswith(k + ".") or (k.startswith(p.key + ".") and p.key not in lines)
            for k in overridden
        ):
            p.where = "command line"
        elif p.where is None:
            p.where = _nearest_line(lines, p.key)
    if problems:
        raise RecipeError(str(path), problems)
    return recipe


def _apply_override(raw: dict, item: str, problems: list[Problem]) -> str | None:
    """Apply `a.b.c=value` (value read as YAML) or `~a.b.c` (remove the key) to the raw recipe."""
    remove = item.startswith("~") and "=" not in item
    key, sep, value = (item[1:], "", "") if remove else item.partition("=")
    if not (sep or remove) or not key or any(not part for part in key.split(".")):
        problems.append(
            Problem(
                "",
                f"override {item!r} is not KEY=VALUE or ~KEY with a dotted key, e.g. "
                "stages.ppo.trainer.learning_rate=1e-5",
                where="command line",
            )
        )
        return None
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            problems.append(
                Problem(
                    ".".join(parts[: i + 1]),
                    f"is {child!r}, not a mapping, so {key} cannot be set",
                    where="command line",
                )
            )
            return None
        node = child
    if remove:
        if parts[-1] not in node:
            problems.append(Problem(key, "cannot remove it: the recipe does not set it", where="command line"))
            return None
        del node[parts[-1]]
    else:
        node[parts[-1]] = parsed
    return key


def _build(cls, data, key: str, problems: list[Problem]):
    """Turn a mapping into the dataclass `cls`, recording a problem for every unknown, missing or mistyped key."""
    if not isinstance(data, dict):
        problems.append(Problem(key, f"expected a mapping, got {_show(data)}; {_mapping_hint(cls, key, data)}"))
        return None
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}
    hints = typing.get_type_hints(cls)
    _unknown_keys(data, fields, key, cls.__name__ if key else "a recipe", problems)
    values = {}
    for name, f in fields.items():
        sub = f"{key}.{name}" if key else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(Problem(sub, f"required: {f.metadata.get('help', '')}"))
            continue
        value, tp = data[name], hints[name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if (
            typing.get_origin(tp) in (typing.Union, types.UnionType)
            and len(inner) == 1
            and dataclasses.is_dataclass(inner[0])
        ):
            tp = inner[0] if value is not None else type(None)  # an optional section
        if tp is type(None):
            pass
        elif dataclasses.is_dataclass(tp):
            value = _build(tp, value, sub, problems)
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            if not isinstance(value, dict):
                problems.append(
                    Problem(
                        sub,
                        f"expected a mapping of stage names to their settings, got "
                        f"{_show(value)}; e.g. {name}: {{{_example_stage()}: {{dataset: {{path: "
                        f"data/{_example_stage()}.jsonl}}}}}}",
                    )
                )
                continue
            schema = f.metadata.get("schema_by_key", lambda k: typing.get_args(tp)[1])
            # a key without a schema (an unknown stage) is reported by _check; its value is kept unbuilt
            value = {k: _build(schema(k), v, f"{sub}.{k}", problems) if schema(k) else None for k, v in value.items()}
        else:
            start = len(problems)
            value = check_value(value, tp, sub, problems, f.metadata.get("help", ""))
            if len(problems) == start:
                check_range(name, value, sub, problems, f.default)
        values[name] = value
    try:
        return cls(**values)
    except TypeError:  # a required field was missing: already reported
        return None


def _mapping_hint(cls, key: str, value) -> str:
    """How to write a section given as a scalar or a list: `model: gpt2` -> `model: {name_or_path: gpt2}`."""
    leaf = key.rpartition(".")[2] or "it"
    names = [f.name for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)]
    if not isinstance(value, str):
        return f"give {leaf} its keys, one per line below it: {', '.join(names)}"
    example, inner = value, cls
    nesting = []
    while dataclasses.is_dataclass(inner):  # the first field, as far down as it goes: {dataset: {path: x}}
        first = dataclasses.fields(inner)[0]
        nesting.append(first.name)
        inner = typing.get_type_hints(inner)[first.name]
    for name in reversed(nesting):
        example = f"{{{name}: {example}}}"
    return f"write it as {leaf}: {example} (its keys: {', '.join(names)})"


def check_range(name: str, value, key: str, problems: list[Problem], default=None) -> None:
    """Check a number against its rule in RANGES (a key without a rule, and a value of the wrong type, pass)."""
    rule = RANGES.get(name)
    if rule is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return  # not a rule's key, or a type or non-finite problem reported on its own
    if not rule[1](value):
        known = default not in (None, dataclasses.MISSING)
        problems.append(
            Problem(
                key,
                f"must be {rule[0]}, got {value!r}; set a value in that range, or remove the key "
                f"to get the default{f' ({default!r})' if known else ''}",
            )
        )


def _non_finite(value, seen: set[int] | None = None) -> bool:
    """Whether a number in value (nested in mappings and lists too) is NaN or infinite, as YAML's .nan and .inf are.
    A collection that YAML aliases several times is looked at once."""
    if isinstance(value, float):
        return not math.isfinite(value)
    seen = set() if seen is None else seen
    if id(value) in seen:
        return False
    seen.add(id(value))
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return any(_non_finite(v, seen) for v in items)


def _unknown_keys(data: dict, known, key: str, owner: str, problems: list[Problem]) -> None:
    for name in data:
        if name not in known:
            hint = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
            fix = f"did you mean {hint[0]}?" if hint else f"known keys: {', '.join(sorted(map(str, known)))}"
            problems.append(Problem(f"{key}.{name}" if key else str(name), f"unknown key for {owner}; {fix}"))


def check_value(value, tp, key: str, problems: list[Problem], about: str = ""):
    """Check `value` against the annotation `tp`; a number written as a string (YAML reads 1e-5 so) becomes a float.
    `about` says what the key is, for the message."""
    if _accepts(float, tp) and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if not _fits(value, tp):
        wanted = _describe(tp)
        problems.append(
            Problem(
                key,
                f"expected {wanted}, got {_show(value)}; write {wanted.removesuffix(' (or null)')} "
                f"here{f' ({about})' if about else ''}",
            )
        )
    return value


def _accepts(target, tp) -> bool:
    if tp is target:
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and target in typing.get_args(tp)


def _fits(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp in (list, tuple) or origin in (list, tuple):
        return isinstance(value, list) and (origin is not list or not args or all(_fits(v, args[0]) for v in value))
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value in {m.value for m in tp} or value in tp.__members__
    return True  # an annotation we do not model: the owning class checks it


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        text = " or ".join(dict.fromkeys(parts))
        return text + (" (or null)" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    names = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        dict: "a mapping",
        list: "a list",
        tuple: "a list",
    }
    return names.get(tp) or names.get(origin) or getattr(tp, "__name__", str(tp))


def _show(value) -> str:
    text = (
        repr(value) if not isinstance(value, (dict, list)) else yaml.safe_dump(value, default_flow_style=True).strip()
    )
    return (text[:60] + "...") if len(text) > 60 else text


# --- whole-recipe checks ----------------------------------------------------------------------------------------


def _check(recipe: Recipe, problems: list[Problem], check_trainers: bool) -> None:
    """Every check that needs no model loaded. Values of the wrong type are already reported, so each check here
    looks only at values of the type it expects (a section given as a scalar arrives as None)."""
    base = recipe.source.parent
    m = recipe.model
    context = None  # (the model's context length, where it comes from), where it is known without a download
    if isinstance(m, Model):
        if (m.name_or_path is None) == (m.config is None):
            problems.append(
                Problem(
                    "model",
                    "set exactly one of model.name_or_path (a pretrained model) and "
                    "model.config (an untrained model built from a config)",
                )
            )
        if m.config is not None and m.tokenizer is None:
            problems.append(Problem("model.tokenizer", "required with model.config: a tokenizer folder or Hub id"))
        _check_local(m.name_or_path, "model.name_or_path", base, problems, folder="a model folder (with config.json)")
        _check_local(m.tokenizer, "model.tokenizer", base, problems, folder="a tokenizer folder")
        if isinstance(m.chat_template, str):
            if "{" not in m.chat_template:
                _check_local(
                    m.chat_template,
                    "model.chat_template",
                    base,
                    problems,
                    always_local=True,
                    suffixes=(".jinja", ".j2"),
                )
            _check_chat_template(m.chat_template, base, problems)
        if isinstance(m.config, dict):
            context = _check_model_config(m.config, problems)
        elif isinstance(m.name_or_path, str) and (local := resolve_path(m.name_or_path, base)) and local.is_dir():
            context = _check_local_model(local, problems)

    if isinstance(recipe.output_dir, str):
        out = Path(recipe.output_dir).expanduser()
        blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            problems.append(
                Problem(
                    "output_dir",
                    f"{blocker} is a file, but the run's folder {out} must be a folder "
                    "(it is made if missing); choose another output_dir",
                )
            )

    from .stages import NAMES, REGISTRY

    names = list(recipe.stages)
    for name in names:
        if name not in REGISTRY:
            hint = difflib.get_close_matches(str(name), NAMES, n=1)
            problems.append(
                Problem(
                    f"stages.{name}",
                    "unknown stage; " + (f"did you mean {hint[0]}?" if hint else f"stages are {', '.join(NAMES)}"),
                )
            )
    known = [n for n in names if n in REGISTRY]
    if known != sorted(known, key=NAMES.index):
        problems.append(
            Problem("stages", f"stages run in the order {' -> '.join(NAMES)}; list them so (got {', '.join(known)})")
        )
    if not names:
        problems.append(Problem("stages", "no stages: name at least one of " + ", ".join(NAMES)))
    if isinstance(m, Model) and m.config is not None and known and not REGISTRY[known[0]].from_scratch:
        first = next((s.name for s in REGISTRY.values() if s.from_scratch), "a stage that trains from scratch")
        problems.append(
            Problem(
                "model.config",
                f"builds an untrained model, which only a {first} stage trains, but "
                f"this recipe starts with {known[0]}; add a {first} stage before it, "
                "or replace model.config with model.name_or_path (a pretrained model)",
            )
        )
    for name in known:
        stage, declared = recipe.stages[name], REGISTRY[name]
        if stage is None:
            continue
        key = f"stages.{name}"
        if stage.dataset is not None:
            _check_local(stage.dataset.path, f"{key}.dataset.path", base, problems)
        if declared.more_data is not None:
            for more, spec, _ in declared.more_data(recipe, stage):
                if more.startswith(key) and isinstance(spec, Dataset):  # another stage's is checked there
                    _check_local(spec.path, f"{more}.path", base, problems)
        given = getattr(stage, "reward_model", None)
        if given is not None:
            _check_local(
                given, f"{key}.reward_model", base, problems, folder="a reward model folder (a reward stage's output)"
            )
            local = resolve_path(given, base) if isinstance(given, str) else None
            if local is not None and local.is_dir() and not (local / "config.json").is_file():
                problems.append(
                    Problem(
                        f"{key}.reward_model",
                        f"{given} holds no config.json, so it is not a model "
                        "folder; give a reward stage's output folder",
                    )
                )
        elif declared.reward_model and not any(
            REGISTRY[n].writes == "reward_model" for n in known[: known.index(name)]
        ):
            makers = [s.name for s in REGISTRY.values() if s.writes == "reward_model"]
            problems.append(
                Problem(
                    f"{key}.reward_model",
                    f"{name} needs a reward model: add a {' or '.join(makers)} "
                    f"stage before it, or set {key}.reward_model to a trained one",
                )
            )
        if check_trainers and isinstance(stage.trainer, dict):
            from .stages.spec import build_config

            built = build_config(declared, recipe, stage.trainer, context, problems)
            if built is not None:
                recipe.configs[name] = built
    if recipe.eval is not None:
        for key in ("dataset", "comparisons"):
            spec = getattr(recipe.eval, key)
            if spec is not None:
                _check_local(spec.path, f"eval.{key}.path", base, problems)
        if context and isinstance(recipe.eval.max_new_tokens, int) and recipe.eval.max_new_tokens >= context[0]:
            problems.append(
                Problem(
                    "eval.max_new_tokens",
                    f"{recipe.eval.max_new_tokens} tokens leave no room for a prompt in the model's context of "
                    f"{context[0]} tokens ({context[1]}); set it below {context[0]}, with room for the prompts",
                )
            )
    if recipe.hub is not None:
        _check_hub(recipe, known, problems)
    if isinstance(recipe.rounds, Rounds):
        _check_rounds(recipe, recipe.rounds, base, problems, check_trainers)
    blocks = [("lora", recipe.lora), ("quantization", recipe.quantization)]
    blocks += [
        (f"stages.{n}.{k}", getattr(recipe.stages[n], k))
        for n in known
        if recipe.stages[n]
        for k in ("lora", "quantization")
    ]
    for key, value in blocks:
        if value is True:
            problems.append(Problem(key, "expected a mapping of settings, or false to turn it off for this stage"))
        elif isinstance(value, dict) and check_trainers:
            if key.endswith("lora"):
                from peft import LoraConfig

                check_config_class(
                    LoraConfig, value, key, problems, reserved={"task_type": "set by each stage"}, ranges=True
                )
            else:
                _check_quantization(value, problems, key)
    if any(value is True for _, value in blocks):
        return
    for name in known:
        stage = recipe.stages[name]
        if stage is None or (REGISTRY[name].from_scratch and isinstance(m, Model) and m.config is not None):
            continue  # training from scratch trains every weight, unquantized
        lora, quantization = recipe.adapters(name)
        if not isinstance(quantization, dict):
            continue  # none, or of a wrong type that is reported already
        where = f"stages.{name}.quantization" if stage.quantization else "quantization"
        if lora is None:
            problems.append(
                Problem(
                    where,
                    f"the {name} stage would train quantized weights in full, which cannot be "
                    "done; give it LoRA settings to train adapters over them (QLoRA)",
                )
            )
        if isinstance(stage.trainer, dict) and stage.trainer.get("bf16") is False:
            problems.append(
                Problem(
                    f"stages.{name}.trainer.bf16",
                    "with quantization TRL casts the LoRA "
                    "adapters to bf16 (as QLoRA does), so training needs bf16 on; remove bf16: false",
                )
            )
    if check_trainers:
        _check_lora_targets(recipe, known, base, problems)


def _check_lora_targets(recipe: Recipe, known: list[str], base: Path, problems: list[Problem]) -> None:
    """Each LoRA block's target_modules against the module names of the model it adapts (built on the meta device
    from model.config or a local model's config.json; a Hub model is checked when it loads)."""
    from . import lora_targets
    from .stages import REGISTRY

    m = recipe.model
    blocks = []
    for name in known:
        stage = recipe.stages[name]
        if stage is None or (REGISTRY[name].from_scratch and isinstance(m, Model) and m.config is not None):
            continue
        lora, _ = recipe.adapters(name)
        if isinstance(lora, dict):
            blocks.append((f"stages.{name}.lora" if isinstance(stage.lora, dict) else "lora", lora))
    if not blocks or not isinstance(m, Model):
        return
    try:
        from transformers import AutoConfig

        if isinstance(m.config, dict) and isinstance(m.config.get("model_type"), str):
            settings = {k: v for k, v in m.config.items() if k != "model_type"}
            config = AutoConfig.for_model(m.config["model_type"], **settings)
        elif isinstance(m.name_or_path, str) and (local := resolve_path(m.name_or_path, base)) and local.is_dir():
            config = AutoConfig.from_pretrained(local)
        else:
            return
        layers = lora_targets.layer_names(config)
    except Exception:  # a config the checks above refuse already, or one only the real load can judge
        return
    seen = set()
    for key, lora in blocks:
        if key in seen:
            continue
        seen.add(key)
        lora_targets.check(lora.get("target_modules"), layers, config.model_type, f"{key}.target_modules", problems)


def round_overrides(rounds: Rounds) -> list[str]:
    """rounds.stages as the overrides that make a later round's recipe (values as JSON, which YAML reads)."""
    return [
        f"stages.{stage}.trainer.{key}={json.dumps(value)}"
        for stage, settings in sorted(rounds.stages.items())
        if isinstance(settings, dict)
        for key, value in settings.items()
    ]


def round_recipe(recipe: Recipe, more: list[str] = ()) -> Recipe:
    """The recipe rounds 2 and later train with: the stages' settings with rounds.stages and `more` overrides applied
    (and no rounds)."""
    return load_recipe(recipe.source, [*recipe.overrides, *round_overrides(recipe.rounds), *more, "~rounds"])


def _check_rounds(recipe: Recipe, rounds: Rounds, base: Path, problems: list[Problem], check_trainers: bool) -> None:
    """A rounds section: what it needs of the stages, its judge, its sampling settings and its trainer settings."""
    from .stages import ORDER

    policy, reward = round_stages(recipe)
    if policy is None or reward is None:
        wanted = [s.name for s in ORDER if s.rounds] + [s.name for s in ORDER if s.writes == "reward_model"]
        problems.append(
            Problem(
                "rounds",
                f"later rounds retrain a reward model and the policy trained against it ({' and '.join(wanted)}); "
                "the recipe lacks one of them: add it, or remove rounds",
            )
        )
    retrained = [name for name in (reward, policy) if name]
    for name in retrained:
        if isinstance(recipe.stages[name], StageSettings):
            lora, quantization = recipe.adapters(name)
            if lora or quantization:
                problems.append(
                    Problem(
                        "rounds",
                        f"rounds with LoRA or quantization in the {name} stage are not supported yet (a later "
                        "round would continue an adapter); train the stages in full, or remove rounds",
                    )
                )
    if policy and getattr(recipe.stages[policy], "reward_model", None):
        problems.append(
            Problem(
                f"stages.{policy}.reward_model",
                f"with rounds, {policy} reads each round's own reward model, retrained on its rankings; remove "
                f"stages.{policy}.reward_model, or remove rounds",
            )
        )
    for key, value, rule, ok in (
        ("count", rounds.count, "2 or more (round 1 is the stages)", lambda v: v >= 2),
        ("k", rounds.k, "2 or more: a ranking needs two answers", lambda v: v >= 2),
        ("temperature", rounds.temperature, "> 0", lambda v: v > 0),
        ("top_p", rounds.top_p, "in (0, 1]", lambda v: 0 < v <= 1),
        ("max_new_tokens", rounds.max_new_tokens, ">= 1", lambda v: v >= 1),
        ("batch_size", rounds.batch_size, ">= 1", lambda v: v >= 1),
        ("redraws", rounds.redraws, ">= 0", lambda v: v >= 0),
        ("min_ranked", rounds.min_ranked, ">= 1", lambda v: v >= 1),
    ):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not ok(value):
            problems.append(Problem(f"rounds.{key}", f"{value} is out of range: give {rule}"))
    if isinstance(rounds.prompts, Dataset):
        _check_local(rounds.prompts.path, "rounds.prompts.path", base, problems)
    if isinstance(rounds.rank_by, str) and rounds.rank_by != "people":
        module, _, function = rounds.rank_by.rpartition(":")
        if not module or not function.isidentifier():
            problems.append(
                Problem(
                    "rounds.rank_by",
                    f"{rounds.rank_by!r}: give 'people', or a judge as MODULE:FUNCTION, a Python file or module and "
                    "the function in it that ranks, e.g. data/chat/judge.py:rank",
                )
            )
        elif module.endswith(".py") and resolve_path(module, base) is None:
            problems.append(Problem("rounds.rank_by", f"no such file {module} (relative to here or to the recipe)"))
    if rounds.min_ranked is not None and rounds.rank_by != "people":
        problems.append(Problem("rounds.min_ranked", "only with rank_by: people (a judge ranks every prompt)"))
    if rounds.guidelines is not None:
        if rounds.rank_by != "people":
            problems.append(Problem("rounds.guidelines", "only with rank_by: people (guidelines are for labellers)"))
        elif not isinstance(rounds.guidelines, str) or resolve_path(rounds.guidelines, base) is None:
            problems.append(
                Problem("rounds.guidelines", f"no such file {rounds.guidelines} (relative to here or to the recipe)")
            )
    if isinstance(rounds.stages, dict):
        for name, settings in rounds.stages.items():
            if name not in retrained:
                problems.append(
                    Problem(
                        f"rounds.stages.{name}",
                        f"later rounds retrain {' and '.join(retrained) or 'no stage of this recipe'} only; give "
                        "trainer settings of those",
                    )
                )
            elif not isinstance(settings, dict):
                problems.append(
                    Problem(
                        f"rounds.stages.{name}", f"expected trainer settings, e.g. {{{name}: {{learning_rate: 1e-5}}}}"
                    )
                )
    if check_trainers and not problems and recipe.source.is_file():
        try:
            round_recipe(recipe)  # the trainer blocks of a later round, checked as the stages' are
        except RecipeError as e:
            for p in e.problems:
                key = p.key
                for name in retrained:
                    if key.startswith(f"stages.{name}.trainer.") and key.split(".")[3] in (
                        rounds.stages.get(name) or {}
                    ):
                        key = f"rounds.stages.{name}." + key.removeprefix(f"stages.{name}.trainer.")
                problems.append(Problem(key, p.message, cause=p.cause))


def _check_hub(recipe: Recipe, known: list[str], problems: list[Problem]) -> None:
    hub = recipe.hub
    if isinstance(hub.repo_id, str) and not is_repo_id(hub.repo_id):
        problems.append(
            Problem(
                "hub.repo_id", f"expected owner/name (your user or organisation, then the repo), got {hub.repo_id!r}"
            )
        )
    for stage in hub.stages if isinstance(hub.stages, list) else []:
        if stage not in known:
            problems.append(Problem("hub.stages", f"{stage!r} is not a stage of this recipe ({', '.join(known)})"))
    if hub.weights == "adapter" and not any(recipe.adapters(s)[0] for s in known if recipe.stages[s]):
        problems.append(
            Problem(
                "hub.weights",
                "'adapter' needs a lora block: without LoRA a stage has full weights only; use weights: merged",
            )
        )


def _check_local(
    value,
    key,
    base: Path,
    problems,
    folder: str | None = None,
    always_local: bool = False,
    suffixes=tuple(DATA_SUFFIXES),
) -> None:
    """Report a local path that does not exist, or is a file where `folder` (what the folder holds) is expected, or a
    folder where a file (one of `suffixes`) is. Hub ids (`name` or `owner/name`) are left for load time."""
    if not isinstance(value, str):
        return  # None, or a wrong type that is reported already
    found = resolve_path(value, base)
    if found is None:
        if always_local or not is_hub_id(value, base):
            what = "folder" if folder else "file"
            problems.append(
                Problem(
                    key,
                    f"{what} not found: {value} (looked in {Path.cwd()} and {base.resolve()}); "
                    "fix the path, or give a Hub id as owner/name",
                )
            )
    elif folder and not found.is_dir():
        problems.append(
            Problem(key, f"{value} is a file, but {folder} is expected here; give the folder that holds it")
        )
    elif not folder and not found.is_file():
        inside = (
            sorted(p.name for p in found.iterdir() if p.is_file() and p.suffix in suffixes) if found.is_dir() else []
        )
        problems.append(
            Problem(
                key,
                f"{value} is {'a folder' if found.is_dir() else 'not a regular file'}, but a "
                f"file is expected here; name a file" + (f" in it, e.g. {Path(value) / inside[0]}" if inside else ""),
            )
        )


def is_hub_id(value: str, base: Path = Path(".")) -> bool:
    """`name` or `owner/name` that names nothing on this machine: a Hub model or dataset."""
    return (
        resolve_path(value, base) is None
        and not value.startswith((".", "/", "~"))
        and value.count("/") <= 1
        and Path(value).suffix not in DATA_SUFFIXES
    )


def is_repo_id(value: str) -> bool:
    """`owner/name`, as a Hub repo to create must be named."""
    return value.count("/") == 1 and all(value.split("/"))


def resolve_path(path: str, base: Path) -> Path | None:
    p = Path(path).expanduser()
    for candidate in [p] if p.is_absolute() else [Path.cwd() / p, base / p]:
        try:
            if candidate.exists():
                return candidate.resolve()
        except (OSError, ValueError):  # a name too long for the file system, or with a NUL byte: nothing there
            pass
    return None


def _not_a_causal_lm(model_type: str) -> str | None:
    """Why transformers' `model_type` is no decoder-only causal LM, or None when it is one.

    AutoModelForCausalLM's mapping alone is not enough: it also maps encoders (bert, roberta: a head that sees the
    tokens after each position unless the model is rebuilt as a decoder) and the decoder halves of encoder-decoder
    models (bart, marian). So a type must be in the causal-LM mapping and in neither the masked-LM nor the
    seq2seq mapping."""
    from transformers.models.auto import modeling_auto as auto

    if model_type in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "is an encoder-decoder architecture"
    if model_type not in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "has no causal language model in transformers"
    if model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "is an encoder (a masked LM): its causal-LM head would see the tokens it is to predict"
    return None


CAUSAL_FIX = "alignkit trains decoder-only causal LMs: use one such as gpt2, llama, opt or gpt_neox"


def _context_length(values: dict) -> int | None:
    return next((values[k] for k in CONTEXT_KEYS if isinstance(values.get(k), int) and values[k] > 0), None)


def _check_local_model(folder: Path, problems) -> tuple[int, str] | None:
    """A local model folder's architecture (a causal LM) and context length, from its config.json."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no readable config.json (an adapter folder, say): loading the model tells
    if not isinstance(config, dict):
        return None
    model_type = config.get("model_type")
    if isinstance(model_type, str) and (why := _not_a_causal_lm(model_type)):
        problems.append(
            Problem("model.name_or_path", f"its config.json says model_type {model_type!r}, which {why}; {CAUSAL_FIX}")
        )
    context = _context_length(config)
    return (context, f"{folder / 'config.json'}") if context else None


def _check_model_config(config: dict, problems) -> tuple[int, str] | None:
    """Check model.config as far as possible without weights: known keys, a causal LM, and that the model builds (on
    PyTorch's meta device, which allocates nothing). Returns its context length and where it comes from."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if not model_type:
        problems.append(Problem("model.config.model_type", "required: the architecture, e.g. gpt2"))
        return None
    try:
        defaults = AutoConfig.for_model(model_type).to_dict()
    except (ValueError, TypeError):  # an unknown (or unhashable) name
        problems.append(Problem("model.config.model_type", f"unknown architecture {model_type!r}; e.g. gpt2"))
        return None
    start = len(problems)
    _unknown_keys({k: v for k, v in config.items()}, defaults, "model.config", f"{model_type}'s config", problems)
    for name, value in config.items():
        if _non_finite(value):
            problems.append(
                Problem(
                    f"model.config.{name}",
                    f"expected finite numbers, got {_show(value)}; write a "
                    "number (YAML reads .nan and .inf as not-a-number and "
                    "infinity)",
                )
            )
    why = _not_a_causal_lm(model_type)
    if why:
        problems.append(Problem("model.config.model_type", f"{model_type!r} {why}; {CAUSAL_FIX}"))
    if len(problems) > start:
        return None
    settings = {k: v for k, v in config.items() if k != "model_type"}
    try:
        built = AutoConfig.for_model(model_type, **settings)
    except (ValueError, TypeError, AttributeError, ArithmeticError, *_strict_dataclass_errors()) as e:
        # the config class's own validation of the settings
        problems.append(
            Problem(
                "model.config",
                f"{model_type}'s config refused these settings: {_one_line(e)}; fix them as it says",
                cause=e,
            )
        )
        return None
    refusal, cause = _build_on_meta(built)
    if refusal:
        problems.append(
            Problem(
                "model.config", f"a {model_type} model cannot be built from these settings: {refusal}", cause=cause
            )
        )
        return None
    context = _context_length(built.to_dict())
    return (context, f"model.config's {next(k for k in CONTEXT_KEYS if k in built.to_dict())}") if context else None


def _strict_dataclass_errors() -> tuple[type, ...]:
    """huggingface_hub's validation errors, which some config classes raise (and which are not ValueErrors)."""
    try:
        from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
    except ImportError:  # an older huggingface_hub: its config classes raise ValueError
        return ()
    return StrictDataclassClassValidationError, StrictDataclassFieldValidationError


def _build_on_meta(config) -> tuple[str | None, BaseException | None]:
    """Instantiate the causal LM on the meta device (shapes only, no memory); what goes wrong (and the error behind
    it), or (None, None)."""
    import logging

    import torch
    from transformers import AutoModelForCausalLM

    class Notes(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    # Encoder LM heads say "add `is_decoder=True`" and build anyway; they would see the tokens they are to predict.
    # Their warnings are collected here instead of printed: the verdict below says what matters.
    logger, notes = logging.getLogger("transformers"), Notes()
    level, handlers = logger.level, logger.handlers
    logger.handlers = [notes]
    logger.setLevel(logging.WARNING)
    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config)
    except (RuntimeError, NotImplementedError) as e:
        if "meta" not in str(e):  # e.g. a negative size; what the meta device cannot do is left to the real build
            return f"{_one_line(e)}; fix the sizes in model.config", e
    except (ValueError, AssertionError, ArithmeticError, TypeError) as e:  # the layers' checks of their shapes
        return f"{_one_line(e)}; fix model.config as the message says (e.g. n_embd divisible by n_head)", e
    finally:
        logger.handlers = handlers
        logger.setLevel(level)
    if any("is_decoder" in m for m in notes.messages):
        return (
            f"its causal-LM class is an encoder's head, which would see the tokens it is to predict; {CAUSAL_FIX}"
        ), None
    return None, None


def _one_line(e: BaseException) -> str:
    """An error's message on one line, without a closing period (the fix follows it)."""
    return " ".join(str(e).split()).rstrip(".") or type(e).__name__


# A small conversation for checking a chat template, in the shapes alignkit renders: a whole chat (training) and a
# prompt that asks for the answer (PPO, evaluation). Placeholder special tokens, as a tokenizer would pass its own.
SAMPLE_CHAT = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
]
SAMPLE_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def _check_chat_template(value: str, base: Path, problems: list[Problem]) -> None:
    """Compile model.chat_template (inline, or a file) and render the sample chat in transformers' own sandbox (the
    environment apply_chat_template uses), so that a template that breaks is named here, not in a stage's traceback."""
    import jinja2
    from transformers.utils import chat_template_utils

    key, template = "model.chat_template", value
    where = "line {} of the template"
    if "{" not in value:  # a file
        local = resolve_path(value, base)
        if local is None or not local.is_file():
            return  # reported by _check_local
        data = local.read_bytes()
        try:
            template = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line, what = utf8_error(data, e)
            problems.append(Problem(key, f"{value}:{line}: {what}"))
            return
        where = f"{value}:{{}}"

    def line_of(e: BaseException) -> int | None:
        import traceback

        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == "<template>"]
        return getattr(e, "lineno", None) or (lines[-1] if lines else None)

    def at(n: int | None) -> str:
        return f" ({where.format(n)})" if n else ""

    try:
        compiled = chat_template_utils._compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as e:
        problems.append(
            Problem(key, f"not a valid Jinja template: {(e.message or '').rstrip('.')}{at(e.lineno)}; fix its syntax")
        )
        return
    # The sandbox turns a dunder attribute (''.__class__) into an empty value instead of failing: name it here.
    nodes = jinja2.nodes
    for node in compiled.environment.parse(template).find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem):
            name = node.arg.value if isinstance(node.arg, nodes.Const) else None
        else:
            name = (
                node.args[0].value
                if node.name == "attr" and node.args and isinstance(node.args[0], nodes.Const)
                else None
            )
        if isinstance(name, str) and name.startswith("__"):
            problems.append(
                Problem(
                    key,
                    f"reads {name!r}{at(node.lineno)}, which transformers' sandbox refuses (a "
                    "template may not reach Python internals); remove it: a chat template reads "
                    "messages, add_generation_prompt and the special tokens",
                )
            )
            return

    def render(chat: list[dict], generation_prompt: bool) -> str:
        rendered, _ = chat_template_utils.render_jinja_template(
            conversations=[chat], chat_template=template, add_generation_prompt=generation_prompt, **SAMPLE_TOKENS
        )
        return rendered[0]

    try:
        try:
            whole = render(SAMPLE_CHAT, False)
            render(SAMPLE_CHAT[:2], True)
        except jinja2.TemplateError as e:
            if type(e) is not jinja2.TemplateError:  # only raise_exception() raises the base class
                raise
            whole = render(SAMPLE_CHAT[1:], False)  # the template refuses a system turn, as some do: try without
            render(SAMPLE_CHAT[1:2], True)
    except (
        jinja2.TemplateError,
        TypeError,
        ValueError,
        ArithmeticError,
        LookupError,
        AttributeError,
        RecursionError,
    ) as e:
        problems.append(
            Problem(
                key,
                f"fails to render a sample chat (system, user, assistant) in transformers' "
                f"sandbox: {type(e).__name__}: {_one_line(e)}{at(line_of(e))}; fix the template",
            )
        )
        return
    if not all(m["content"] in whole for m in SAMPLE_CHAT[1:]):
        problems.append(
            Problem(
                key,
                "renders a sample chat without its messages' text; a chat template must write "
                "each message's content (it gets them as `messages`, each {role, content})",
            )
        )


def _check_quantization(settings: dict, problems, key: str = "quantization") -> None:
    import inspect

    from transformers import BitsAndBytesConfig

    known = [p for p in inspect.signature(BitsAndBytesConfig.__init__).parameters if p not in ("self", "kwargs")]
    _unknown_keys(settings, known, key, "BitsAndBytesConfig", problems)
    if not (settings.get("load_in_4bit") or settings.get("load_in_8bit")):
        problems.append(Problem(key, "set load_in_4bit: true or load_in_8bit: true"))
    elif settings.get("load_in_4bit") and settings.get("load_in_8bit"):
        problems.append(
            Problem(
                key,
                "load_in_4bit and load_in_8bit are both set; a model loads in one of them: "
                "remove one (4-bit for QLoRA)",
            )
        )
    for name, value in settings.items():
        if _non_finite(value):
            problems.append(Problem(f"{key}.{name}", f"expected a finite number, got {_show(value)}; write a number"))


def has_accelerator() -> bool:
    """A GPU (CUDA or ROCm), an Intel XPU or Apple's MPS."""
    import torch

    return (
        torch.cuda.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
        or torch.backends.mps.is_available()
    )


def machine_settings(settings: dict) -> dict:
    """Settings this machine needs. TRL turns bf16 on by default, which transformers refuses on a machine with no
    accelerator unless use_cpu is set; there it means bf16 autocast on the CPU."""
    if "use_cpu" in settings:
        return {}
    return {} if has_accelerator() else {"use_cpu": True}


def check_config_class(
    cls, settings: dict, key: str, problems: list[Problem], reserved=None, ranges: bool = False, **fixed
):
    """Check `settings` against a dataclass config of another library (TRL, peft), then construct it. With `ranges`,
    numbers are checked against RANGES too."""
    if not isinstance(settings, dict):
        problems.append(Problem(key, f"expected a mapping, got {_show(settings)}"))
        return None
    start = len(problems)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    _unknown_keys(settings, fields, key, cls.__name__, problems)
    values = {}
    for name, value in settings.items():
        if name not in fields:
            continue
        if reserved and name in reserved:
            problems.append(Problem(f"{key}.{name}", f"{reserved[name]}; remove this key"))
            continue
        before = len(problems)
        values[name] = check_value(value, hints.get(name, Any), f"{key}.{name}", problems, f"see {cls.__name__}")
        if len(problems) > before:
            continue
        if _non_finite(values[name]):
            problems.append(
                Problem(
                    f"{key}.{name}",
                    f"expected a finite number, got {values[name]!r}; write a number "
                    "(YAML reads .nan and .inf as not-a-number and infinity)",
                )
            )
        elif ranges:
            check_range(name, values[name], f"{key}.{name}", problems, fields[name].default)
    if len(problems) > start:
        return None
    settings.update(values)  # keep the checked values (a float read from "1e-5")
    try:
        return cls(**{**values, **fixed})
    except (ValueError, ImportError) as e:  # the class's own consistency checks (and a missing optional package)
        problems.append(Problem(key, f"{cls.__name__} rejected these settings: {e}", cause=e))
        return None


def utf8_error(data: bytes, e: UnicodeDecodeError) -> tuple[int, str]:
    """The line of the first byte of `data` that is not UTF-8, and what to say about it."""
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - data.rfind(b"\n", 0, e.start)
    return line, (
        f"not UTF-8 text: byte 0x{data[e.start]:02x} at column {column} cannot be decoded ({e.reason}); "
        "save the file as UTF-8"
    )


def _line_map(text: str, duplicates: list[Problem] | None = None) -> dict[str, int]:
    """Map each dotted key of a YAML document to the line it is written on; a key written twice in one mapping goes
    to `duplicates`."""
    lines: dict[str, int] = {}
    walked: set[int] = set()  # an alias is the node it names: walked once (a bomb of nested aliases would not end)

    def walk(node, prefix):
        if id(node) in walked:
            return
        walked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                if k.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults`: keys written after it override the merged ones, as meant
                path = f"{prefix}.{k.value}" if prefix else str(k.value)
                line = k.start_mark.line + 1
                if k.value in seen and duplicates is not None:
                    duplicates.append(
                        Problem(
                            path,
                            f"written twice, on lines {seen[k.value]} and {line}; YAML keeps "
                            "only the last, so the first is silently ignored: remove one",
                            where=f"line {line}",
                        )
                    )
                seen[k.value] = line
                lines[path] = line
                walk(v, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{prefix}[{i}]")

    walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    return lines


def _nearest_line(lines: dict[str, int], key: str) -> str:
    while key:
        if key in lines:
            return f"line {lines[key]}"
        key = key.rpartition(".")[0]
    return ""
