"""alignkit's PPO for language models, written from the papers: Ouyang et al. 2022 (InstructGPT, with PPO-ptx),
Ziegler et al. 2019 (the per-token KL penalty and the adaptive KL controller), Schulman et al. 2017 (clipped
surrogate), Schulman et al. 2016 (GAE) and Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO".

One update:
1. rollout: sample a response to each prompt of a batch from the policy (KV cache, stopped at the stop token; gradient
   checkpointing is switched off while sampling, since under it transformers drops the cache in train mode), then
   record per response token, from a full forward of the same kind the update runs, the policy's and the reference's
   log-probabilities (at the sampling temperature) and the value model's estimate; the reward model scores the whole
   response at its last token (the stop token). The first update's mini-batch therefore has ratios of 1 (to the
   rounding of the update's batch shapes), and generate()'s own log-probabilities are kept only to check the sampler
   against the forward; only the response positions' logits are computed (logits_to_keep), here and in the update;
2. rewards: -kl_coef * (log p_policy - log p_reference) on every response token, plus the score on the last one
   (minus missing_eos_penalty where the response never stopped); optionally whitened;
3. advantages by GAE (gamma, lam), whitened over the batch; returns = advantages + values;
4. num_ppo_epochs passes over the batch in num_mini_batches shuffled mini-batches, one optimizer step each (TRL
   1.12's sizes: a mini-batch is per_device_train_batch_size x gradient_accumulation_steps responses per process, in
   micro-batches of per_device_train_batch_size, and a rollout batch is num_mini_batches mini-batches): clipped policy
   loss + vf_coef x clipped value loss (+ ptx_coef x the language-modelling loss on a batch of pretraining text:
   PPO-ptx), the policy's and the value model's gradients each clipped to max_grad_norm by its own norm (alignkit's
   choice: with one norm over both, a large value gradient shrinks the policy's step; TRL 1.12 did not clip);
5. the learning-rate schedule steps once per update; an adaptive KL controller (kl_target set) moves kl_coef.

At the first update policy and reference are the same model, so the sampled responses' KL to the reference must be ~0,
generate()'s log-probabilities must equal the forward's, and the first mini-batch's ratios must be 1:
`PPOTrainer._first_update_check` checks all three (tolerances measured for fp32 and bf16) and stops the stage naming
what differs and the likely causes.

Its state between updates (weights, optimizer, schedule, KL coefficient, episode count, data position, every RNG)
is written in each checkpoint, so a run resumes exactly where it stopped. It subclasses transformers' Trainer for the
accelerator, optimizer, schedule, callbacks and logging, and replaces train().
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import GenerationConfig, Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import rotate_checkpoints

from ..errors import FirstUpdateMismatch, NonFinite
from ..schema import above, at_least, between

STATE_FILE = "ppo_state.json"  # what a checkpoint adds to the Trainer's own files
RNG_FILE = "rng_state_{rank}.json"  # every generator, as JSON: a pickle in a run folder could run code on resume
VALUE_DIR = "value"  # the value model's weights inside a checkpoint
ACCELERATOR_DIR = "accelerator"  # under DeepSpeed: accelerate's save_state (the sharded optimizer)


@dataclass
class PPOConfig(TrainingArguments):
    """The ppo stage's trainer block: TrainingArguments and PPO's own settings. Names and defaults follow TRL 1.12's
    PPOConfig, which recipes were written for; kl_target, kl_horizon and ptx_coef are alignkit's."""

    total_episodes: int | None = field(
        default=None,
        metadata={
            "range": at_least(1, "0 skips PPO"),
            "help": "responses to sample in all (default: num_train_epochs x the prompts)",
        },
    )
    num_ppo_epochs: int = field(default=4, metadata={"range": at_least(1), "help": "passes over each rollout batch"})
    num_mini_batches: int = field(
        default=1,
        metadata={
            "range": at_least(1, "PPO splits each rollout batch into this many"),
            "help": "optimizer steps per pass over a rollout batch (TRL 1.12's meaning: the rollout batch holds "
            "num_mini_batches x per_device_train_batch_size x gradient_accumulation_steps responses per process)",
        },
    )
    local_rollout_forward_batch_size: int = field(
        default=64,
        metadata={"range": at_least(1), "help": "responses generated and scored at once (memory, not the result)"},
    )
    response_length: int = field(default=53, metadata={"range": at_least(1), "help": "longest response, in tokens"})
    temperature: float = field(
        default=0.7, metadata={"range": above(0), "help": "sampling temperature (log-probabilities use it too)"}
    )
    stop_token: Literal["eos"] | None = field(
        default=None, metadata={"help": "'eos': a response ends at the tokenizer's EOS (or set stop_token_id)"}
    )
    stop_token_id: int | None = field(
        default=None, metadata={"range": at_least(0), "help": "the token id that ends a response"}
    )
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={
            "range": at_least(0, "it is subtracted: a negative one would reward answers that never end"),
            "help": "subtracted from the score of a response that never reaches the stop token",
        },
    )
    kl_coef: float = field(
        default=0.05,
        metadata={"range": at_least(0), "help": "beta: weight of the per-token KL penalty (initial value)"},
    )
    kl_estimator: Literal["k1", "k3"] = field(
        default="k1",
        metadata={
            "help": "per-token KL estimate: k1 = log p - log q (unbiased as a reward); k3 = (q/p - 1) - "
            "log(q/p) (never negative, but its policy gradient is biased away from p = q)"
        },
    )
    kl_target: float | None = field(
        default=None,
        metadata={
            "range": above(0, "the KL the adaptive coefficient aims at"),
            "help": "adaptive KL (Ziegler et al. 2019): move kl_coef so the KL per response nears this",
        },
    )
    kl_horizon: int = field(
        default=10000,
        metadata={
            "range": at_least(1, "the adaptive coefficient divides by it"),
            "help": "episodes over which the adaptive KL coefficient adapts",
        },
    )
    cliprange: float = field(
        default=0.2, metadata={"range": above(0), "help": "PPO's clip range for the probability ratio"}
    )
    cliprange_value: float = field(
        default=0.2, metadata={"range": above(0), "help": "clip range for the value estimates"}
    )
    vf_coef: float = field(default=0.1, metadata={"range": at_least(0), "help": "weight of the value loss"})
    gamma: float = field(default=1.0, metadata={"range": between(0, 1), "help": "discount (InstructGPT: 1)"})
    lam: float = field(default=0.95, metadata={"range": between(0, 1), "help": "GAE's lambda"})
    whiten_rewards: bool = field(default=False, metadata={"help": "whiten the rewards of each batch"})
    ptx_coef: float = field(
        default=0.0,
        metadata={
            "range": at_least(0, "0 turns PPO-ptx off"),
            "help": "PPO-ptx (InstructGPT): weight of a language-modelling loss on pretraining text, added to "
            "every PPO step; 0 = off",
        },
    )
    ptx_max_length: int | None = field(
        default=None,
        metadata={
            "range": at_least(1),
            "help": "tokens per block of PPO-ptx's text (default: the pretrain stage's max_length, else 512; "
            "at most the model's context)",
        },
    )
    check_first_update: bool = field(
        default=True,
        metadata={
            "help": "stop at the first update unless the sampled responses' KL to the reference is ~0, generate()'s "
            "log-probabilities equal a full forward's and the first mini-batch's ratios are 1 (alignkit)"
        },
    )
    num_sample_generations: int = field(
        default=10,
        metadata={"range": at_least(0), "help": "times during training to log a few sampled responses (0: never)"},
    )
    # TRL's defaults where they differ from TrainingArguments'
    learning_rate: float = field(
        default=3e-6, metadata={"range": above(0), "help": "the initial learning rate (AdamW)"}
    )
    logging_steps: float = field(default=10, metadata={"range": above(0), "help": "log every N updates"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "trade compute for memory"})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision (default: on unless fp16)"})

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = not self.fp16
        super().__post_init__()

    def batch_sizes(self) -> tuple[int, int, int]:
        """(prompts per process per update, responses per optimizer step per process, per micro-batch), as TRL
        1.12's PPOTrainer computed them (local_batch_size, local_mini_batch_size, per_device_train_batch_size)."""
        mini = self.per_device_train_batch_size * self.gradient_accumulation_steps
        return mini * self.num_mini_batches, mini, self.per_device_train_batch_size


