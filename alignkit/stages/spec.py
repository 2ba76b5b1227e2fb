"""What a stage is, declared once: `Stage`, the object each stage module fills in, and what the stages share (the one
function that builds a stage's trainer config, alignkit's departures from TRL's defaults, metrics).

pipeline, recipe, data, evaluate, hub, chat and cli read these declarations and name no stage themselves.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal

from .. import lm_head
from ..errors import Problem, UserError
from ..log import log
from ..schema import Range, StageSettings, above, at_least, between

if TYPE_CHECKING:
    from ..schema import Recipe


@dataclass(frozen=True)
class Default:
    """A setting alignkit chooses differently from TRL's default, and why. docs/defaults.md's table lists every one
    (a test checks it against `all_defaults()`); each is logged when a stage starts with it. A recipe that sets the
    key keeps its own value."""

    setting: str  # the trainer key, as `stages.<stage>.trainer.<setting>` would write it, or what else it is
    value: str  # alignkit's value, in words, as docs/defaults.md's table shows it
    why: str
    # (settings: the trainer block, context: the model's context length or None, defaults: the config class's field
    # defaults) -> what to set ({} where it does not apply); None for a default the stage applies in its own code
    # (and logs there)
    apply: Callable[[dict, int | None, dict], dict] | None = None
    always: bool = False  # applies even where the recipe sets the key (a cap, not a choice)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, as everything outside its module sees it."""

    name: str  # the YAML section, output folder, log prefix and CLI choice
    about: str  # one line: what it trains
    config_class: Callable[[], type]  # its trainer block's config class (TRL's), imported when called
    run: Callable[..., dict]  # run(recipe, folder, inputs, resume, args) -> metrics
    data: str  # the kind of rows it reads (data.KINDS)
    writes: Literal["causal_lm", "reward_model"]
    settings: type = StageSettings  # the schema of stages.<name>: StageSettings, or a subclass with the stage's keys
    model_from: tuple[str, ...] = ()  # earlier stages it starts from (the latest the recipe has), else the base model
    from_scratch: bool = False  # can start from an untrained model built from model.config
    reward_model: bool = False  # reads a reward model: an earlier stage's that writes one, or settings.reward_model
    policy: bool = False  # writes a model that answers prompts: chat, push and eval use it
    eval_reference: bool = False  # the policy others are measured against in the report (KL, win rate)
    # a later round (recipe `rounds`) continues it: its policy and value model go on from the last round's, its KL
    # reference stays the model it first started from, and the reward stage it reads retrains on every round's rankings
    rounds: bool = False
    resumable: bool = True  # an interrupted run goes on from its last checkpoint
    clips_gradients: bool = True  # honours max_grad_norm
    hub_tags: tuple[str, ...] = ()
    figures: tuple[tuple[str, str], ...] = (("loss", "loss"),)  # (key in the trainer's logs, label): progress line
    curves: tuple[tuple[str, str, str], ...] = ()  # (log key, title, y label): the report's {name}.png, by episode
    notes: str = ""  # what its figures mean, for report.md
    # the log key of the reward model's mean score of its training samples: the report's verdict sets the mean of it
    # over training beside the reward model's mean score of the stage's held-out answers
    training_reward: str | None = None
    defaults: tuple[Default, ...] = ()  # its own departures from TRL's defaults (COMMON ones apply to every stage)
    # more_data(recipe, settings) -> [(recipe key, dataset block, kind)]: datasets it reads beside its own (PPO-ptx's
    # pretraining text), checked before anything trains and part of its fingerprint
    more_data: Callable[..., list] | None = None
    # check(recipe, settings, args, context, problems): rules across keys that its config class does not check;
    # context is (the model's context length, where it was read) or None
    check: Callable[..., None] | None = None


def _cap_max_length(settings: dict, context: int | None, defaults: dict) -> dict:
    if "max_length" not in defaults or not context:
        return {}
    asked = settings.get("max_length", defaults["max_length"])
    return {"max_length": context} if asked is None or asked > context else {}


def _use_cpu(settings: dict, context: int | None, defaults: dict) -> dict:
    from ..preflight import machine_settings

    return machine_settings(settings)


