"""reward: a reward model trained on rankings as InstructGPT trains it (on TRL's RewardTrainer), scoring a whole answer
at its EOS token, then shifted so that the demonstrations score 0 on average.

A prompt's K ranked answers (best first; a chosen/rejected pair is K = 2) are one batch element: one forward pass per
answer, loss -1/C(K,2) * sum over its pairs (better, worse) of log sigmoid(r_better - r_worse) (Ouyang et al. 2022).
Expanding a ranking into its C(K,2) pairs instead costs 2 C(K,2) forward passes and, the paper reports, overfits.
A ranking with ties (equal `ranks`) compares only its strictly ordered pairs, each weighted 1 / their number; one that
is all ties has none, teaches nothing, and is left out (counted in the log).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import data, models
from ..distributed import is_main, wait_for_everyone
from ..log import log
from ..schema import Dataset, Recipe, StageSettings
from .spec import Default, Stage, fit_context, refused_by_trl, train_metrics


def config_class():
    from trl import RewardConfig

    return RewardConfig


@dataclass
class RewardSettings(StageSettings):
    """stages.reward: the common keys, and the normalisation of its scores."""

    normalize: bool | None = field(
        default=None,
        metadata={
            "help": "after training, shift the scores so that the demonstrations score 0 on average "
            "(InstructGPT); default: on when the recipe has an sft stage or normalize_dataset is set"
        },
    )
    normalize_dataset: Dataset | None = field(
        default=None, metadata={"help": "the demonstrations to normalise on (default: the sft stage's dataset)"}
    )
    shared_prefix: bool = field(
        default=False,
        metadata={
            "help": "run the tokens a ranking's answers share (the prompt, and the words the answers start alike "
            "with) once per ranking, and each answer's own tokens on their keys and values: the same scores and "
            "gradients for fewer tokens (not with gradient checkpointing)"
        },
    )
    all_pairs: bool = field(
        default=False,
        metadata={
            "help": "train each of a ranking's C(K,2) pairs as its own batch element (what TRL and most tools do: "
            "2 C(K,2) forward passes per ranking) instead of the ranking as one element (InstructGPT: K passes)"
        },
    )


def normalize_data(recipe: Recipe, settings: RewardSettings) -> list:
    """The demonstrations the scores are normalised on, [(recipe key, dataset, kind)], or [] when it is off."""
    if settings.normalize is False:
        return []
    if settings.normalize_dataset is not None:
        return [("stages.reward.normalize_dataset", settings.normalize_dataset, "demonstrations")]
    sft = recipe.stages.get("sft")
    if sft is not None and sft.dataset is not None:
        return [("stages.sft.dataset", sft.dataset, "demonstrations")]
    return []


def check(recipe: Recipe, settings, args, context, problems) -> None:
    from ..errors import Problem

    if settings.shared_prefix and args.gradient_checkpointing:
        problems.append(
            Problem(
                "stages.reward.shared_prefix",
                "the shared prefix's keys and values need the model's cache, which gradient checkpointing turns "
                "off; set stages.reward.trainer.gradient_checkpointing: false, or remove shared_prefix",
            )
        )
    if settings.normalize is True and not normalize_data(recipe, settings):
        problems.append(
            Problem(
                "stages.reward.normalize",
                "normalising needs demonstrations: add an sft stage, or "
                "set stages.reward.normalize_dataset, or remove normalize",
            )
        )


def run(recipe: Recipe, folder: Path, inputs: dict, resume: str | None, args) -> dict:
    from ..guard import fit

    spec = recipe.stages["reward"]
    rankings = data.load(spec.dataset, "reward", recipe, STAGE.data)
    rounds = sorted(
        ((role, path) for role, path in inputs.items() if role.startswith(ROUND_RANKINGS)),
        key=lambda item: int(item[0].removeprefix(ROUND_RANKINGS)),
    )
    if rounds:  # a later round: the recipe's comparisons and every round's rankings so far
        rankings = list(rankings)
        for role, path in rounds:
            ranked = list(data.load(Dataset(path=path), "reward", None, STAGE.data))
            log("reward", f"+ {len(ranked)} {role} ({path})")
            rankings += ranked
    tokenizer = models.load_tokenizer(recipe, inputs["model"])
    model = models.load_reward_model(recipe, inputs["model"], tokenizer, "reward")
    fit_context(args, model, "reward")
    train, dropped, lost, tied = tokenize_rankings(rankings, tokenizer, args.max_length, all_pairs=spec.all_pairs)
    if tied:
        log(
            "reward",
            f"{tied} of {len(rankings)} rankings are all ties (no answer ranked above another): they teach nothing "
            "and are left out",
        )
    if dropped:
        log(
            "reward",
            f"warning: {dropped} answers longer than {args.max_length} tokens dropped from their rankings "
            f"(a ranking keeps its other answers; {lost} rankings left with fewer than "
            "two were dropped whole)",
        )
        if spec.overlength == "error":
            from ..errors import DataError

            raise DataError(
                f"stages.reward: {dropped} answers are longer than {args.max_length} tokens; shorten them, "
                "or set stages.reward.overlength: truncate (they are dropped from their rankings)"
            )
    args.remove_unused_columns = False  # the collator reads ranked_ids, which TRL's own collator does not know
    with refused_by_trl("reward"):
        trainer = ranking_trainer()(
            model=model,
            args=args,
            train_dataset=train,
            processing_class=tokenizer,
            peft_config=models.lora_config(recipe, "reward", "SEQ_CLS"),
            data_collator=RankingCollator(tokenizer.pad_token_id, shared_prefix=spec.shared_prefix),
        )
    result, figures = fit(trainer, STAGE, folder, resume)
    models.save(trainer, tokenizer, folder, recipe, base=inputs["model"], reward=True)
    metrics = train_metrics(trainer, result, figures)
    metrics["rankings"] = {"trained": len(rankings) - lost - tied, "all_ties": tied, "too_long": lost}
    device = trainer.accelerator.device
    del trainer, model  # the saved model is normalised: the trained one's memory is free for it
    models.free_accelerator_memory()
    demonstrations = normalize_data(recipe, spec)
    if demonstrations and is_main():
        metrics["normalize"] = normalize(
            folder, recipe, tokenizer, *demonstrations[0], device=device, max_length=args.max_length
        )
    wait_for_everyone()
    return metrics


def tokenize_rankings(rankings, tokenizer, max_length: int | None, all_pairs: bool = False):
    """Each ranking's answers as token ids (prompt and answer together, ending with EOS), best first, as TRL's
    RewardTrainer takes its pairs (chosen_ids / rejected_ids: the best and the worst) plus `ranked_ids` and their
    `ranks` (1, 2, ..., K without ties); answers longer than max_length are left out. With all_pairs, each of a
    ranking's strictly ordered pairs becomes a ranking of two. Returns (dataset, answers dropped, rankings dropped
    whole for length, rankings left out as all ties)."""
    import datasets

    rows, dropped, lost, tied = [], 0, 0, 0
    for row in rankings:
        ranked, ranks = [], []
        for answer, rank in zip(row["ranked"], row.get("ranks") or range(1, len(row["ranked"]) + 1)):
            ids = tokenizer(scored_text({**row, "chosen": answer}, tokenizer), add_special_tokens=False).input_ids
            if max_length is not None and len(ids) > max_length:
                dropped += 1
                continue
            ranked.append(ids)
            ranks.append(rank)
        if len(ranked) < 2:
            lost += 1
            continue
        if ranks[0] == ranks[-1]:  # best first: the first and the last tie only when all do
            tied += 1
            continue
        if all_pairs:
            groups = [([ranked[a], ranked[b]], [1, 2]) for a, b in data.strict_pairs(ranks)]
        else:
            groups = [(ranked, ranks)]
        rows += [{"chosen_ids": g[0], "rejected_ids": g[-1], "ranked_ids": g, "ranks": r} for g, r in groups]
    return datasets.Dataset.from_list(rows), dropped, lost, tied


def scored_text(row: dict, tokenizer) -> str:
    """A row as the reward model scores it: rendered, ending with EOS, where the score is read (plain text gets one
    appended, as TRL does; a chat template writes its own)."""
    text = data.render(row, tokenizer)
    return text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token


class RankingCollator:
    """A batch of rankings: every answer of every ranking padded into one batch, and the pairs to compare (indices
    into it, each weighted 1/C(K,2) of its ranking; with ties, its strictly ordered pairs only, each weighted 1 /
    their number; an example without `ranks` is best first, no ties). With `shared_prefix`, the tokens a ranking's
    answers begin with alike (at least one token of each left over) are a batch of their own (`prefix_ids`, one row
    per ranking), and `input_ids` holds each answer's remaining tokens (`owner`: its ranking's row)."""

    def __init__(self, pad_token_id: int, shared_prefix: bool = False):
        self.pad, self.shared_prefix = pad_token_id, shared_prefix

    def _padded(self, rows: list[list[int]]):
        import torch

        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row, dtype=torch.long), 1
        return ids, mask

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        rankings = [example["ranked_ids"] for example in examples]
        ranks = [example.get("ranks") or list(range(len(example["ranked_ids"]))) for example in examples]
        batch = {}
        if self.shared_prefix:
            shared = [_common_prefix(answers) for answers in rankings]
            batch["prefix_ids"], batch["prefix_mask"] = self._padded(
                [r[0][:n] or [self.pad] for r, n in zip(rankings, shared)]
            )
            batch["prefix_mask"][[i for i, n in enumerate(shared) if n == 0], 0] = 0
            batch["prefix_length"] = torch.tensor(shared)
            batch["owner"] = torch.tensor([i for i, answers in enumerate(rankings) for _ in answers])
            answers = [ids[n:] for answers, n in zip(rankings, shared) for ids in answers]
        else:
            answers = [ids for answers in rankings for ids in answers]
        batch["input_ids"], batch["attention_mask"] = self._padded(answers)
        better, worse, weight, start = [], [], [], 0
        for answers, order in zip(rankings, ranks):
            pairs = [(start + a, start + b) for a, b in data.strict_pairs(order)]
            better += [a for a, _ in pairs]
            worse += [b for _, b in pairs]
            weight += [1 / max(len(pairs), 1)] * len(pairs)
            start += len(answers)
        batch.update(
            better=torch.tensor(better),
            worse=torch.tensor(worse),
            weight=torch.tensor(weight),
            rankings=torch.tensor(len(examples)),
        )
        return batch


def _common_prefix(answers: list[list[int]]) -> int:
    """How many leading tokens all of a ranking's answers share, leaving each at least one of its own."""
    limit, n = min(map(len, answers)) - 1, 0
    while n < limit and all(ids[n] == answers[0][n] for ids in answers):
        n += 1
    return n