# --- the math, on tensors (tested against hand computations) -------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / std over the masked entries (std unbiased); with shift_mean False the mean is added back."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    variance = masked_mean((values - mean) ** 2, mask) * (count / (count - 1).clamp(min=1))
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def per_token_rewards(logprobs, ref_logprobs, scores, mask, kl_coef: float, estimator: str = "k1"):
    """Each response token's reward: -kl_coef x its KL estimate, plus the sequence's score on its last token.
    Returns (rewards, kl), both zero past each response's end."""
    log_ratio = (logprobs - ref_logprobs) * mask
    kl = log_ratio if estimator == "k1" else (torch.exp(-log_ratio) - 1) + log_ratio
    rewards = -kl_coef * kl * mask
    last = mask.sum(dim=1).long() - 1  # index of each response's last token
    rewards[torch.arange(len(rewards)), last.clamp(min=0)] += scores
    return rewards, kl * mask


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalized advantage estimation over each response's tokens (the state after the last token is terminal).
    Returns (advantages, returns)."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def clipped_losses(
    new_logprobs, old_logprobs, advantages, new_values, old_values, returns, mask, cliprange, cliprange_value
):
    """PPO's clipped surrogate policy loss and clipped value loss (token means), and their clip fractions."""
    ratio = torch.exp(new_logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    policy_loss = masked_mean(torch.max(unclipped, clipped), mask)
    values_clipped = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    value_losses = torch.max((new_values - returns) ** 2, (values_clipped - returns) ** 2)
    value_loss = 0.5 * masked_mean(value_losses, mask)
    return (
        policy_loss,
        value_loss,
        {
            "policy_clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "value_clipfrac": masked_mean(
                ((values_clipped - returns) ** 2 > (new_values - returns) ** 2).float(), mask
            ),
            "approxkl": 0.5 * masked_mean((new_logprobs - old_logprobs) ** 2, mask),
            "ratio": masked_mean(ratio, mask),
        },
    )


