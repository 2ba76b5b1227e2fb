"""The recipe: a small typed schema for one YAML file, loaded and checked all at once.

The YAML key path, the attribute path in code and the command-line override are the same string
(`stages.ppo.trainer.learning_rate`). A stage's `trainer:` block is handed to TRL's own config class and checked
against it here, so a typo fails before any model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import Problem, RecipeError

STAGES = ("pretrain", "sft", "reward", "ppo")
DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Dataset:
    path: str = field(metadata={"help": "a local .json/.jsonl/.csv/.parquet file, or a Hugging Face Hub dataset id"})
    split: str = field(default="train", metadata={"help": "split to read (Hub datasets; local files have 'train')"})
    name: str | None = field(default=None, metadata={"help": "Hub dataset configuration name"})
    revision: str | None = field(default=None, metadata={"help": "Hub dataset revision (branch, tag or commit)"})
    format: Literal["auto", "alpaca", "sharegpt", "hh"] = field(
        default="auto", metadata={"help": "'auto' detects TRL's formats and the alpaca/sharegpt/hh converters"})
    columns: dict[str, str] = field(
        default_factory=dict, metadata={"help": "rename columns first: {expected_name: your_column}"})
    max_rows: int | None = field(default=None, metadata={"help": "use only the first N rows"})


@dataclass
class Model:
    name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local folder of a pretrained causal LM (GPT-2 style)"})
    config: dict[str, Any] | None = field(
        default=None, metadata={"help": "build an untrained model instead: {model_type: gpt2, n_layer: 2, ...}"})
    tokenizer: str | None = field(
        default=None, metadata={"help": "Hub id or local folder of the tokenizer (default: name_or_path)"})
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Jinja chat template, or a .jinja file, replacing the tokenizer's own (default: the "
                          "tokenizer's, else alignkit's 'User:/Assistant:' template that ends each answer with EOS)"})
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the model and tokenizer"})


@dataclass
class Stage:
    dataset: Dataset = field(metadata={"help": "the stage's data"})
    trainer: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "settings for TRL's config class (SFTConfig, RewardConfig, PPOConfig)"})
    overlength: Literal["truncate", "error"] = field(
        default="truncate", metadata={"help": "rows longer than the context: 'truncate' (with a warning) or 'error'"})
    reward_model: str | None = field(
        default=None, metadata={"help": "ppo only: a reward model folder, instead of the reward stage's output"})
    lora: dict[str, Any] | bool | None = field(
        default=None, metadata={"help": "this stage's LoRA settings, replacing the recipe's lora; false: train in full"})
    quantization: dict[str, Any] | bool | None = field(
        default=None, metadata={"help": "this stage's quantization, replacing the recipe's; false: full precision"})


@dataclass
class Eval:
    dataset: Dataset = field(metadata={"help": "held-out prompts; a 'reference' column enables gold accuracy"})
    comparisons: Dataset | None = field(
        default=None, metadata={"help": "held-out comparisons (pairs or rankings): the reward model's accuracy"})
    max_new_tokens: int = field(default=32, metadata={"help": "longest answer generated"})
    batch_size: int = field(default=64, metadata={"help": "prompts generated at once"})
    match: Literal["exact", "contains"] = field(
        default="exact", metadata={"help": "an answer is correct when it equals ('exact') or contains the reference, "
                                           "ignoring case, spacing and end punctuation"})


@dataclass
class Hub:
    repo_id: str = field(metadata={"help": "owner/name: the last stage pushed goes here, earlier ones to "
                                           "owner/name-STAGE"})
    stages: list[str] | None = field(
        default=None, metadata={"help": "stages to push (default: the last policy stage: ppo, else sft, else pretrain)"})
    private: bool | None = field(default=None, metadata={"help": "create the repos private (default: the Hub's)"})
    weights: Literal["merged", "adapter"] = field(
        default="merged", metadata={"help": "with lora: push full merged weights, or the adapter alone"})


@dataclass
class Recipe:
    output_dir: str = field(metadata={"help": "folder for every stage's output: {output_dir}/{stage}/"})
    model: Model = field(metadata={"help": "the base model and tokenizer"})
    stages: dict[str, Stage] = field(metadata={"help": "an ordered selection of pretrain, sft, reward, ppo"})
    seed: int = field(default=42, metadata={"help": "random seed, unless a trainer block sets its own"})
    lora: dict[str, Any] | None = field(
        default=None, metadata={"help": "train LoRA adapters: settings for peft.LoraConfig (r, lora_alpha, ...)"})
    quantization: dict[str, Any] | None = field(
        default=None, metadata={"help": "load quantized: settings for transformers.BitsAndBytesConfig"})
    eval: Eval | None = field(
        default=None, metadata={"help": "evaluate base, sft and ppo on held-out prompts after a run: report.md/json"})
    hub: Hub | None = field(default=None, metadata={"help": "push models to the Hugging Face Hub at the end of a run"})
    source: Path = field(default=Path("<recipe>"), metadata={"yaml": False})

    def to_dict(self) -> dict:
        """The resolved recipe as plain data, as it would be written in YAML."""
        data = dataclasses.asdict(self)
        data.pop("source")
        return data

    def adapters(self, stage: str) -> tuple[dict | None, dict | None]:
        """The LoRA and quantization settings of a stage: its own where it sets them, else the recipe's."""
        spec = self.stages[stage]
        lora = self.lora if spec.lora is None else (spec.lora or None)
        quantization = self.quantization if spec.quantization is None else (spec.quantization or None)
        return lora, quantization

    def resolve(self, path: str) -> Path:
        """A path from the recipe: relative to the current folder, else to the recipe's folder."""
        return resolve_path(path, self.source.parent) or Path(path)


