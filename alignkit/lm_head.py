"""Per-token log-probabilities from full logits on a CPU, in place of TRL's chunked LM head where that is slower.

TRL's SFTTrainer and DPOTrainer patch the model's forward with a fused LM head (`fused_lm_head=True`): the logits are
never built whole, the vocabulary is folded in tiles, and the backward recomputes them. That saves memory on a GPU,
where Triton kernels do the folding; on a CPU the tiles are folded by a dozen separate torch operations each way, and
with a small vocabulary the logits it avoids are small. There the whole logits, one log-softmax and a gather do the
same work in a fraction of the time (docs/benchmarks.md, "alignkit's own choices"). This wraps the trainer's patched
forward and answers a `fused_lm_head=True` call itself when the model runs on a CPU and the logits fit in
`limit_bytes`; every other call (generation, a GPU, large logits, scaled or soft-capped logits, MoE router losses)
goes to TRL's forward unchanged. The outputs are TRL's `FusedCausalLMOutput`, with the same fields and masking.
"""

from __future__ import annotations

import functools
import types

# Logits up to this size (float32 bytes, one copy) are built whole; a training step keeps about three such copies.
LIMIT_BYTES = 256 * 2**20

_SCALED = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def use_full_logits(model, outputs: tuple[str, ...], limit_bytes: int = LIMIT_BYTES) -> bool:
    """Wrap `model`'s fused forward (TRL's, already patched on it) so that CPU calls with small logits build them
    whole. `outputs`: the per-token fields the trainer asked TRL for. Returns whether the model was wrapped (False
    where TRL did not patch it, or its logits are scaled: those keep TRL's head)."""
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    fused = model.__dict__.get("forward")
    text_config = model.config.get_text_config()
    if fused is None or any(getattr(text_config, name, None) is not None for name in _SCALED):
        return False

    @functools.wraps(fused)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        head = self.get_output_embeddings()
        targets = (labels[:, 1:] if shift_labels is None else shift_labels) if fused_lm_head else None
        whole = (
            targets is not None
            and head.weight.device.type == "cpu"
            and not kwargs.get("output_router_logits")
            and targets.numel() * head.weight.shape[0] * 4 <= limit_bytes
        )
        if not whole:  # TRL's forward, as the trainer would have called it
            return fused(
                *args,
                fused_lm_head=fused_lm_head,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden = hidden[:, :-1]
        logits = head(hidden).float()
        mask = targets != -100
        logp = torch.log_softmax(logits, dim=-1)
        log_probs = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0)
        entropy = log_sum_sq = mean_logits = is_top1 = None
        if "entropy" in outputs:
            entropy = (-(logp.exp() * logp).sum(-1)).masked_fill(~mask, 0)
        with torch.no_grad():
            if "log_sum_sq_probs" in outputs:
                log_sum_sq = torch.logsumexp(2 * logp, dim=-1).masked_fill(~mask, 0)
            if "mean_logits" in outputs:
                mean_logits = logits.mean(-1).masked_fill(~mask, 0)
            if "is_top1" in outputs:
                is_top1 = (logits.argmax(-1) == targets) & mask
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / count,
            log_probs=log_probs,
            entropy=entropy,
            log_sum_sq_probs=log_sum_sq,
            mean_logits=mean_logits,
            is_top1=is_top1,
            label_mask=mask,
        )

    model.forward = types.MethodType(forward, model)
    return True


def apply(trainer, stage: str, enabled: bool, outputs: tuple[str, ...]) -> None:
    """After a TRL trainer that patches a fused LM head is built: wrap its model (and its separate reference, which
    TRL asks for log-probabilities only), and say so once when it takes effect (on a CPU)."""
    from peft import PeftModel

    from .log import log

    if not enabled:
        return
    model = trainer.model.get_base_model() if isinstance(trainer.model, PeftModel) else trainer.model
    wrapped = use_full_logits(model, outputs)
    reference = getattr(trainer, "ref_model", None)
    if reference is not None:
        use_full_logits(reference, ("log_probs",))
    if wrapped and model.get_output_embeddings().weight.device.type == "cpu":
        log(stage, f"full_logits=true (alignkit: {WHY})")


WHY = (
    "TRL's chunked LM head saves GPU memory; on a CPU it folds the vocabulary in many small operations, and whole "
    "logits (up to 256 MiB) are faster"
)
