"""ppo: reinforcement learning against the reward model, kept near the SFT model by a KL penalty (TRL's PPOTrainer).

This is the one module that imports TRL's experimental API. TRL removed PPO after 1.12, so the pin (trl 1.12.x) or a
replacement touches this file alone.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from .. import data, models
from ..errors import NonFinite, Problem, UserError
from ..log import log
from ..recipe import Recipe, RewardModelSettings
from .spec import Default, Stage, refused_by_trl, train_metrics

TRL_PPO = "trl>=1.12,<1.13"


def _experimental():
    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError:
        import trl

        raise UserError(
            f"the ppo stage needs TRL's PPO, which TRL removed after 1.12; installed is trl "
            f"{trl.__version__}. Install the supported line: pip install '{TRL_PPO}'"
        ) from None
    return PPOConfig, PPOTrainer


def config_class():
    import warnings

    with warnings.catch_warnings():  # "experimental API" is known and pinned
        warnings.simplefilter("ignore")
        return _experimental()[0]


def check(recipe: Recipe, settings, args, context, problems: list[Problem]) -> None:
    """What TRL's PPOTrainer checks only when it starts, after the earlier stages have trained: checked with the
    recipe instead."""
    key = "stages.ppo.trainer"
    rollout = args.per_device_train_batch_size * args.gradient_accumulation_steps  # prompts per process per batch
    if rollout % args.num_mini_batches:
        fits = [n for n in range(1, rollout + 1) if rollout % n == 0]
        problems.append(
            Problem(
                f"{key}.num_mini_batches",
                f"{args.num_mini_batches} does not divide a process's "
                f"rollout batch (per_device_train_batch_size x gradient_accumulation_steps = "
                f"{rollout}), which PPO splits into num_mini_batches; use one of {fits}",
            )
        )
    elif args.whiten_rewards and rollout // args.num_mini_batches < 8:
        problems.append(
            Problem(
                f"{key}.whiten_rewards",
                f"whitening needs mini-batches of at least 8 answers per "
                f"process; these have {rollout // args.num_mini_batches}: lower num_mini_batches or "
                f"raise per_device_train_batch_size",
            )
        )
    if context and args.response_length >= context[0]:
        told = "" if "response_length" in settings.trainer else "TRL's default of "
        problems.append(
            Problem(
                f"{key}.response_length",
                f"{told}{args.response_length} tokens leave no room for a "
                f"prompt in the model's context of {context[0]} tokens ({context[1]}); set "
                f"response_length below {context[0]}, with room to spare for the prompts",
            )
        )


def run(recipe: Recipe, folder: Path, inputs: dict, resume: str | None, args) -> dict:
    from ..guard import divergence_fix, fit

    _, PPOTrainer = _experimental()
    spec = recipe.stages["ppo"]
    if os.environ.get("ACCELERATE_USE_FSDP") == "true" or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        raise UserError(
            "the ppo stage cannot run sharded (ZeRO-3 or FSDP): its policy is saved from the main "
            "process, which would hold a shard. Run ppo with recipes/accelerate/zero2.yaml or ddp.yaml"
        )
    if resume:
        log("ppo", "TRL's PPO cannot resume from a checkpoint; training starts again")

    tokenizer = models.load_tokenizer(recipe, inputs["model"])
    # Dropout off in all four models (TRL switches off dropout modules only; some architectures apply it from their
    # config): with it on, the policy's log-probabilities differ from the reference's before any update.
    policy = models.load_causal_lm(recipe, inputs["model"], tokenizer, "ppo", dropout=False)
    switched_off = models.dropout_settings(models.read_config(recipe, inputs["model"]))
    if switched_off:
        log(
            "ppo",
            "dropout off in the policy, reference, reward and value models (alignkit: "
            f"{', '.join(f'{k} {v:g}' for k, v in switched_off.items())} -> 0)",
        )
    peft_config = models.lora_config(recipe, "ppo", "CAUSAL_LM")
    # With LoRA the reference is the policy with its adapter disabled, not a second copy.
    ref = None if peft_config else models.load_causal_lm(recipe, inputs["model"], tokenizer, "ppo", dropout=False)
    reward = models.load_reward_model(recipe, inputs["reward_model"], tokenizer, "ppo", dropout=False)
    value = _value_model(recipe, inputs["reward_model"], tokenizer, peft_config)
    args.sft_model_path, args.reward_model_path = inputs["model"], inputs["reward_model"]

    prompts = data.load(spec.dataset, "ppo", recipe)
    limit = models.context_length(policy.config) - args.response_length
    if limit < 1:
        raise UserError(
            f"stages.ppo.trainer.response_length ({args.response_length}) leaves no room for a prompt in "
            f"the model's context of {models.context_length(policy.config)} tokens; lower it"
        )
    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"  # generation continues from the right end of each prompt

    def prompt_ids(row):
        return left(data.render(row, left, add_generation_prompt=True), add_special_tokens=False).input_ids

    data.check_lengths(
        prompts,
        left,
        limit,
        "ppo",
        spec.overlength,
        "prompts (with room for the response)",
        measure=lambda row: len(prompt_ids(row)),
    )
    # keep the end of a long prompt: the question and the generation prompt
    train = prompts.map(
        lambda row: {"input_ids": prompt_ids(row)[-limit:]},
        remove_columns=prompts.column_names,
        load_from_cache_file=False,
    )
    with refused_by_trl("ppo"):
        trainer = PPOTrainer(
            args=args,
            processing_class=left,
            model=policy,
            ref_model=ref,
            reward_model=reward,
            value_model=value,
            train_dataset=train,
            peft_config=peft_config,
            eval_dataset=train.select(range(min(8, len(train)))),
        )
    try:
        _, figures = fit(trainer, STAGE, folder)
    except RuntimeError as e:  # sampling from a policy whose weights blew up: the one place TRL 1.12 meets it
        if "probability tensor contains" not in str(e):
            raise
        raise NonFinite(
            f"ppo: training diverged after update {trainer.state.global_step}: sampling from the policy "
            f"met NaN or infinite probabilities. The stage is not marked complete.\n  "
            f"{divergence_fix(STAGE, args)}"
        ) from None
    for key, value in switched_off.items():  # the saved model keeps the dropout it came with, for later fine-tuning
        setattr(policy.config, key, value)
    models.save(trainer, tokenizer, folder, recipe, base=inputs["model"])
    wrapped = trainer.accelerator.unwrap_model(trainer.model)
    return train_metrics(trainer, figures=figures, parts={"policy": wrapped.policy, "value": wrapped.value_model})


def _value_model(recipe: Recipe, path: str, tokenizer, peft_config):
    """The value model starts from the reward model. TRL trains it in full; with LoRA alignkit gives it an adapter
    (and quantizes its frozen weights as the recipe says), which removes PPO's largest remaining memory cost."""
    if peft_config is None:
        return models.load_reward_model(recipe, path, tokenizer, dropout=False)
    from peft import get_peft_model

    # the adapter and the score head stay in full precision: TRL reads values outside autocast
    return get_peft_model(
        models.load_reward_model(recipe, path, tokenizer, "ppo", dropout=False),
        models.lora_config(recipe, "ppo", "SEQ_CLS"),
    )