# --- loading ----------------------------------------------------------------------------------------------------


def load_recipe(path: str | os.PathLike, overrides: list[str] = (), check_trainers: bool = True) -> Recipe:
    """Read, override and check a recipe; raise RecipeError listing every problem found."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(str(path), [Problem("", f"cannot read the recipe: {e.strerror}")]) from None
    try:
        raw = yaml.safe_load(text)
        lines = _line_map(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else ""
        raise RecipeError(str(path), [Problem(where, f"not valid YAML: {getattr(e, 'problem', e)}")]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(str(path), [Problem("", "expected a mapping of keys (output_dir, model, stages, ...)")])

    problems: list[Problem] = []
    overridden = set()
    for item in overrides:
        key = _apply_override(raw, item, problems)
        if key:
            overridden.add(key)
    recipe = _build(Recipe, raw, "", problems)
    if recipe is not None:
        recipe.source = path
        _check(recipe, problems, check_trainers)
    for p in problems:
        if p.where is None and any(p.key == k or p.key.startswith(k + ".") or
                                   (k.startswith(p.key + ".") and p.key not in lines) for k in overridden):
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
        problems.append(Problem("", f"override {item!r} is not KEY=VALUE or ~KEY with a dotted key, e.g. "
                                    "stages.ppo.trainer.learning_rate=1e-5", where="command line"))
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
            problems.append(Problem(".".join(parts[: i + 1]), f"is {child!r}, not a mapping, so {key} cannot be set",
                                    where="command line"))
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
        problems.append(Problem(key, f"expected a mapping, got {_show(data)}"))
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
        if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(inner) == 1 and \
                dataclasses.is_dataclass(inner[0]):
            tp = inner[0] if value is not None else type(None)  # an optional section
        if tp is type(None):
            pass
        elif dataclasses.is_dataclass(tp):
            value = _build(tp, value, sub, problems)
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            if not isinstance(value, dict):
                problems.append(Problem(sub, f"expected a mapping, got {_show(value)}"))
                continue
            value = {k: _build(typing.get_args(tp)[1], v, f"{sub}.{k}", problems) for k, v in value.items()}
        else:
            value = check_value(value, tp, sub, problems)
        values[name] = value
    try:
        return cls(**values)
    except TypeError:  # a required field was missing: already reported
        return None


def _unknown_keys(data: dict, known, key: str, owner: str, problems: list[Problem]) -> None:
    for name in data:
        if name not in known:
            hint = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
            fix = f"did you mean {hint[0]}?" if hint else f"known keys: {', '.join(sorted(map(str, known)))}"
            problems.append(Problem(f"{key}.{name}" if key else str(name), f"unknown key for {owner}; {fix}"))


def check_value(value, tp, key: str, problems: list[Problem]):
    """Check `value` against the annotation `tp`; a number written as a string (YAML reads 1e-5 so) becomes a float."""
    if _accepts(float, tp) and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if not _fits(value, tp):
        problems.append(Problem(key, f"expected {_describe(tp)}, got {_show(value)}"))
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
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             list: "a list", tuple: "a list"}
    return names.get(tp) or names.get(origin) or getattr(tp, "__name__", str(tp))


def _show(value) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else yaml.safe_dump(value, default_flow_style=True).strip()
    return (text[:60] + "...") if len(text) > 60 else text


# --- whole-recipe checks ----------------------------------------------------------------------------------------


def _check(recipe: Recipe, problems: list[Problem], check_trainers: bool) -> None:
    base = recipe.source.parent
    m = recipe.model
    if (m.name_or_path is None) == (m.config is None):
        problems.append(Problem("model", "set exactly one of model.name_or_path (a pretrained model) and "
                                         "model.config (an untrained model built from a config)"))
    if m.config is not None and m.tokenizer is None:
        problems.append(Problem("model.tokenizer", "required with model.config: a tokenizer folder or Hub id"))
    for key in ("name_or_path", "tokenizer"):
        _check_local(getattr(m, key), f"model.{key}", base, problems, folder=True)
    if m.chat_template and "{" not in m.chat_template:
        _check_local(m.chat_template, "model.chat_template", base, problems, folder=False, always_local=True)
    if m.config is not None:
        _check_model_config(m.config, problems)

    names = list(recipe.stages)
    for name in names:
        if name not in STAGES:
            hint = difflib.get_close_matches(name, STAGES, n=1)
            problems.append(Problem(f"stages.{name}", "unknown stage; " + (f"did you mean {hint[0]}?" if hint else
                                    f"stages are {', '.join(STAGES)}")))
    known = [n for n in names if n in STAGES]
    if known != sorted(known, key=STAGES.index):
        problems.append(Problem("stages", f"stages run in the order {' -> '.join(STAGES)}; list them so "
                                          f"(got {', '.join(known)})"))
    if not names:
        problems.append(Problem("stages", "no stages: name at least one of " + ", ".join(STAGES)))
    for name in known:
        stage = recipe.stages[name]
        if stage is None:
            continue
        key = f"stages.{name}"
        if stage.dataset is not None:
            _check_local(stage.dataset.path, f"{key}.dataset.path", base, problems, folder=False)
        if stage.reward_model is not None:
            if name != "ppo":
                problems.append(Problem(f"{key}.reward_model", "only the ppo stage takes a reward_model"))
            else:
                _check_local(stage.reward_model, f"{key}.reward_model", base, problems, folder=True)
        if check_trainers:
            check_trainer(name, stage.trainer, f"{key}.trainer", problems)
    if recipe.eval is not None:
        for key in ("dataset", "comparisons"):
            spec = getattr(recipe.eval, key)
            if spec is not None:
                _check_local(spec.path, f"eval.{key}.path", base, problems, folder=False)
    if recipe.hub is not None:
        _check_hub(recipe, known, problems)
    if "ppo" in known and "reward" not in known and recipe.stages["ppo"] and not recipe.stages["ppo"].reward_model:
        problems.append(Problem("stages.ppo.reward_model", "ppo needs a reward model: add a reward stage before it, "
                                                           "or set stages.ppo.reward_model to a trained one"))
    blocks = [("lora", recipe.lora), ("quantization", recipe.quantization)]
    blocks += [(f"stages.{n}.{k}", getattr(recipe.stages[n], k)) for n in known if recipe.stages[n] for k in
               ("lora", "quantization")]
    for key, value in blocks:
        if value is True:
            problems.append(Problem(key, "expected a mapping of settings, or false to turn it off for this stage"))
        elif isinstance(value, dict) and check_trainers:
            if key.endswith("lora"):
                from peft import LoraConfig

                check_config_class(LoraConfig, value, key, problems, reserved={"task_type": "set by each stage"})
            else:
                _check_quantization(value, problems, key)
    if any(value is True for _, value in blocks):
        return
    for name in known:
        stage = recipe.stages[name]
        if stage is None or (name == "pretrain" and m.config is not None):
            continue  # pretraining from scratch trains every weight, unquantized
        lora, quantization = recipe.adapters(name)
        if quantization is None:
            continue
        where = f"stages.{name}.quantization" if stage.quantization else "quantization"
        if lora is None:
            problems.append(Problem(where, f"the {name} stage would train quantized weights in full, which cannot be "
                                           "done; give it LoRA settings to train adapters over them (QLoRA)"))
        if stage.trainer.get("bf16") is False:
            problems.append(Problem(f"stages.{name}.trainer.bf16", "with quantization TRL casts the LoRA "
                                    "adapters to bf16 (as QLoRA does), so training needs bf16 on; remove bf16: false"))


def _check_hub(recipe: Recipe, known: list[str], problems: list[Problem]) -> None:
    hub = recipe.hub
    if not is_repo_id(hub.repo_id):
        problems.append(Problem("hub.repo_id", f"expected owner/name (your user or organisation, then the repo), got "
                                               f"{hub.repo_id!r}"))
    for stage in hub.stages or []:
        if stage not in known:
            problems.append(Problem("hub.stages", f"{stage!r} is not a stage of this recipe ({', '.join(known)})"))
    if hub.weights == "adapter" and not any(recipe.adapters(s)[0] for s in known if recipe.stages[s]):
        problems.append(Problem("hub.weights", "'adapter' needs a lora block: without LoRA a stage has full weights "
                                               "only; use weights: merged"))


def _check_local(value, key, base: Path, problems, folder: bool, always_local: bool = False) -> None:
    """Report a local path that does not exist. Hub ids (`name` or `owner/name`) are left for load time."""
    if value is None or resolve_path(value, base) is not None:
        return
    if always_local or not is_hub_id(value, base):
        what = "folder" if folder else "file"
        problems.append(Problem(key, f"{what} not found: {value} (looked in {Path.cwd()} and {base.resolve()}); "
                                     "fix the path, or give a Hub id as owner/name"))


def is_hub_id(value: str, base: Path = Path(".")) -> bool:
    """`name` or `owner/name` that names nothing on this machine: a Hub model or dataset."""
    return resolve_path(value, base) is None and not value.startswith((".", "/", "~")) and value.count("/") <= 1 \
        and Path(value).suffix not in DATA_SUFFIXES


def is_repo_id(value: str) -> bool:
    """`owner/name`, as a Hub repo to create must be named."""
    return value.count("/") == 1 and all(value.split("/"))


def resolve_path(path: str, base: Path) -> Path | None:
    p = Path(path).expanduser()
    for candidate in ([p] if p.is_absolute() else [Path.cwd() / p, base / p]):
        if candidate.exists():
            return candidate.resolve()
    return None


def _check_model_config(config: dict, problems) -> None:
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if not model_type:
        problems.append(Problem("model.config.model_type", "required: the architecture, e.g. gpt2"))
        return
    try:
        defaults = AutoConfig.for_model(model_type).to_dict()
    except ValueError:
        problems.append(Problem("model.config.model_type", f"unknown architecture {model_type!r}; e.g. gpt2"))
        return
    _unknown_keys({k: v for k, v in config.items()}, defaults, "model.config", f"{model_type}'s config", problems)


def _check_quantization(settings: dict, problems, key: str = "quantization") -> None:
    import inspect

    from transformers import BitsAndBytesConfig

    known = [p for p in inspect.signature(BitsAndBytesConfig.__init__).parameters if p not in ("self", "kwargs")]
    _unknown_keys(settings, known, key, "BitsAndBytesConfig", problems)
    if not (settings.get("load_in_4bit") or settings.get("load_in_8bit")):
        problems.append(Problem(key, "set load_in_4bit: true or load_in_8bit: true"))


def trainer_config_class(stage: str):
    """TRL's config class for a stage (PPO's lives behind alignkit.stages.ppo, the one module that imports it)."""
    import importlib

    return importlib.import_module(f"alignkit.stages.{stage}").config_class()


# Keys alignkit sets itself: a recipe that sets them gets told where they come from instead.
RESERVED = {
    "output_dir": "set by alignkit: {output_dir}/{stage}/checkpoints",
    "sft_model_path": "the policy comes from the sft stage (or the base model)",
    "reward_model_path": "set stages.ppo.reward_model, or add a reward stage",
    "push_to_hub": "not supported from a trainer block",
}


def check_trainer(stage: str, settings: dict, key: str, problems: list[Problem]):
    """Check a trainer block against TRL's config class and build it; None when it has problems."""
    import importlib

    config = check_config_class(trainer_config_class(stage), settings, key, problems, RESERVED,
                                output_dir="/nonexistent/alignkit-validate", **machine_settings(settings))
    module = importlib.import_module(f"alignkit.stages.{stage}")
    if config is not None and hasattr(module, "check_config"):  # a trainer's own rules across keys
        module.check_config(config, key, problems)
    return config


