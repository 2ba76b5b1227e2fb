"""ppo: reinforcement learning against the reward model, kept near the reference (the model it starts from) by a
per-token KL penalty, with InstructGPT's PPO-ptx; alignkit's own PPO (ppo_trainer.py), which resumes exactly.

TRL removed its PPO after 1.12; this stage needs nothing from TRL.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import data, models
from ..errors import Problem, UserError
from ..log import log
from ..schema import Dataset, Recipe, RewardModelSettings
from .spec import Default, Stage, train_metrics


def config_class():
    from .ppo_trainer import PPOConfig

    return PPOConfig


@dataclass
class PPOSettings(RewardModelSettings):
    """stages.ppo: the common keys, reward_model, and PPO-ptx's pretraining text."""

    ptx_dataset: Dataset | None = field(
        default=None,
        metadata={
            "help": "PPO-ptx's pretraining text, read with trainer.ptx_coef > 0 (default: the pretrain "
            "stage's dataset)"
        },
    )
    separate_reference: bool = field(
        default=False,
        metadata={
            "help": "with LoRA, load the reference as a second frozen copy of the model instead of using the "
            "policy with its adapter disabled (alignkit's default: no second copy in memory)"
        },
    )


def check(recipe: Recipe, settings, args, context, problems: list[Problem]) -> None:
    """Rules across keys, checked with the recipe so that a bad split fails before earlier stages train."""
    key = "stages.ppo.trainer"
    rollout = args.batch_sizes()[0]  # responses per process per update (TRL 1.12's local_batch_size)
    if args.whiten_rewards and rollout < 8:
        problems.append(
            Problem(
                f"{key}.whiten_rewards",
                f"whitening needs rollout batches of at least 8 answers per process; these have {rollout} "
                "(per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches): raise one of them",
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
    if args.ptx_coef > 0 and not ptx_data(recipe, settings):
        problems.append(
            Problem(
                f"{key}.ptx_coef",
                "PPO-ptx needs pretraining text: set stages.ppo.ptx_dataset "
                "(a dataset with a 'text' column), or add a pretrain stage, whose data it takes",
            )
        )


def run(recipe: Recipe, folder: Path, inputs: dict, resume: str | None, args) -> dict:
    from ..guard import fit
    from .ppo_trainer import PPOTrainer

    spec = recipe.stages["ppo"]
    if os.environ.get("ACCELERATE_USE_FSDP") == "true" or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        raise UserError(
            "the ppo stage cannot run sharded (ZeRO-3 or FSDP): it samples from the whole policy on every "
            "process. Run ppo with recipes/accelerate/zero2.yaml or ddp.yaml"
        )
    # (under DeepSpeed a mini-batch is gradient_accumulation_steps micro-batches, the steps DeepSpeed's engine
    # accumulates: any num_mini_batches works)
    tokenizer = models.load_tokenizer(recipe, inputs["model"])
    # Dropout off in all four models, set in their configs before they are built (some architectures apply it from
    # the config, where switching modules off does not reach): with it on, the policy's log-probabilities differ
    # from the reference's before any update.
    policy = models.load_causal_lm(recipe, inputs["model"], tokenizer, "ppo", dropout=False)
    switched_off = models.dropout_settings(models.read_config(recipe, inputs["model"]))
    if switched_off:
        log(
            "ppo",
            "dropout off in the policy, reference, reward and value models (alignkit: "
            f"{', '.join(f'{k} {v:g}' for k, v in switched_off.items())} -> 0)",
        )
    lora = _without_dropout(models.lora_config(recipe, "ppo", "CAUSAL_LM"))
    # The KL reference: the model ppo starts from, or (a later round, which continues the last round's policy) the
    # one `inputs["reference"]` names, the sft model. With LoRA the reference is the policy with its adapter
    # disabled, not a second copy (unless asked for one).
    reference = (inputs["reference"] or recipe.model.name_or_path) if "reference" in inputs else inputs["model"]
    shared = lora is not None and not spec.separate_reference
    if shared and reference != inputs["model"]:
        raise UserError("ppo: a later round's reference is another model than its policy; LoRA cannot share it")
    ref = None if shared else models.load_causal_lm(recipe, reference, tokenizer, "ppo", dropout=False)
    if reference != inputs["model"]:
        log("ppo", f"policy from {inputs['model']}, KL reference {reference}")
    if lora is not None:
        log("ppo", "reference: " + ("the policy with its adapter disabled" if shared else "a second frozen copy"))
    elif spec.separate_reference:
        log("ppo", "stages.ppo.separate_reference has no effect without LoRA: the reference is a copy anyway")
    if lora:
        policy = _with_adapter(policy, lora, args)
    reward = models.load_reward_model(recipe, inputs["reward_model"], tokenizer, "ppo", dropout=False)
    value = _value_model(recipe, inputs["reward_model"], tokenizer, lora is not None, args)
    if args.gradient_checkpointing:
        for model in (policy, value):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    context = models.context_length(policy.config)
    limit = context - args.response_length
    if limit < 1:
        raise UserError(
            f"stages.ppo.trainer.response_length ({args.response_length}) leaves no room for a prompt in "
            f"the model's context of {context} tokens; lower it"
        )
    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"  # generation continues from the right end of each prompt

    def prompt_ids(row):
        return left(data.render(row, left, add_generation_prompt=True), add_special_tokens=False).input_ids

    prompts = data.load(spec.dataset, "ppo", recipe, STAGE.data)
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
    ptx = _ptx_blocks(recipe, spec, tokenizer, _ptx_length(recipe, args, context)) if args.ptx_coef > 0 else None
    stop = tokenizer.eos_token_id if args.stop_token == "eos" else args.stop_token_id
    trainer = PPOTrainer(
        args,
        policy,
        ref,
        reward,
        value,
        left,
        train,
        STAGE,
        ptx=ptx,
        stop_token_id=stop,
        reference_is_policy=reference == inputs["model"],
    )
    _, figures = fit(trainer, STAGE, folder, resume)
    # the saved model keeps the dropout it came with, for later stages
    models.restore_dropout(trainer.accelerator.unwrap_model(trainer.model).policy, switched_off)
    models.save(trainer, tokenizer, folder, recipe, base=inputs["model"])
    wrapped = trainer.accelerator.unwrap_model(trainer.model)
    return train_metrics(trainer, figures=figures, parts={"policy": wrapped.policy, "value": wrapped.value_model})


def _without_dropout(lora):
    """A LoRA config with the adapters' dropout off, as in the four models (the rollout samples in eval mode, the
    update runs in train mode: with dropout the two would differ before any update)."""
    if lora is not None and lora.lora_dropout:
        log("ppo", f"lora_dropout {lora.lora_dropout:g} -> 0 in the policy's and value model's adapters (alignkit)")
        lora.lora_dropout = 0.0
    return lora


def _with_adapter(model, lora, args):
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_quantized", False):  # QLoRA: norms in fp32, inputs that carry gradients
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    return get_peft_model(model, lora)


def _value_model(recipe: Recipe, path: str, tokenizer, adapter: bool, args):
    """The value model starts from the reward model. With LoRA it gets an adapter of its own (its score head trains
    in full) over frozen weights, quantized as the recipe says: of PPO's four models only two adapters and the value
    head train."""
    if not adapter:
        return models.load_reward_model(recipe, path, tokenizer, dropout=False)
    return _with_adapter(
        models.load_reward_model(recipe, path, tokenizer, "ppo", dropout=False),
        _without_dropout(models.lora_config(recipe, "ppo", "SEQ_CLS")),
        args,
    )


def ptx_data(recipe: Recipe, settings: PPOSettings) -> list:
    """PPO-ptx's pretraining text, where trainer.ptx_coef > 0: stages.ppo.ptx_dataset, else the pretrain stage's."""
    trainer = settings.trainer if isinstance(settings.trainer, dict) else {}
    try:
        coef = float(trainer.get("ptx_coef") or 0)
    except (TypeError, ValueError):  # reported with the trainer block
        return []
    if not coef > 0:
        return []
    if settings.ptx_dataset is not None:
        return [("stages.ppo.ptx_dataset", settings.ptx_dataset, "text")]
    pretrain = recipe.stages.get("pretrain")
    if pretrain is not None and pretrain.dataset is not None:
        return [("stages.pretrain.dataset", pretrain.dataset, "text")]
    return []


def _ptx_length(recipe: Recipe, args, context: int) -> int:
    """PPO-ptx's block length: ptx_max_length, else the pretrain stage's max_length, else 512; at most the context."""
    pretrain = recipe.stages.get("pretrain")
    asked = args.ptx_max_length or (pretrain.trainer.get("max_length") if pretrain is not None else None) or 512
    return min(asked, context)


def _ptx_blocks(recipe: Recipe, spec: PPOSettings, tokenizer, context: int) -> list[list[int]]:
    """PPO-ptx's pretraining text as blocks of `context` tokens: every document with EOS after it, concatenated and
    cut (the pretrain stage's packing)."""
    key, source, kind = ptx_data(recipe, spec)[0]
    rows = data.load(source, key, recipe, kind)
    ids: list[int] = []
    for text in rows["text"]:
        ids += tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    blocks = [ids[i : i + context] for i in range(0, len(ids) - context + 1, context)] or [ids[:context]]
    log("ppo", f"PPO-ptx: {len(blocks)} blocks of {context} tokens of pretraining text from {source.path}")
    return blocks


def _stop_at_eos(settings: dict, context, defaults: dict) -> dict:
    return {} if "stop_token_id" in settings else {"stop_token": "eos"}


STAGE = Stage(
    name="ppo",
    about="reinforcement learning against the reward model (alignkit's PPO, with PPO-ptx)",
    config_class=config_class,
    run=run,
    data="prompts",
    writes="causal_lm",
    settings=PPOSettings,
    model_from=("pretrain", "sft"),
    reward_model=True,
    policy=True,
    rounds=True,
    hub_tags=("rlhf", "ppo"),
    check=check,
    more_data=ptx_data,
    figures=(
        ("objective/scores", "reward"),
        ("objective/kl", "kl"),
        ("eps", "episodes/s"),
        ("policy/clipfrac_avg", "clip fraction"),
        ("loss/value_avg", "value loss"),
        ("loss/ptx_avg", "ptx loss"),
    ),
    training_reward="objective/scores",
    curves=(
        ("objective/scores", "PPO reward (reward model's score)", "score"),
        ("objective/kl", "PPO KL to the reference", "nats per response"),
        ("policy/clipfrac_avg", "PPO clip fraction", "share of tokens"),
        ("loss/value_avg", "value loss", "loss"),
        ("loss/ptx_avg", "PPO-ptx: loss on pretraining text", "loss"),
    ),
    notes="reward: the reward model's mean score of the responses sampled in the last update; kl: their KL to the "
    "reference (the model ppo started from), summed over each response's tokens; episodes/s: responses sampled and "
    "trained on per second; clip fraction: share of response tokens whose probability ratio PPO clipped (a large "
    "share: updates larger than cliprange allows); value loss: the value model's clipped squared error; ptx loss: "
    "the language-modelling loss on pretraining text, with PPO-ptx",
    defaults=(
        Default(
            "stop_token",
            "`eos`",
            "TRL's default never stops a response: every answer runs to `response_length`",
            _stop_at_eos,
        ),
        Default(
            "dropout",
            "0 in every model's config and in LoRA adapters",
            "with dropout on, the policy's log-probabilities differ from the reference's, and the update's from the "
            "rollout's, before any update; switching dropout modules off misses architectures that apply it from "
            "their config (OPT)",
        ),
    ),
)
