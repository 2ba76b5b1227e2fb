"""pretrain: next-token prediction on raw text (TRL's SFTTrainer on a 'text' dataset), giving a foundation model."""

from __future__ import annotations

from pathlib import Path

from .. import data, lm_head, models
from ..log import log
from ..schema import Recipe
from .spec import (
    FULL_LOGITS,
    Default,
    Stage,
    SupervisedSettings,
    dropout_off,
    fit_context,
    refused_by_trl,
    train_metrics,
)


def config_class():
    from trl import SFTConfig

    return SFTConfig


def run(recipe: Recipe, folder: Path, inputs: dict, resume: str | None, args) -> dict:
    from trl import SFTTrainer

    from ..guard import fit

    spec = recipe.stages["pretrain"]
    dataset = data.load(spec.dataset, "pretrain", recipe, STAGE.data)
    tokenizer = models.load_tokenizer(recipe)
    from_scratch = recipe.model.config is not None
    dropout = not spec.disable_dropout
    if from_scratch:  # every weight is new, so it trains in full: no LoRA, no quantization
        if any(recipe.adapters("pretrain")):
            log("pretrain", "training from scratch trains every weight; lora and quantization apply to later stages")
        switched_off = {} if dropout else models.dropout_settings(models.built_config(recipe, tokenizer))
        model = models.build_model(recipe, tokenizer, dropout=dropout)
    else:
        switched_off = (
            {} if dropout else models.dropout_settings(models.read_config(recipe, recipe.model.name_or_path))
        )
        model = models.load_causal_lm(recipe, recipe.model.name_or_path, tokenizer, "pretrain", dropout=dropout)
    fit_context(args, model, "pretrain")
    if not args.packing or args.packing_strategy == "bfd":  # 'wrapped' and 'bfd_split' keep every token
        data.check_lengths(dataset, tokenizer, args.max_length, "pretrain", spec.overlength)
    with refused_by_trl("pretrain"):
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=None if from_scratch else models.lora_config(recipe, "pretrain", "CAUSAL_LM"),
        )
    # the fields TRL's SFTTrainer asks its head for
    lm_head.apply(trainer, "pretrain", spec.full_logits, ("log_probs", "entropy", "is_top1"))
    if not dropout:
        dropout_off(trainer, "pretrain", switched_off)
    result, figures = fit(trainer, STAGE, folder, resume)
    if not dropout:
        models.restore_dropout(trainer.accelerator.unwrap_model(trainer.model), switched_off)
    models.save(trainer, tokenizer, folder, recipe, base=recipe.model.name_or_path)
    return train_metrics(trainer, result, figures)


def _wrapped(settings: dict, context, defaults: dict) -> dict:
    return {"packing_strategy": "wrapped"} if settings.get("packing") else {}


STAGE = Stage(
    name="pretrain",
    about="next-token prediction on raw text (TRL's SFTTrainer)",
    config_class=config_class,
    run=run,
    data="text",
    writes="causal_lm",
    settings=SupervisedSettings,
    from_scratch=True,
    policy=True,
    defaults=(
        Default(
            "packing_strategy",
            "`wrapped` when `packing: true`",
            "TRL's `bfd` cuts every document at "
            "`max_length` and drops the rest without a word; `wrapped` keeps every token",
            _wrapped,
        ),
        FULL_LOGITS,
    ),
)