# Departures from TRL's defaults that apply to every stage (the stages declare their own beside them).
COMMON = (
    Default(
        "max_length",
        "capped at the model's context",
        "TRL's default (1024) is more than a small model has",
        _cap_max_length,
        always=True,
    ),
    Default(
        "use_cpu",
        "`true` on a machine without an accelerator",
        "transformers refuses TRL's default `bf16: true` there otherwise (on a CPU it means bf16 autocast)",
        _use_cpu,
    ),
    Default(
        "seed", "the recipe's `seed`", "one seed for the whole run"
    ),  # applied in build_config: it needs the recipe
    Default(
        "model.fused_gelu",
        "`true`: GPT-2's `gelu_new` computed as `gelu_pytorch_tanh`",
        "the same function (to 5e-7) in one kernel instead of seven operations: 1.20x on the chat recipe's reward "
        "stage",
    ),  # applied where models load (models.fused_gelu), said once per process
)


@dataclass
class LanguageModelSettings(StageSettings):
    """stages.<stage> of a stage that trains on TRL's fused LM head (SFTTrainer, DPOTrainer): the common keys, and
    how its loss is computed on a CPU."""

    full_logits: bool = field(
        default=True,
        metadata={
            "help": "on a CPU, compute the per-token log-probabilities from the whole logits when they take at most "
            "256 MiB (faster there than TRL's chunked LM head, the same values); false: TRL's head always"
        },
    )


@dataclass
class SupervisedSettings(LanguageModelSettings):
    """stages.<stage> of a stage on TRL's SFTTrainer (pretrain, sft), whose config has no `disable_dropout` (TRL's
    RewardConfig and DPOConfig have it in the trainer block)."""

    disable_dropout: bool = field(
        default=False,
        metadata={
            "help": "train this stage with every dropout probability in the model's config at 0 (as TRL's "
            "RewardConfig and DPOConfig do by default); the saved model's config keeps the probabilities it had, "
            "for the stages after it"
        },
    )


def dropout_off(trainer, stage: str, settings: dict[str, float]) -> None:
    """`disable_dropout: true`: the model was loaded with its config's dropout at 0; TRL's own switch then sets every
    dropout module to 0 as well (LoRA's adapters' among them), as its RewardTrainer and DPOTrainer do."""
    from trl.trainer.utils import disable_dropout_in_model

    disable_dropout_in_model(trainer.model)
    said = ", ".join(f"{k} {v:g}" for k, v in settings.items()) or "none set"
    log(stage, f"disable_dropout: dropout off while training ({said} -> 0; the saved config keeps them)")


# The stages on TRL's fused LM head declare it (lm_head.apply applies and logs it).
FULL_LOGITS = Default("full_logits", "`true`: on a CPU, whole logits when they take ≤ 256 MiB", lm_head.WHY)


# Keys alignkit sets itself: a recipe that sets them is told where they come from instead.
# What TRL's numeric settings must be, by name (TRL's config classes declare no ranges; alignkit's own PPOConfig
# declares its fields' ranges where it declares them). Out of range they fail only once their stage starts, after the
# earlier stages have trained, or train silently wrong (epochs -1 trains nothing).
TRAINER_RANGES: dict[str, Range] = {
    "learning_rate": above(0),
    "per_device_train_batch_size": at_least(1),
    "per_device_eval_batch_size": at_least(1),
    "gradient_accumulation_steps": at_least(1),
    "num_train_epochs": above(0, "0 or less trains nothing"),
    "max_steps": Range("-1 (train num_train_epochs) or >= 1", lambda v: v == -1 or v >= 1),
    "max_length": at_least(1),
    "logging_steps": above(0),
    "save_steps": above(0),
    "eval_steps": above(0),
    "warmup_ratio": between(0, 1),
    "warmup_steps": at_least(0, "below 1: a share of the steps"),
    "weight_decay": at_least(0),
    "max_grad_norm": at_least(0),
    "seed": at_least(0),
    "beta": above(0),  # DPO's
}

RESERVED = {
    "output_dir": "set by alignkit: {output_dir}/{stage}/checkpoints",
    "sft_model_path": "the policy comes from the earlier stage (or the base model)",
    "reward_model_path": "set stages.<stage>.reward_model, or add a reward stage",
    "push_to_hub": "not supported from a trainer block",
}


@dataclass
class Built:
    """A stage's trainer config, built when the recipe loads, and what alignkit set in it (logged when it runs)."""

    args: Any
    applied: list[str] = field(default_factory=list)
    values: dict = field(default_factory=dict)  # the block's values as checked (1e-5 read from text as a float)