def _stop_at_eos(settings: dict, context, defaults: dict) -> dict:
    return {} if "stop_token_id" in settings else {"stop_token": "eos"}


def _no_checkpoints(settings: dict, context, defaults: dict) -> dict:
    return {"save_strategy": "no"}


STAGE = Stage(
    name="ppo",
    about="reinforcement learning against the reward model (TRL 1.12's PPOTrainer)",
    config_class=config_class,
    run=run,
    data="prompts",
    writes="causal_lm",
    settings=RewardModelSettings,
    model_from=("pretrain", "sft"),
    reward_model=True,
    policy=True,
    resumable=False,
    clips_gradients=False,
    hub_tags=("rlhf", "ppo"),
    check=check,
    figures=(("objective/scores", "reward"), ("objective/kl", "kl")),
    curves=(
        ("objective/scores", "PPO reward (reward model's score)", "score"),
        ("objective/kl", "PPO KL to the SFT model", "nats per response"),
    ),
    defaults=(
        Default(
            "stop_token",
            "`eos`",
            "TRL's default never stops a response: every answer runs to `response_length`",
            _stop_at_eos,
        ),
        Default(
            "save_strategy",
            "`no`",
            "TRL's PPO cannot resume from its checkpoints, and writing them fails under DDP",
            _no_checkpoints,
        ),
        Default(
            "dropout",
            "0 in every model's config",
            "with dropout on, the policy's log-probabilities differ from "
            "the reference's before any update; TRL switches off dropout modules only, which misses architectures "
            "that apply it from their config (OPT)",
        ),
    ),
)