def machine_settings(settings: dict) -> dict:
    """Settings this machine needs. TRL turns bf16 on by default, which transformers refuses on a machine with no
    accelerator unless use_cpu is set; there it means bf16 autocast on the CPU."""
    if "use_cpu" in settings:
        return {}
    import torch

    accelerated = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or \
        torch.backends.mps.is_available()
    return {} if accelerated else {"use_cpu": True}


def check_config_class(cls, settings: dict, key: str, problems: list[Problem], reserved=None, **fixed):
    """Check `settings` against a dataclass config of another library (TRL, peft), then construct it."""
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
        values[name] = check_value(value, hints.get(name, Any), f"{key}.{name}", problems)
    if len(problems) > start:
        return None
    settings.update(values)  # keep the checked values (a float read from "1e-5")
    try:
        return cls(**fixed, **values)
    except Exception as e:  # the class's own consistency checks
        problems.append(Problem(key, f"{cls.__name__} rejected these settings: {e}"))
        return None


def _line_map(text: str) -> dict[str, int]:
    """Map each dotted key of a YAML document to the line it is written on."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                path = f"{prefix}.{k.value}" if prefix else str(k.value)
                lines[path] = k.start_mark.line + 1
                walk(v, path)

    walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    return lines


def _nearest_line(lines: dict[str, int], key: str) -> str:
    while key:
        if key in lines:
            return f"line {lines[key]}"
        key = key.rpartition(".")[0]
    return ""