def ranking_scores(model, inputs: dict):
    """Each answer's score: one forward pass over the batch, or, with a shared prefix, one over the prefixes and one
    over the answers' own tokens on the prefixes' keys and values (positions continuing each prefix; the prefixes'
    padding masked), which gives the same scores and gradients."""
    import torch

    if "prefix_ids" not in inputs:
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits[
            :, 0
        ]
    prefix, prefix_mask, owner = inputs["prefix_ids"], inputs["prefix_mask"], inputs["owner"]
    width = prefix.shape[1]
    # a ranking whose answers share no token has one masked padding token here; the first pass attends to it (a
    # row with every key masked would give NaN values, which a masked key still multiplies by 0), the second not
    seen = prefix_mask.clone()
    seen[:, 0] = 1
    first = model(
        input_ids=prefix,
        attention_mask=seen,
        position_ids=torch.arange(width, device=prefix.device).expand_as(prefix),
        use_cache=True,
    )
    cache = first.cache if "cache" in first else first.past_key_values  # transformers 5 renamed it (and warns)
    cache.reorder_cache(owner)  # each answer reads its own ranking's prefix
    answers, mask = inputs["input_ids"], inputs["attention_mask"]
    positions = inputs["prefix_length"][owner, None] + torch.arange(answers.shape[1], device=answers.device)
    return model(
        input_ids=answers,
        attention_mask=torch.cat([prefix_mask[owner], mask], dim=1),
        position_ids=positions,
        cache=cache,
    ).logits[:, 0]


