"""dpo: Direct Preference Optimization (Rafailov et al. 2023) on comparisons (TRL's DPOTrainer): the policy learns from
chosen/rejected answers directly, kept near the model it starts from by beta, with no reward model and no sampling.
An alternative to reward + ppo; a recipe may hold both, so that the report compares them."""

from __future__ import annotations

from pathlib import Path

from .. import data, lm_head, models
from ..schema import Recipe
from .spec import FULL_LOGITS, LanguageModelSettings, Stage, fit_context, refused_by_trl, train_metrics


def config_class():
    from trl import DPOConfig

    return DPOConfig


def run(recipe: Recipe, folder: Path, inputs: dict, resume: str | None, args) -> dict:
    from trl import DPOTrainer

    from ..guard import fit

    spec = recipe.stages["dpo"]
    dataset = data.load(spec.dataset, "dpo", recipe, STAGE.data)
    tokenizer = models.load_tokenizer(recipe, inputs["model"])
    model = models.load_causal_lm(recipe, inputs["model"], tokenizer, "dpo")
    fit_context(args, model, "dpo")

    def longest(row):  # prompt and answer together, the longer side of the pair
        return max(
            len(tokenizer(data.render({**row, "chosen": row[side]}, tokenizer), add_special_tokens=False).input_ids)
            for side in ("chosen", "rejected")
        )

    data.check_lengths(dataset, tokenizer, args.max_length, "dpo", spec.overlength, "pairs", measure=longest)
    peft_config = models.lora_config(recipe, "dpo", "CAUSAL_LM")
    # the reference is the starting model: a frozen copy, or under LoRA the policy with its adapter disabled
    reference = None if peft_config else models.load_causal_lm(recipe, inputs["model"], tokenizer, "dpo")
    with refused_by_trl("dpo"):
        trainer = DPOTrainer(
            model=model,
            ref_model=reference,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    # the fields TRL asks its head for: WPO's weights need log_sum_sq_probs
    extra = ("log_sum_sq_probs",) if getattr(trainer, "use_weighting", False) else ()
    lm_head.apply(trainer, "dpo", spec.full_logits, ("log_probs", "entropy", "mean_logits", "is_top1", *extra))
    result, figures = fit(trainer, STAGE, folder, resume)
    models.save(trainer, tokenizer, folder, recipe, base=inputs["model"])
    return train_metrics(trainer, result, figures)


STAGE = Stage(
    name="dpo",
    about="Direct Preference Optimization on comparisons (TRL's DPOTrainer), instead of reward + ppo",
    config_class=config_class,
    run=run,
    data="comparisons",
    writes="causal_lm",
    settings=LanguageModelSettings,
    model_from=("pretrain", "sft"),
    policy=True,
    defaults=(FULL_LOGITS,),
    hub_tags=("dpo",),
    figures=(("loss", "loss"), ("rewards/accuracies", "accuracy"), ("rewards/margins", "margin")),
    curves=(("rewards/margins", "DPO margin (chosen - rejected implicit reward)", "beta x log-ratio"),),
)
