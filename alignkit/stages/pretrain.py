"""pretrain: next-token prediction on raw text (TRL's SFTTrainer on a 'text' dataset), giving a foundation model."""

from __future__ import annotations

from pathlib import Path

from .. import data, models
from ..recipe import Recipe
from . import train_metrics, trainer_config


def config_class():
    from trl import SFTConfig

    return SFTConfig


def run(recipe: Recipe, folder: Path, inputs: dict, resume: str | None) -> dict:
    from trl import SFTTrainer

    spec = recipe.stages["pretrain"]
    dataset = data.load(spec.dataset, "pretrain", recipe)
    tokenizer = models.load_tokenizer(recipe)
    if recipe.model.config is not None:
        model = models.build_model(recipe, tokenizer)
    else:
        model = models.load_causal_lm(recipe, recipe.model.name_or_path, tokenizer, upstream=False)
    args = trainer_config("pretrain", recipe, folder, model)
    if not args.packing:  # packed text is cut into full windows by design; unpacked rows are cut at max_length
        data.check_lengths(dataset, tokenizer, args.max_length, "pretrain", spec.overlength)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=models.lora_config(recipe, "CAUSAL_LM"))
    result = trainer.train(resume_from_checkpoint=resume)
    models.save(trainer.model, tokenizer, folder)
    return train_metrics(trainer, result)
