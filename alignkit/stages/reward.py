"""reward: a reward model trained on comparisons (TRL's RewardTrainer), scoring a whole answer at its EOS token."""

from __future__ import annotations

from pathlib import Path

from .. import data, models
from ..recipe import Recipe
from .spec import Stage, fit_context, refused_by_trl, train_metrics


def config_class():
    from trl import RewardConfig

    return RewardConfig


def run(recipe: Recipe, folder: Path, inputs: dict, resume: str | None, args) -> dict:
    from trl import RewardTrainer

    from ..guard import fit

    spec = recipe.stages["reward"]
    dataset = data.load(spec.dataset, "reward", recipe)
    tokenizer = models.load_tokenizer(recipe, inputs["model"])
    model = models.load_reward_model(recipe, inputs["model"], tokenizer, "reward")
    fit_context(args, model, "reward")

    def longest(row):  # TRL drops a pair when either side is too long
        return max(
            len(tokenizer(data.render({**row, "chosen": row[side]}, tokenizer), add_special_tokens=False).input_ids)
            for side in ("chosen", "rejected")
        )

    data.check_lengths(
        dataset, tokenizer, args.max_length, "reward", spec.overlength, "pairs", measure=longest, dropped=True
    )
    with refused_by_trl("reward"):
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=models.lora_config(recipe, "reward", "SEQ_CLS"),
        )
    result, figures = fit(trainer, STAGE, folder, resume)
    models.save(trainer, tokenizer, folder, recipe, base=inputs["model"], reward=True)
    return train_metrics(trainer, result, figures)


STAGE = Stage(
    name="reward",
    about="a reward model trained on comparisons (TRL's RewardTrainer)",
    config_class=config_class,
    run=run,
    data="comparisons",
    writes="reward_model",
    model_from=("pretrain", "sft"),
    hub_tags=("reward-model",),
    figures=(("loss", "loss"), ("accuracy", "accuracy")),
)