def ranking_loss(rewards, better, worse, weight, rankings, center: float | None = None):
    """InstructGPT's loss over a batch of rankings: -1/C(K,2) sum log sigmoid(r_better - r_worse) per ranking,
    averaged over the rankings. With `center` (TRL's center_rewards_coefficient), plus center x the same average of
    (r_better + r_worse)^2, which keeps the scores near 0 (Eisenstein et al. 2023; for a pair, TRL's own term)."""
    import torch.nn.functional as F

    loss = -(weight * F.logsigmoid(rewards[better] - rewards[worse])).sum() / rankings
    if center:
        loss = loss + center * (weight * (rewards[better] + rewards[worse]) ** 2).sum() / rankings
    return loss


def ranking_trainer():
    """TRL's RewardTrainer with rankings as batch elements: its compute_loss reads the collator's pairs."""
    import torch
    from trl import RewardTrainer

    class RankingRewardTrainer(RewardTrainer):
        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = ["ranked_ids"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            rewards = ranking_scores(model, inputs)
            loss = ranking_loss(
                rewards,
                inputs["better"],
                inputs["worse"],
                inputs["weight"],
                inputs["rankings"],
                self.args.center_rewards_coefficient,
            )
            with torch.no_grad():
                diff = rewards[inputs["better"]] - rewards[inputs["worse"]]
                gather = self.accelerator.gather_for_metrics
                self._metrics[mode]["accuracy"].append(gather((diff > 0).float().mean()).mean().item())
                self._metrics[mode]["margin"].append(gather(diff.mean()).mean().item())
                self._metrics[mode]["mean_reward"].append(gather(rewards.mean()).mean().item())
            return (loss, {"rewards": rewards}) if return_outputs else loss

    return RankingRewardTrainer


def normalize(
    folder: Path, recipe: Recipe, tokenizer, key: str, spec, kind: str, device="cpu", max_length: int | None = None
) -> dict:
    """Shift the saved reward model's scores so that the demonstrations score 0 on average (InstructGPT): through
    the score head's bias where it has one, else the bias of the final layer norm that feeds it (GPT-2's ln_f:
    shifting it by d * w / |w|^2 shifts every score by d exactly). Each demonstration is scored once, on `device`, in
    batches of similar length, cut from the left to `max_length` tokens (the end, where the score is read, kept; the
    model's context at most); the shift is exact, so the mean after it is 0 without scoring again (a test scores
    again). Returns what it did, for metrics.json."""
    import torch
    from transformers import AutoModelForSequenceClassification

    rows = data.load(spec, key, recipe, kind)
    model = AutoModelForSequenceClassification.from_pretrained(folder).to(device).eval()
    limit = min(max_length or models.context_length(model.config), models.context_length(model.config))
    ids = [tokenizer(scored_text(row, tokenizer), add_special_tokens=False).input_ids for row in rows]
    if not ids:
        from ..errors import DataError

        raise DataError(f"{key}: {spec.path} has no demonstrations to normalise the reward model's scores on")
    cut = sum(len(i) > limit for i in ids)
    ids = sorted((i[-limit:] for i in ids), key=len)  # similar lengths together: little padding
    batches = [ids[start : start + NORMALIZE_BATCH] for start in range(0, len(ids), NORMALIZE_BATCH)]
    if cut:
        log("reward", f"normalising: {cut} of {len(ids)} demonstrations longer than {limit} tokens cut from the left")

    def scores(batch: list[list[int]]) -> torch.Tensor:
        width = max(map(len, batch))
        tokens = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(tokens)
        for row, i in enumerate(batch):
            tokens[row, : len(i)], mask[row, : len(i)] = torch.tensor(i), 1
        with torch.no_grad():
            return model(input_ids=tokens.to(device), attention_mask=mask.to(device)).logits[:, 0].float().cpu()

    before = sum(scores(b).sum().item() for b in batches) / len(ids)
    head = getattr(model, "score", None)
    where = None
    if isinstance(getattr(head, "bias", None), torch.nn.Parameter):
        with torch.no_grad():
            head.bias -= before
        where = "the score head's bias"
    else:
        base = getattr(model, model.base_model_prefix, None)
        norm = next((getattr(base, n) for n in ("ln_f", "final_layer_norm", "norm") if hasattr(base, n)), None)
        if head is not None and isinstance(getattr(norm, "bias", None), torch.nn.Parameter):
            w = head.weight[0].float()
            with torch.no_grad():
                norm.bias -= (before * w / w.dot(w)).to(norm.bias.dtype)
            where = "the final layer norm's bias"
    if where is None:
        log(
            "reward",
            "warning: cannot normalise this architecture's scores (its score head and final norm have no "
            f"bias); the demonstrations score {before:.4g} on average",
        )
        return {"dataset": spec.path, "rows": len(ids), "mean_before": before, "shift": 0.0, "applied": False}
    model.save_pretrained(folder)
    log(
        "reward",
        f"normalised: the demonstrations ({spec.path}, {len(ids)}) scored {before:.4g} on average, now 0 "
        f"(shift {-before:+.4g}, in {where})",
    )
    return {
        "dataset": spec.path,
        "rows": len(ids),
        "cut": cut,
        "mean_before": before,
        "shift": -before,
        "applied": True,
        "where": where,
    }


ROUND_RANKINGS = "rankings of round "  # an input of a later round's reward stage: "rankings of round 2", ...
NORMALIZE_BATCH = 32  # demonstrations scored at once when normalising


STAGE = Stage(
    name="reward",
    about="a reward model trained on rankings, each one batch element (InstructGPT), on TRL's RewardTrainer",
    config_class=config_class,
    run=run,
    data="rankings",
    writes="reward_model",
    settings=RewardSettings,
    model_from=("pretrain", "sft"),
    hub_tags=("reward-model",),
    figures=(("loss", "loss"), ("accuracy", "accuracy")),
    more_data=normalize_data,
    check=check,
    defaults=(
        Default(
            "rankings",
            "one batch element per ranking (`stages.reward.all_pairs: false`)",
            "InstructGPT: K forward passes per ranking of K, not 2·C(K,2) (6, not 30, for six answers), and less "
            "overfitting; TRL's RewardTrainer takes pairs only",
        ),
        Default(
            "remove_unused_columns",
            "`false`, whatever the recipe sets",
            "the stage's collator reads each ranking's token ids, columns TRL's default would remove first",
        ),
        Default(
            "normalize",
            "on when the recipe has an sft stage or sets `normalize_dataset`",
            "InstructGPT: the demonstrations score 0, so PPO's rewards and its KL penalty are on a known scale",
        ),
    ),
)
