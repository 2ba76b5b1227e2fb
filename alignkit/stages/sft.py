"""sft: supervised fine-tuning on demonstrations (TRL's SFTTrainer), so the model answers and ends with EOS."""

from __future__ import annotations

from pathlib import Path

from .. import data, lm_head, models
from ..recipe import Recipe
from .spec import FULL_LOGITS, LanguageModelSettings, Stage, fit_context, refused_by_trl, train_metrics


def config_class():
    from trl import SFTConfig

    return SFTConfig


def run(recipe: Recipe, folder: Path, inputs: dict, resume: str | None, args) -> dict:
    from trl import SFTTrainer

    from ..guard import fit

    spec = recipe.stages["sft"]
    dataset = data.load(spec.dataset, "sft", recipe)
    tokenizer = models.load_tokenizer(recipe, inputs["model"])
    model = models.load_causal_lm(recipe, inputs["model"], tokenizer, "sft")
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
    result, figures = fit(trainer, STAGE, folder, resume)
    models.save(trainer, tokenizer, folder, recipe, base=inputs["model"])
    return train_metrics(trainer, result, figures)


STAGE = Stage(
    name="sft",
    about="supervised fine-tuning on demonstrations (TRL's SFTTrainer)",
    config_class=config_class,
    run=run,
    data="demonstrations",
    writes="causal_lm",
    settings=LanguageModelSettings,
    model_from=("pretrain",),
    policy=True,
    eval_reference=True,
    defaults=(FULL_LOGITS,),
    hub_tags=("sft",),
)
