"""sft: supervised fine-tuning on demonstrations (TRL's SFTTrainer), so the model answers and ends with EOS."""

from __future__ import annotations

from pathlib import Path

from .. import data, lm_head, models
from ..schema import Recipe
from .spec import FULL_LOGITS, Stage, SupervisedSettings, dropout_off, fit_context, refused_by_trl, train_metrics


def config_class():
    from trl import SFTConfig

    return SFTConfig


def run(recipe: Recipe, folder: Path, inputs: dict, resume: str | None, args) -> dict:
    from trl import SFTTrainer

    from ..guard import fit

    spec = recipe.stages["sft"]
    dataset = data.load(spec.dataset, "sft", recipe, STAGE.data)
    tokenizer = models.load_tokenizer(recipe, inputs["model"])
    dropout = not spec.disable_dropout
    switched_off = models.dropout_settings(models.read_config(recipe, inputs["model"])) if not dropout else {}
    model = models.load_causal_lm(recipe, inputs["model"], tokenizer, "sft", dropout=dropout)
    fit_context(args, model, "sft")
    data.check_lengths(dataset, tokenizer, args.max_length, "sft", spec.overlength)
    with refused_by_trl("sft"):
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=models.lora_config(recipe, "sft", "CAUSAL_LM"),
        )
    # the fields TRL's SFTTrainer asks its head for
    lm_head.apply(trainer, "sft", spec.full_logits, ("log_probs", "entropy", "is_top1"))
    if not dropout:
        dropout_off(trainer, "sft", switched_off)
    result, figures = fit(trainer, STAGE, folder, resume)
    if not dropout:
        models.restore_dropout(trainer.accelerator.unwrap_model(trainer.model), switched_off)
    models.save(trainer, tokenizer, folder, recipe, base=inputs["model"])
    return train_metrics(trainer, result, figures)


STAGE = Stage(
    name="sft",
    about="supervised fine-tuning on demonstrations (TRL's SFTTrainer)",
    config_class=config_class,
    run=run,
    data="demonstrations",
    writes="causal_lm",
    settings=SupervisedSettings,
    model_from=("pretrain",),
    policy=True,
    eval_reference=True,
    defaults=(FULL_LOGITS,),
    hub_tags=("sft",),
)