def build_config(
    stage: Stage, recipe: Recipe, settings: dict, context: tuple[int, str] | None, problems: list[Problem]
):
    """The one place a stage's trainer config is built: the trainer block checked against the config class (every
    key, type and range), alignkit's defaults applied where the block leaves them, the stage's own rules checked.
    `context` is the model's context length and where it was read, where it is known before any model loads.
    Returns Built, or None with `problems` recorded. output_dir is set when the stage runs."""
    from ..preflight import has_accelerator
    from ..typecheck import check_config_class

    key = f"stages.{stage.name}.trainer"
    if settings.get("fp16") is True and (settings.get("use_cpu") is True or not has_accelerator()):
        # transformers keeps fp16 off without a GPU and says nothing: the stage would train in fp32
        problems.append(
            Problem(
                f"{key}.fp16",
                "fp16 needs a GPU, and this machine has none (transformers would "
                "ignore it and train in fp32); use bf16: true, or remove fp16",
            )
        )
    cls = stage.config_class()
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    fixed, applied = {}, []
    if "seed" not in settings:
        fixed["seed"] = recipe.seed
    for default in COMMON + stage.defaults:
        if default.apply is None or (default.setting in settings and not default.always):
            continue
        for name, value in default.apply(settings, context[0] if context else None, defaults).items():
            fixed[name] = value
            if name != "use_cpu":  # every stage on a CPU gets it: said once in docs/defaults.md, not at every stage
                applied.append(f"{name}={value} (alignkit: {default.why})")
    start = len(problems)
    args, values = check_config_class(
        cls,
        settings,
        key,
        problems,
        RESERVED,
        TRAINER_RANGES,
        output_dir="/nonexistent/alignkit-set-when-the-stage-runs",
        **fixed,
    )
    if args is None or len(problems) > start:
        return None
    if stage.check is not None:
        stage.check(recipe, recipe.stages[stage.name], args, context, problems)
    return Built(args, applied, values)


@contextmanager
def refused_by_trl(stage: str):
    """TRL's trainers check some settings only when they are built, against the model, tokenizer and data (a chat
    template without answer markers under assistant_only_loss, assistant_only_loss on plain text, an EOS token that is
    not in the vocabulary): a ValueError that TRL raises itself while building one is the recipe's to fix, so it ends
    the run as bad input. Any other error keeps its traceback (it is a bug)."""
    try:
        yield
    except ValueError as e:
        if not _raised_by_trl(e):
            raise
        text = str(e)
        if "assistant_only_loss" in text or "generation" in text and "chat template" in text:
            fix = (
                f"set stages.{stage}.trainer.assistant_only_loss: false (learn whole chats), or set "
                "model.chat_template to a template that marks answers with {% generation %}"
            )
        else:
            fix = f"fix stages.{stage} (its trainer block, its dataset, or the model's tokenizer) as the message says"
        raise UserError(f"{stage}: TRL refused the stage's settings when building its trainer: {e}\n  {fix}") from e


def _raised_by_trl(e: BaseException) -> bool:
    """Whether the innermost frame of e's traceback lies in TRL's package (its own check, not a deeper failure)."""
    import os
    import traceback

    import trl

    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(os.path.dirname(trl.__file__) + os.sep)


def train_metrics(trainer, result=None, figures: dict | None = None, parts: dict | None = None) -> dict:
    """What a stage reports: the trainer's final metrics, its key figures, its whole log history, and the parameters
    it trained (`parts`: name -> model; default the trainer's model)."""
    parts = parts or {"model": trainer.accelerator.unwrap_model(trainer.model)}
    return {
        "train": dict(result.metrics) if result is not None else {},
        "figures": figures or {},
        "log_history": trainer.state.log_history,
        "parameters": {name: parameter_counts(part) for name, part in parts.items()},
    }


def parameter_counts(model) -> dict:
    """Trainable and total parameters, and the bytes the weights take (4-bit weights are stored two to a byte and
    counted as stored)."""
    params = list(model.parameters())
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
        "bytes": sum(p.numel() * p.element_size() for p in params),
        "trainable_bytes": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
    }


def fit_context(args, model, stage: str) -> None:
    """Lower max_length to the model's context where the recipe loaded without knowing it (a Hub model)."""
    from ..models import context_length

    limit = context_length(model.config)
    if getattr(args, "max_length", None) is not None and args.max_length > limit:
        log(stage, f"max_length={limit} (alignkit: {COMMON[0].why}; the model's context is {limit})")
        args.max_length = limit


def settings_fields(cls: type) -> list[str]:
    """The recipe keys of a stage's settings schema."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)]


def stage_datasets(stage: Stage, recipe: Recipe) -> list[tuple[str, Any, str]]:
    """Every dataset `stage` reads: (recipe key, dataset block, kind of rows), its own first."""
    settings = recipe.stages[stage.name]
    extra = stage.more_data(recipe, settings) if stage.more_data is not None else []
    return [(f"stages.{stage.name}.dataset", settings.dataset, stage.data), *extra]