class AdaptiveKL:
    """Ziegler et al. 2019: beta <- beta x (1 + clip(KL / target - 1, -0.2, 0.2) x episodes / horizon)."""

    def __init__(self, value: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, episodes: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * episodes / self.horizon


# --- the first update's check -------------------------------------------------------------------------------------

# Per-token tolerances (mean |difference in log-probability|, nats) of the first update's checks, where policy and
# reference are one model: (fp32, low precision: bf16/fp16 autocast or 4-bit weights). Measured with every shipped
# recipe in miniature (tests/test_recipes_in_miniature.py, 2026-12-06): the KL and the ratios come from one kind of
# forward and are 0 to 1e-7 in fp32 and bf16 alike; generate()'s incremental forward against a full one differs by
# ~1e-7 in fp32 and 1e-4 to 2e-2 in bf16 (a 2-layer stand-in here, 0.023 on average for a larger GPT-2 on bf16 CPU
# autocast). What the checks exist for is far larger: a dropped KV cache is off by ~1 nat per token (up to 13.7),
# dropout 0.1 by ~0.1. The sampler's log-probabilities feed nothing in training (the forward's do), so its
# low-precision tolerance is loose: it is there for a broken cache, not for rounding.
FIRST_UPDATE_TOLERANCE = {"kl": (1e-3, 5e-2), "ratio": (1e-3, 5e-2), "sampler": (1e-3, 0.25)}

FIRST_UPDATE_CHECKS = {
    "kl": (
        "the sampled responses' KL to the reference (policy and reference are the same model at the first update)",
        "dropout left on in the policy or the reference (a model whose config applies dropout, or LoRA's "
        "lora_dropout); a reference loaded differently from the policy (another folder, precision or quantization);"
        " a LoRA adapter that does not start at zero",
    ),
    "sampler": (
        "generate()'s log-probabilities of the sampled tokens against a full forward of the same policy",
        "a KV cache that generate() drops or corrupts (gradient checkpointing in train mode, a model's custom "
        "cache); dropout while sampling; low precision (fp16) in the incremental forward",
    ),
    "ratio": (
        "the first mini-batch's probability ratios, before any optimizer step (they must be 1)",
        "dropout in train mode; kernels that differ between the rollout's and the update's batch sizes in low "
        "precision; a model that is not deterministic in train mode",
    ),
}


def first_update_problems(gaps: dict[str, tuple[float, float]], low_precision: bool) -> list[str]:
    """The first update's checks that fail: `gaps` maps a check to (mean, max) of its per-token |difference|."""
    problems = []
    for name, (mean, largest) in gaps.items():
        tolerance = FIRST_UPDATE_TOLERANCE[name][low_precision]
        if not mean <= tolerance:  # NaN fails too
            what, causes = FIRST_UPDATE_CHECKS[name]
            problems.append(
                f"{what}: {mean:.3g} nats per token on average (largest {largest:.3g}), tolerance {tolerance:g}; "
                f"likely causes: {causes}"
            )
    return problems


def token_gap(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, max) of |a - b| over the masked tokens."""
    gap = (a.float() - b.float()).abs() * mask
    return masked_mean(gap, mask), gap.max() if gap.numel() else gap.new_zeros(())


# --- models -------------------------------------------------------------------------------------------------------


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: 0 at each row's first real token."""
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def _score_head(model) -> nn.Module:
    """The head a sequence classifier applies to every position before it picks the last one (GPT-2's `score`)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for name in ("score", "classifier", "v_head"):
        head = getattr(inner, name, None)
        if isinstance(head, nn.Module):
            return head
    raise TypeError(f"{type(inner).__name__} has no per-position score head (score, classifier) to read values from")


class PolicyAndValue(nn.Module):
    """The two models PPO trains, in one module, so that one forward (and one distributed wrapper) serves both."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy, self.value_model = policy, value_model
        self.config = policy.config  # transformers' Trainer reads it

    def forward(self, input_ids, attention_mask, ptx_ids=None, ptx_mask=None, keep: int = 0):
        """(the policy's logits at the last `keep` positions (0: all), the value model's estimates at every
        position, PPO-ptx's loss or None)."""
        ids = positions(attention_mask)
        logits = self.policy(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=ids, logits_to_keep=keep
        ).logits
        values = self.values(input_ids, attention_mask)
        ptx_loss = None
        if ptx_ids is not None:  # PPO-ptx: next-token loss on pretraining text, through the same forward
            labels = ptx_ids.masked_fill(ptx_mask == 0, -100)
            ptx_loss = self.policy(input_ids=ptx_ids, attention_mask=ptx_mask, labels=labels).loss
        return logits, values, ptx_loss

    def values(self, input_ids, attention_mask):
        """The value model's estimate at every position: its score head's output before the classifier picks the
        last token."""
        captured = {}
        hook = _score_head(self.value_model).register_forward_hook(lambda m, i, out: captured.update(out=out))
        try:
            self.value_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask)
            )
        finally:
            hook.remove()
        return captured["out"][..., 0]


@contextmanager
def without_checkpointing(model: nn.Module):
    """Gradient checkpointing off for a while (sampling): transformers' GPT-2 (and other models) drop the KV cache
    when checkpointing is on in train mode, even without gradients, and each sampled token then sees itself alone."""
    switched = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for module in switched:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in switched:
            module.gradient_checkpointing = True


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token) under logits / temperature, per position."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# --- the trainer --------------------------------------------------------------------------------------------------


