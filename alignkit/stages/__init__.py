"""The four stages, one module each, all the same shape: `config_class()` and `run(recipe, folder, inputs, resume)`.

This file holds the few helpers they share: building TRL's config from a trainer block, turning what TRL's trainers
refuse when they are built into a clear error, and collecting metrics.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from ..log import log
from ..models import context_length
from ..recipe import Recipe, machine_settings, trainer_config_class


def trainer_config(stage: str, recipe: Recipe, folder: Path, model=None, **fixed):
    """TRL's config for `stage` from its trainer block; checkpoints go to {folder}/checkpoints.

    `max_length` is capped at the model's context (TRL's default, 1024, is more than a small model has).
    """
    settings = dict(recipe.stages[stage].trainer)
    settings.setdefault("seed", recipe.seed)
    cls = trainer_config_class(stage)
    if model is not None and "max_length" in cls.__dataclass_fields__:
        limit = context_length(model.config)
        asked = settings.get("max_length", cls.__dataclass_fields__["max_length"].default)
        if asked is None or asked > limit:
            log(stage, f"max_length {asked} -> {limit}, the model's context length")
            settings["max_length"] = limit
    settings.update(fixed)
    settings.update(machine_settings(settings))
    return cls(output_dir=str(folder / "checkpoints"), **settings)


@contextmanager
def refused_by_trl(stage: str):
    """TRL's trainers check some settings only when they are built, against the model, tokenizer and data (a chat
    template without answer markers under assistant_only_loss, a dataset of the wrong kind): their ValueError is the
    recipe's to fix, so it ends the run as one, not as a traceback."""
    try:
        yield
    except ValueError as e:
        fix = (f"set stages.{stage}.trainer.assistant_only_loss: false (learn whole chats), or set model.chat_template "
               "to a template that marks answers with {% generation %}" if "chat template" in str(e) else
               f"fix stages.{stage} (its trainer block, dataset, or the model's tokenizer) as the message says")
        raise UserError(f"{stage}: TRL refused the stage's settings when building its trainer: {e}\n  {fix}") from None


def train_metrics(trainer, result=None, figures: dict | None = None) -> dict:
    """What a stage reports: the trainer's final metrics, its key figures (last loss, accuracy, reward, KL), its whole
    log history, and the parameters it trained (PPO trains a policy and a value model)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    parts = {"policy": model.policy, "value": model.value_model} if hasattr(model, "policy") else {"model": model}
    return {"train": dict(result.metrics) if result is not None else {}, "figures": figures or {},
            "log_history": trainer.state.log_history,
            "parameters": {name: parameter_counts(part) for name, part in parts.items()}}


def parameter_counts(model) -> dict:
    """Trainable and total parameters, and the bytes the weights take (4-bit weights are stored two to a byte and
    counted as stored)."""
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params),
            "bytes": sum(p.numel() * p.element_size() for p in params),
            "trainable_bytes": sum(p.numel() * p.element_size() for p in params if p.requires_grad)}