class PPOTrainer(Trainer):
    """train() runs PPO updates; checkpoints hold everything to go on exactly. `prompts` holds tokenized prompts
    (`input_ids`); `ptx` (optional) blocks of pretraining token ids for PPO-ptx."""

    def __init__(
        self,
        args: PPOConfig,
        policy,
        ref_model,
        reward_model,
        value_model,
        tokenizer,
        prompts,
        stage,
        ptx=None,
        stop_token_id: int | None = None,
        reference_is_policy: bool = True,
    ):
        self.stage = stage  # its declaration: messages name it
        # False in a later round, whose policy goes on from the last round while the reference stays the sft model:
        # the first update's KL check then has nothing to check (the sampler's and the ratios' still hold)
        self.reference_is_policy = reference_is_policy
        self.policy, self.ref_model, self.reward_model = policy, ref_model, reward_model
        self.stop_token_id, self.prompts, self.ptx = stop_token_id, prompts, ptx
        # train mode from the start (from_pretrained leaves models in eval mode): see rollout()
        super().__init__(model=PolicyAndValue(policy, value_model).train(), args=args, processing_class=tokenizer)
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.rollout_size, self.mini_size, self.micro_size = args.batch_sizes()
        self.batch_size = self.rollout_size * self.world
        episodes = args.total_episodes or int(args.num_train_epochs * len(prompts))
        self.num_updates = max(1, math.ceil(episodes / self.batch_size))
        self.kl = AdaptiveKL(args.kl_coef, args.kl_target, args.kl_horizon)
        self.update = 0  # updates done
        self.ptx_position = 0
        self._ratio_gaps = None  # at the first update, until its first optimizer step: |new - old| log-probabilities
        self._grad_norms: list[dict] = []  # this update's gradient norms, per optimizer step
        self._first_update_figures: dict = {}
        for frozen in (ref_model, reward_model):
            if frozen is not None:
                frozen.eval().requires_grad_(False).to(self.accelerator.device)

    # --- data, deterministic by position, so that resuming needs only the position ----------------------------

    def _prompt_batch(self, update: int) -> list[list[int]]:
        """This process's prompts for `update`: global positions in a fresh seeded permutation per pass over the
        data; each process takes its slice of the global batch."""
        n, out = len(self.prompts), []
        start = update * self.batch_size + self.rank * self.rollout_size
        for g in range(start, start + self.rollout_size):
            epoch, i = divmod(g, n)
            out.append(self._order(epoch, n)[i])
        return [self.prompts[i]["input_ids"] for i in out]

    def _order(self, epoch: int, n: int) -> list[int]:
        cache = getattr(self, "_orders", {})
        if epoch not in cache:
            cache = {
                epoch: torch.randperm(n, generator=torch.Generator().manual_seed(self.args.seed + epoch)).tolist()
            }
            self._orders = cache
        return cache[epoch]

    def _ptx_batch(self, size: int):
        """The next `size` blocks of pretraining text for this process (each process takes every world-th)."""
        rows = [self.ptx[((self.ptx_position + k) * self.world + self.rank) % len(self.ptx)] for k in range(size)]
        self.ptx_position += size
        return self._pad(rows, left=False)

    def _pad(self, rows: list[list[int]], left: bool):
        pad, width = self.processing_class.pad_token_id, max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            where = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, where], mask[i, where] = torch.tensor(row), 1
        device = self.accelerator.device
        return ids.to(device), mask.to(device)

    # --- rollout --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]]) -> dict:
        """Sample responses and everything the update needs about them (see the module's docstring)."""
        args, tok = self.args, self.processing_class
        queries, query_mask = self._pad(prompts, left=True)
        width = queries.shape[1]
        # (the policy and value model stay in train mode: their dropout is off, and bitsandbytes' CPU kernels switch
        # 4-bit layers to an inference-only format in eval mode, which training then cannot use)
        model = self.accelerator.unwrap_model(self.model)
        chunks = []
        for start in range(0, len(prompts), args.local_rollout_forward_batch_size):
            q, qm = (t[start : start + args.local_rollout_forward_batch_size] for t in (queries, query_mask))
            chunks.append(self._sample(model.policy, q, qm))
        length = max(c[0].shape[1] for c in chunks)
        responses = torch.cat(
            [nn.functional.pad(c[0], (0, length - c[0].shape[1]), value=tok.pad_token_id) for c in chunks]
        )
        sampled = torch.cat([nn.functional.pad(c[1], (0, length - c[1].shape[1])) for c in chunks])
        mask = self._response_mask(responses)
        sequences = torch.cat([queries, responses], dim=1)
        attention = torch.cat([query_mask, mask.long()], dim=1)
        keep = responses.shape[1] + 1
        logprobs, ref_logprobs, values, scores = [], [], [], []
        for start in range(0, len(prompts), args.local_rollout_forward_batch_size):
            part = slice(start, start + args.local_rollout_forward_batch_size)
            s, a = sequences[part], attention[part]
            with self.accelerator.autocast():
                # the update's own forward (PolicyAndValue), so that its first ratios are 1; logits at the positions
                # that predict a response token (and one more), as in the update
                logits, value, _ = model(s, a, keep=keep)
                logprobs.append(token_logprobs(logits[:, :-1], s[:, width:], args.temperature))
                values.append(value[:, width - 1 : -1].float())
                del logits  # a full batch of logits at a time, not two
                ref_logits = self._reference_logits(model.policy, s, a, keep)
                ref_logprobs.append(token_logprobs(ref_logits[:, :-1], s[:, width:], args.temperature))
                del ref_logits
                scores.append(
                    self.reward_model(input_ids=s, attention_mask=a, position_ids=positions(a)).logits[:, 0].float()
                )
        scores = torch.cat(scores)
        if args.missing_eos_penalty is not None and self.stop_token_id is not None:
            stopped = (responses == self.stop_token_id).any(dim=1)
            scores = scores - args.missing_eos_penalty * (~stopped).float()
        return {
            "queries": queries,
            "query_mask": query_mask,
            "responses": responses,
            "mask": mask.float(),
            "logprobs": torch.cat(logprobs) * mask,
            "sampled_logprobs": sampled * mask,
            "ref_logprobs": torch.cat(ref_logprobs) * mask,
            "values": torch.cat(values) * mask,
            "scores": scores,
        }

    def _sample(self, policy, queries, query_mask):
        """Responses to a chunk of prompts (padded after the stop token) and generate()'s log-probabilities of them
        (kept to check the sampler against the forward, `first_update`)."""
        args, tok = self.args, self.processing_class
        stop = self.stop_token_id
        config = GenerationConfig(
            max_new_tokens=args.response_length,
            do_sample=True,
            temperature=args.temperature,
            top_k=0,
            top_p=1.0,
            eos_token_id=stop,
            pad_token_id=tok.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
            use_cache=True,
        )
        # while sampling, the model's own generation_config (repetition penalties, minimum lengths, its EOS) is
        # replaced by a neutral one, whose defaults generate() fills in: the responses follow the policy's
        # distribution, whose log-probabilities PPO records
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        own, base.generation_config = base.generation_config, GenerationConfig()
        try:
            with self.accelerator.autocast(), without_checkpointing(policy):
                out = policy.generate(input_ids=queries, attention_mask=query_mask, generation_config=config)
        except RuntimeError as e:
            if "probability tensor contains" not in str(e):
                raise
            raise self.diverged("sampling from the policy met NaN or infinite probabilities") from e
        finally:
            base.generation_config = own
        responses = out.sequences[:, queries.shape[1] :]
        logits = torch.stack(out.logits, dim=1)
        return responses, token_logprobs(logits, responses, args.temperature)

    def _response_mask(self, responses: torch.Tensor) -> torch.Tensor:
        """True on each response's tokens, up to and including its stop token."""
        if self.stop_token_id is None:
            return torch.ones_like(responses, dtype=torch.bool)
        stops = (responses == self.stop_token_id).int()
        after = (stops.cumsum(dim=1) - stops) > 0  # tokens after the first stop
        return ~after

    def _reference_logits(self, policy, sequences, attention, keep: int):
        kwargs = {
            "input_ids": sequences,
            "attention_mask": attention,
            "position_ids": positions(attention),
            "logits_to_keep": keep,
        }
        if self.ref_model is not None:
            return self.ref_model(**kwargs).logits
        with policy.disable_adapter():  # under LoRA the reference is the policy without its adapter
            return policy(**kwargs).logits

    # --- one update -----------------------------------------------------------------------------------------------

    def advantages(self, batch: dict) -> dict:
        args, mask = self.args, batch["mask"]
        rewards, kl = per_token_rewards(
            batch["logprobs"], batch["ref_logprobs"], batch["scores"], mask, self.kl.value, args.kl_estimator
        )
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, batch["values"], mask, args.gamma, args.lam)
        batch.update(rewards=rewards, kl=kl, advantages=masked_whiten(advantages, mask), returns=returns)
        return batch

    def _check_finite(self, batch: dict) -> None:
        checks = (
            ("scores", "the reward model's scores"),
            ("values", "the value model's estimates"),
            ("logprobs", "the policy's log-probabilities"),
            ("kl", "the KL to the reference"),
        )
        bad = torch.tensor(
            [float(not torch.isfinite(batch[key]).all()) for key, _ in checks], device=batch["kl"].device
        )
        bad = self.accelerator.reduce(bad, reduction="sum") if self.world > 1 else bad  # every process stops together
        for (key, what), flag in zip(checks, bad.tolist()):
            if flag:
                raise self.diverged(f"{what} hold NaN or infinite values")

    def diverged(self, what: str) -> NonFinite:
        """The error that stops the stage at this update (its message names the update, the quantity, the checkpoint
        kept and the fix)."""
        from ..guard import diverged

        return diverged(self.stage, self.args, self.update + 1, what)

    def optimize(self, batch: dict) -> dict:
        """num_ppo_epochs passes of shuffled mini-batches over the batch; returns the mean of each statistic."""
        args, stats = self.args, {}
        width = batch["queries"].shape[1]
        sequences = torch.cat([batch["queries"], batch["responses"]], dim=1)
        attention = torch.cat([batch["query_mask"], batch["mask"].long()], dim=1)
        self.model.train()
        self._grad_norms = []
        micro_per_mini = -(-self.mini_size // self.micro_size)  # the last micro-batch may be smaller
        self.accelerator.gradient_accumulation_steps = micro_per_mini  # backward() divides each loss by it
        generator = torch.Generator().manual_seed(args.seed * 100003 + self.update)
        for _ in range(args.num_ppo_epochs):
            order = torch.randperm(self.rollout_size, generator=generator).to(sequences.device)
            for mini in range(0, self.rollout_size, self.mini_size):
                for micro in range(mini, mini + self.mini_size, self.micro_size):
                    rows = order[micro : min(micro + self.micro_size, mini + self.mini_size)]
                    with self.accelerator.accumulate(self.model):
                        loss, parts = self._micro_loss(batch, rows, sequences[rows], attention[rows], width)
                        # each micro-batch weighs by its share of the mini-batch (backward divides by their count)
                        self.accelerator.backward(loss * len(rows) * micro_per_mini / self.mini_size)
                        if self.accelerator.sync_gradients:
                            self._step()
                    for key, value in parts.items():
                        stats.setdefault(key, []).append(value.detach().float())
        for norms in self._grad_norms:
            for name, norm in norms.items():
                stats.setdefault(f"{name}_grad_norm", []).append(norm.detach().float())
        stats["sampler_gap"] = [token_gap(batch["sampled_logprobs"], batch["logprobs"], batch["mask"])[0]]
        return {key: torch.stack(values).mean() for key, values in stats.items()}

    def _micro_loss(self, batch, rows, sequences, attention, width):
        args = self.args
        ptx_ids = ptx_mask = None
        if args.ptx_coef > 0 and self.ptx is not None:
            ptx_ids, ptx_mask = self._ptx_batch(len(rows))
        keep = sequences.shape[1] - width + 1  # the positions that predict a response token, and one more
        logits, values, ptx_loss = self.model(sequences, attention, ptx_ids, ptx_mask, keep=keep)
        new_logprobs = token_logprobs(logits[:, :-1], sequences[:, width:], args.temperature)
        mask = batch["mask"][rows]
        if self._ratio_gaps is not None:  # no optimizer step yet: the update's log-probabilities are the rollout's
            gap = (new_logprobs.detach().float() - batch["logprobs"][rows]).abs() * mask
            self._ratio_gaps.append((gap.sum(), gap.max(), mask.sum()))
        policy_loss, value_loss, parts = clipped_losses(
            new_logprobs * mask,
            batch["logprobs"][rows],
            batch["advantages"][rows],
            values[:, width - 1 : -1].float(),
            batch["values"][rows],
            batch["returns"][rows],
            mask,
            args.cliprange,
            args.cliprange_value,
        )
        loss = policy_loss + args.vf_coef * value_loss
        parts.update(policy_loss=policy_loss, value_loss=value_loss)
        if ptx_loss is not None:
            loss = loss + args.ptx_coef * ptx_loss
            parts["ptx_loss"] = ptx_loss
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if self.world > 1:  # every process stops together, or the others would wait for it forever
            finite = self.accelerator.reduce(finite, reduction="sum") / self.world
        if finite.item() < 1:
            raise self.diverged(
                f"the loss is {'NaN' if loss.isnan() else 'infinite'} (policy "
                f"{policy_loss.item():.4g}, value {value_loss.item():.4g})"
            )
        return loss, parts

    def _first_update_check(self, batch: dict, ratio_gaps: list | None = None) -> None:
        """Policy and reference are one model at the first update: stop unless the rollout agrees with itself (KL to
        the reference and generate()'s log-probabilities against the forward's; with `ratio_gaps`, the first
        mini-batch's ratios). Every process stops together."""
        if ratio_gaps is None:
            mask = batch["mask"]
            gaps = {
                "kl": token_gap(batch["logprobs"], batch["ref_logprobs"], mask),
                "sampler": token_gap(batch["sampled_logprobs"], batch["logprobs"], mask),
            }
            if not self.reference_is_policy:
                del gaps["kl"]
        else:
            total = sum(m for _, _, m in ratio_gaps).clamp(min=1)
            gaps = {
                "ratio": (sum(t for t, _, _ in ratio_gaps) / total, torch.stack([x for _, x, _ in ratio_gaps]).max())
            }
        figures = {name: (self._mean(mean), self._max(largest)) for name, (mean, largest) in gaps.items()}
        self._first_update_figures.update(figures)
        args = self.args
        low = bool(
            args.bf16 or args.fp16 or getattr(self.accelerator.unwrap_model(self.model).policy, "is_quantized", False)
        )
        problems = first_update_problems(figures, low)
        if problems:
            raise FirstUpdateMismatch(
                f"{self.stage.name}: the first update's check failed ("
                + (
                    "policy and reference are one model there, so they must agree"
                    if self.reference_is_policy
                    else "the rollout and the update use one policy there, so they must agree"
                )
                + "):\n  "
                + "\n  ".join(problems)
                + "\n  The stage is not marked complete. Fix the "
                f"cause, or set stages.{self.stage.name}.trainer.check_first_update: false to train anyway"
            )

    def _max(self, value: torch.Tensor) -> float:
        return self.accelerator.gather_for_metrics(value.detach().float().reshape(1)).max().item()

    def _step(self) -> None:
        args = self.args
        if self._ratio_gaps is not None:  # the first optimizer step: the ratios so far had no update behind them
            self._first_update_check(None, self._ratio_gaps)
            self._ratio_gaps = None
        if args.max_grad_norm and args.max_grad_norm > 0:
            self._grad_norms.append(self._clip_gradients(args.max_grad_norm))
        self.control = self.callback_handler.on_pre_optimizer_step(args, self.state, self.control)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # --- the loop -------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        args = self.args
        self.create_optimizer_and_scheduler(num_training_steps=self.num_updates)
        # the schedule is not prepared: accelerate's wrapper would step it once per process, per update
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.model_wrapped = self.model
        if self._deepspeed() and (args.bf16 or args.fp16):
            # DeepSpeed's engine holds the policy in bf16/fp16 and accelerate switches autocast off: the frozen
            # models follow, or the reference would differ from the policy (the same model) before any update
            dtype = torch.bfloat16 if args.bf16 else torch.float16
            for frozen in (self.ref_model, self.reward_model):
                if frozen is not None:
                    frozen.to(dtype)
        set_seed(args.seed + self.rank * 100003)  # each process samples its own responses
        self.state = TrainerState(
            max_steps=self.num_updates, logging_steps=args.logging_steps, save_steps=args.save_steps
        )
        self.state.episode = 0
        if resume_from_checkpoint:
            self._resume(Path(resume_from_checkpoint))
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        start, start_episode = time.time(), self.state.episode
        samples_every = max(1, self.num_updates // args.num_sample_generations) if args.num_sample_generations else 0
        while self.update < self.num_updates:
            batch = self.advantages(self.rollout(self._prompt_batch(self.update)))
            self._check_finite(batch)
            self._ratio_gaps = [] if self.update == 0 and args.check_first_update else None
            if self._ratio_gaps is not None:
                self._first_update_check(batch)
            stats = self.optimize(batch)
            self.update += 1
            self.state.episode += self.batch_size
            self.state.global_step = self.update
            self.state.epoch = self.state.episode / len(self.prompts)
            kl = self._mean(batch["kl"].sum(dim=1).mean())
            if self.update % max(1, int(args.logging_steps)) == 0 or self.update == self.num_updates:
                speed = (self.state.episode - start_episode) / max(time.time() - start, 1e-9)
                self.log(self._metrics(batch, stats, kl, speed))  # with the KL coefficient this update used
            self.kl.update(kl, self.batch_size)
            self.lr_scheduler.step()
            if samples_every and (self.update - 1) % samples_every == 0:
                self.log({"samples": self._samples(batch)})
            self.control = self.callback_handler.on_step_end(args, self.state, self.control)  # sets should_save
            if self.control.should_save:
                self._save_checkpoint(self.model, trial=None)
                self.control = self.callback_handler.on_save(args, self.state, self.control)
                self.control.should_save = False
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        return None

    def _mean(self, value: torch.Tensor) -> float:
        """A per-process figure averaged over the processes."""
        return self.accelerator.gather_for_metrics(value.detach().float().reshape(1)).mean().item()

    def _metrics(self, batch, stats, kl: float, episodes_per_second: float) -> dict:
        mask = batch["mask"]
        scores = self._mean(batch["scores"].mean())
        non_score = self._mean((-self.kl.value * batch["kl"]).sum(dim=1).mean())
        metrics = {
            "objective/scores": scores,
            "objective/kl": kl,
            "objective/non_score_reward": non_score,
            "objective/rlhf_reward": scores + non_score,
            "objective/entropy": self._mean((-batch["logprobs"] * mask).sum(dim=1).mean()),
            "policy/clipfrac_avg": self._mean(stats["policy_clipfrac"]),
            "policy/approxkl_avg": self._mean(stats["approxkl"]),
            "loss/policy_avg": self._mean(stats["policy_loss"]),
            "loss/value_avg": self._mean(stats["value_loss"]),
            "val/clipfrac_avg": self._mean(stats["value_clipfrac"]),
            "val/ratio": self._mean(stats["ratio"]),
            "val/num_eos_tokens": self._mean((batch["responses"] == self.stop_token_id).sum() * self.world)
            if self.stop_token_id is not None
            else 0,
            "response_length": self._mean(mask.sum(dim=1).mean()),
            "kl_coef": self.kl.value,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "eps": episodes_per_second,
            "episode": self.state.episode,
        }
        if "ptx_loss" in stats:
            metrics["loss/ptx_avg"] = self._mean(stats["ptx_loss"])
        for name, key in (("policy_grad_norm", "policy/grad_norm"), ("value_grad_norm", "val/grad_norm")):
            if name in stats:
                metrics[key] = self._mean(stats[name])
        # generate()'s log-probabilities against the forward's, per token (the first update's check, every update)
        metrics["check/sampler_gap"] = self._mean(stats["sampler_gap"])
        # the first update's check, with the first figures logged
        metrics.update({f"check/first_{k}": mean for k, (mean, _) in self._first_update_figures.items()})
        self._first_update_figures = {}
        return metrics

    def _samples(self, batch, count: int = 4) -> list[dict]:
        tok = self.processing_class
        return [
            {
                "prompt": tok.decode(batch["queries"][i][batch["query_mask"][i].bool()]),
                "response": tok.decode(batch["responses"][i][batch["mask"][i].bool()]),
                "score": round(batch["scores"][i].item(), 4),
            }
            for i in range(min(count, len(batch["scores"])))
        ]

    # --- checkpoints: everything to go on exactly ------------------------------------------------------------------

    def _save_checkpoint(self, model, trial=None, metrics=None):
        """checkpoint-{update}/: the policy's weights (model.safetensors, or adapter_model.safetensors under LoRA),
        value/ likewise, optimizer.pt, scheduler.pt, rng_state_{rank}.json, ppo_state.json, and trainer_state.json,
        written last (a checkpoint without it was cut off)."""
        folder = Path(self.args.output_dir) / f"checkpoint-{self.update}"
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self._deepspeed():  # every process holds a shard of the optimizer's state: the engine saves them all
            self.accelerator.save_state(str(folder / ACCELERATOR_DIR))
        if self.accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
            _save_weights(unwrapped.policy, folder)
            _save_weights(unwrapped.value_model, folder / VALUE_DIR)
            if not self._deepspeed():
                torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(self.lr_scheduler.state_dict(), folder / "scheduler.pt")
            (folder / STATE_FILE).write_text(
                json.dumps(
                    {
                        "update": self.update,
                        "episode": self.state.episode,
                        "kl_coef": self.kl.value,
                        "ptx_position": self.ptx_position,
                    }
                )
            )
        self.accelerator.wait_for_everyone()
        (folder / RNG_FILE.format(rank=self.rank)).write_text(json.dumps(_rng_states()))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            self.state.save_to_json(str(folder / "trainer_state.json"))
            rotate_checkpoints(self.args.output_dir, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()

    def _clip_gradients(self, limit: float) -> dict:
        """The policy's and the value model's gradients, each clipped to `limit` by its own norm (one norm over both
        lets a large value gradient shrink the policy's step). Returns the norms before clipping. Under DeepSpeed the
        engine clips (gradient_clipping, over all parameters at once) and this returns {}."""
        if self._deepspeed():
            return {}
        self.accelerator.unscale_gradients()  # fp16: once per step, before any norm
        unwrapped = self.accelerator.unwrap_model(self.model)
        norms = {}
        for name, part in (("policy", unwrapped.policy), ("value", unwrapped.value_model)):
            grads = [p for p in part.parameters() if p.grad is not None]
            norms[name] = (
                torch.nn.utils.clip_grad_norm_(grads, limit)
                if grads
                else torch.zeros((), device=self.accelerator.device)
            )
        return norms

    def _deepspeed(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    def _resume(self, folder: Path) -> None:
        rng = folder / RNG_FILE.format(rank=self.rank)
        if not rng.is_file() and (folder / f"rng_state_{self.rank}.pth").is_file():
            from ..errors import UserError

            raise UserError(
                f"{self.stage.name}: the checkpoint {folder} keeps its random states as a pickle "
                f"(rng_state_{self.rank}.pth, written before 2026-12-06), which alignkit no longer loads: a pickle "
                "can run code; rerun the stage from the start with --force"
            )
        saved = _read_json(folder / STATE_FILE)
        if saved["episode"] != saved["update"] * self.batch_size:
            from ..errors import UserError

            raise UserError(
                f"{self.stage.name}: the checkpoint {folder} was written with rollout batches of "
                f"{saved['episode'] // max(saved['update'], 1)} responses, these settings make {self.batch_size} "
                "(num_mini_batches multiplies the rollout batch since alignkit follows TRL 1.12's sizes): resuming "
                "would misplace its data and schedule; rerun the stage from the start with --force"
            )
        unwrapped = self.accelerator.unwrap_model(self.model)
        _load_weights(unwrapped.policy, folder)
        _load_weights(unwrapped.value_model, folder / VALUE_DIR)
        if self._deepspeed():
            self.accelerator.load_state(str(folder / ACCELERATOR_DIR))
        else:
            self.optimizer.load_state_dict(
                torch.load(folder / "optimizer.pt", map_location=self.accelerator.device, weights_only=True)
            )
        self.lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        self.update, self.kl.value, self.ptx_position = saved["update"], saved["kl_coef"], saved["ptx_position"]
        state = TrainerState.load_from_json(str(folder / "trainer_state.json"))
        self.state.log_history, self.state.global_step = state.log_history, state.global_step
        self.state.episode = saved["episode"]
        _set_rng_states(_read_json(rng))


def _save_weights(model, folder: Path) -> None:
    """A model's trainable state: the adapter (and its trainable heads) under LoRA, else every weight."""
    from safetensors.torch import save_file, save_model

    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        from peft import get_peft_model_state_dict

        state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(state, str(folder / "adapter_model.safetensors"))
    else:
        save_model(model, str(folder / "model.safetensors"))


def _load_weights(model, folder: Path) -> None:
    from safetensors.torch import load_file, load_model

    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    else:
        load_model(model, str(folder / "model.safetensors"))


def _read_json(path: Path):
    """A checkpoint's JSON file; one that is not JSON (or not there) is bad input naming the file, not a traceback."""
    from ..errors import UserError

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(
            f"{path}: cannot read this checkpoint file ({e}); rerun the stage from the start with --force"
        ) from e


def _rng_states() -> dict:
    """Python's, numpy's and torch's generators as plain JSON values (lists of ints), never a pickle."""
    import numpy

    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = numpy.random.get_state()
    states = {
        "python": [version, list(words), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "cpu": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        states["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return states


def _set_rng_states(states: dict) -> None:
    import numpy

    try:
        version, words, gauss = states["python"]
        random.setstate((version, tuple(words), gauss))
        kind, keys, pos, has_gauss, cached = states["numpy"]
        numpy.random.set_state((kind, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss, cached))
        torch.set_rng_state(torch.tensor(states["cpu"], dtype=torch.uint8))
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in states["cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        from ..errors import UserError

        raise UserError(
            f"a PPO checkpoint's random states ({RNG_FILE}) are not what alignkit writes ({e}); "
            "rerun the stage from the start with --force"
        ) from e
