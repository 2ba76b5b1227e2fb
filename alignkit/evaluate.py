"""Evaluation and the report: what each stage bought, measured on held-out prompts.

Every policy checkpoint of the pipeline (base = the model the run starts from or pretrains, then each policy stage by
its name) answers the recipe's `eval` prompts greedily. For each: the reward model's mean score, the KL to the
reference policy (the stage declared eval_reference, SFT; nats per response, on the checkpoint's own samples at
temperature 1), mean response length in tokens, the share of answers that end with EOS, repetition (the share of a
response's token bigrams that repeat an earlier bigram), and, where rows carry a reference answer, the share that are
correct. Then the reward model's pairwise accuracy on held-out comparisons, the win rate of each later policy
against the reference, and a verdict on each: its gold accuracy against the reference's with a paired bootstrap
interval, its wins, ties and losses, and the reward model's score held out against in training. Writes
{output_dir}/report.json, report.md and PNG plots.

A recipe with rounds adds each later round's policy (round-N/ppo) as the checkpoint "ppo round N", after the stages,
and a rounds block: each round's policy figures, its win rate against the previous round's policy, and the held-out
accuracy of the round's own reward model. Every checkpoint's reward_mean is scored by one reward model, the last
round's, so that the rounds compare on one scale.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Callable

from . import data, files
from .log import keep, log
from .pipeline import ROUND_POLICY, complete_stages, identities, later_rounds, read_complete, stage_folder, stale
from .recipe import Recipe
from .report import (
    BASE,
    KL,
    KL_NOTE,
    LEVEL,
    REFERENCE,
    WIN_RATE,
    checkpoint_round,
    eval_table,
    fmt,
    round_checkpoint,
    rounds_lines,
    shows_kl,
    verdict_lines,
    win_rate_lines,
)
from .stages import ORDER, REGISTRY, ROUND_STAGES


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip().rstrip(".!?").strip()


def is_correct(answer: str, reference: str, match: str) -> bool:
    a, r = _normalize(answer), _normalize(reference)
    return a == r if match == "exact" else r in a


def checkpoints(recipe: Recipe) -> dict[str, str]:
    """The complete policy outputs to evaluate, by checkpoint name, in pipeline order: base (a stage that trains from
    scratch, else the recipe's pretrained model), then every other policy stage under its own name, then each later
    round's policy ("ppo round 2", ...)."""
    out = Path(recipe.output_dir)
    done = complete_stages(out)
    found = {}
    scratch = [s.name for s in ORDER if s.from_scratch and s.name in recipe.stages]
    if scratch and scratch[0] in done:
        found[BASE] = str(out / scratch[0])
    elif not scratch and recipe.model.name_or_path:
        found[BASE] = recipe.model.name_or_path
    for stage in ORDER:
        if stage.policy and not stage.from_scratch and stage.name in done and stage.name in recipe.stages:
            if not stale(out, out / stage.name):
                found[stage.name] = str(out / stage.name)
    for n in rounds_done(recipe):
        found[round_checkpoint(ROUND_POLICY, n)] = str(stage_folder(out, ROUND_POLICY, n))
    return found


def left_out(recipe: Recipe) -> list[str]:
    """The outputs in the run folder that the report leaves out, each with why: out of date (built on an output
    trained again since), or of a stage the recipe no longer has."""
    out, said = Path(recipe.output_dir), []
    for stage in complete_stages(out):
        if REGISTRY[stage].writes == "reward_model" and stage in recipe.stages and (why := stale(out, out / stage)):
            said.append(f"{stage}: {why}; no checkpoint is scored by it")
        if not REGISTRY[stage].policy or REGISTRY[stage].from_scratch:
            continue
        if stage not in recipe.stages:
            said.append(f"{stage}: the recipe has no {stage} stage now")
        elif why := stale(out, out / stage):
            said.append(f"{stage}: {why}")
    if recipe.rounds is not None:
        for n in later_rounds(out):
            if n <= recipe.rounds.count and (why := stale(out, stage_folder(out, ROUND_POLICY, n))):
                said.append(f"round {n}: {why}")
    return said


def rounds_done(recipe: Recipe) -> list[int]:
    """The later rounds (N >= 2) to report: those the recipe's rounds section counts whose policy is complete."""
    if recipe.rounds is None:
        return []
    out = Path(recipe.output_dir)
    done = []
    for n in later_rounds(out):  # in order, up to the first that is out of date: the later ones build on it
        if n > recipe.rounds.count or stale(out, stage_folder(out, ROUND_POLICY, n)):
            break
        done.append(n)
    return done


def checkpoint_folder(out: Path, name: str) -> Path:
    """The folder of a checkpoint named by checkpoints(), a stage's or a later round's."""
    stage, n = checkpoint_round(name)
    return stage_folder(out, stage, n)


def answering_stages(recipe: Recipe) -> list[str]:
    """The recipe's policy stages past pretraining: what trains a model to answer prompts."""
    return [s.name for s in ORDER if s.policy and not s.from_scratch and s.name in recipe.stages]


def answers_prompts(recipe: Recipe) -> bool:
    """Whether the run has a trained model that answers prompts (a policy stage past pretraining), to evaluate."""
    return any(name != BASE for name in checkpoints(recipe))


def reward_model_path(recipe: Recipe) -> str | None:
    """The reward model that scores every checkpoint: the last round's (see reward_models())."""
    found = reward_models(recipe)
    return found[max(found)] if found else None


def reward_models(recipe: Recipe) -> dict[int, str]:
    """Each round's reward model, by round: round 1's is the one the stages use (one a stage is given,
    stages.<stage>.reward_model, else the newest complete output of a stage that writes one); a later round's is its
    own (round-N/reward), for the rounds rounds_done() reports."""
    out, found = Path(recipe.output_dir), {}
    given = [s.reward_model for s in recipe.stages.values() if getattr(s, "reward_model", None)]
    done = [
        s
        for s in complete_stages(out)
        if REGISTRY[s].writes == "reward_model" and s in recipe.stages and not stale(out, out / s)
    ]
    if given or done:
        found[1] = given[0] if given else str(out / done[-1])
    retrained = [s for s in ROUND_STAGES if REGISTRY[s].writes == "reward_model"]
    for n in rounds_done(recipe):
        folders = [stage_folder(out, s, n) for s in retrained]
        found.update({n: str(f) for f in folders if read_complete(f)})
    return found


def shown(path: str, out: Path) -> str:
    """A model's path as the report names it: relative to the run folder where it lies in it (round-2/reward)."""
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return path


def device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def fit_prompts(prompts: list[list[int]], room: int) -> tuple[list[list[int]], int]:
    """Prompts cut from the left to at most `room` tokens (the context less the answer's tokens): the end, where
    the question and the generation prompt are, is kept. Returns (prompts, how many were cut)."""
    if room < 1:
        from .errors import UserError

        raise UserError(
            f"eval.max_new_tokens leaves no room for a prompt in the model's context ({room} tokens left); lower it"
        )
    return [p[-room:] for p in prompts], sum(len(p) > room for p in prompts)


def greedy_answers(folder: str | Path, rows, max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """The greedy answers of the model in `folder` to eval-format rows, drawn as `evaluate` draws them (chat template,
    prompts cut from the left to leave room for the answer): for benchmarks that judge answers themselves."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import context_length

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder).to(device()).eval()
    prompts = [
        tokenizer(data.render(r, tokenizer, add_generation_prompt=True), add_special_tokens=False).input_ids
        for r in rows
    ]
    prompts, _ = fit_prompts(prompts, context_length(model.config) - max_new_tokens)
    responses = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    return tokenizer.batch_decode(responses, skip_special_tokens=True)


def generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    on_batch: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """Responses (token ids, cut after the first EOS) to each prompt: batches of `batch_size` prompts, left-padded,
    through the model's generate() and its KV cache; greedy, or with `sample` at `temperature` and nucleus `top_p`
    (no top-k). `on_batch(n)` is told after each batch how many responses it gave."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    responses = []
    for start in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[start : start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                temperature=temperature if sample else None,
                top_k=0 if sample else None,
                top_p=top_p if sample else None,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
                use_cache=True,
            )
        for row in out[:, width:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            responses.append([t for t in row if t != pad or t == tokenizer.eos_token_id])
        if on_batch is not None:
            on_batch(len(batch))
    return responses


def _logprobs(model, tokenizer, prompts: list[list[int]], responses: list[list[int]], batch_size: int) -> list[float]:
    """Sum of log-probabilities of each response given its prompt."""
    import torch

    sums = []
    for start in range(0, len(prompts), batch_size):
        pairs = list(zip(prompts[start : start + batch_size], responses[start : start + batch_size]))
        width = max(len(p) + len(r) for p, r in pairs)
        ids = torch.full((len(pairs), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        target = torch.zeros((len(pairs), width), dtype=torch.bool)
        for i, (p, r) in enumerate(pairs):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            mask[i, : len(p) + len(r)] = 1
            target[i, len(p) : len(p) + len(r)] = True
        ids, mask, target = ids.to(model.device), mask.to(model.device), target.to(model.device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        sums += (logp * target[:, 1:]).sum(dim=1).tolist()
    return sums


def reward_scores(reward_model, tokenizer, sequences: list[list[int]], batch_size: int) -> list[float]:
    """The reward model's score of each token sequence, read at its last token, as in PPO."""
    import torch

    scores = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor(
            [s + [tokenizer.pad_token_id] * (width - len(s)) for s in batch], device=reward_model.device
        )
        with torch.no_grad():
            scores += (
                reward_model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long())
                .logits[:, 0]
                .float()
                .tolist()
            )
    return scores


def _repetition(ids: list[int]) -> float:
    bigrams = list(zip(ids, ids[1:]))
    return 1 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def evaluate(recipe: Recipe) -> dict:
    """The `eval` metrics of every checkpoint, the reward model's held-out accuracy and the win rate against SFT."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed

    from . import models

    spec, out = recipe.eval, Path(recipe.output_dir)
    for line in left_out(recipe):
        log("eval", f"left out of the report: {line} (alignkit run {recipe.source} brings it up to date)")
    found = checkpoints(recipe)
    trained = [name for name in found if name != BASE]
    if not trained:
        from .errors import UserError

        stages = " or ".join(answering_stages(recipe)) or "a policy"
        raise UserError(f"nothing to evaluate in {out}: run the {stages} stage first (alignkit run {recipe.source})")
    tokenizer = AutoTokenizer.from_pretrained(found[trained[0]])
    tokenizer.padding_side = "left"
    rows = data.load(spec.dataset, "eval.dataset", recipe, "eval")
    prompts = [
        tokenizer(data.render(r, tokenizer, add_generation_prompt=True), add_special_tokens=False).input_ids
        for r in rows
    ]
    context = models.context_length(AutoConfig.from_pretrained(found[trained[0]]))
    prompts, cut = fit_prompts(prompts, context - spec.max_new_tokens)
    if cut:
        log(
            "eval",
            f"warning: {cut} of {len(prompts)} prompts longer than {context - spec.max_new_tokens} tokens (the "
            f"model's context of {context} less eval.max_new_tokens {spec.max_new_tokens}) cut from the left",
        )
    references = rows["reference"]
    where = device()
    reward_path = reward_model_path(recipe)
    reward_model = models.load_reward_model(recipe, reward_path, tokenizer).to(where).eval() if reward_path else None
    if reward_path and rounds_done(recipe):
        log(
            "eval", f"reward_mean: every checkpoint scored by the last round's reward model, {shown(reward_path, out)}"
        )
    reference = AutoModelForCausalLM.from_pretrained(found[REFERENCE]).to(where).eval() if REFERENCE in found else None

    results, answers, scores_of, correct_of = {}, {}, {}, {}
    for name, path in found.items():
        t0 = time.time()
        model = reference if name == REFERENCE else AutoModelForCausalLM.from_pretrained(path).to(where).eval()
        if name == BASE:  # a base model from the Hub lacks the pad token the stages added
            models.fit_to_tokenizer(model, tokenizer, recipe.model.fused_gelu)
        responses = generate(model, tokenizer, prompts, spec.max_new_tokens, spec.batch_size)
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        answers[name] = texts
        correct_of[name] = [
            None if ref is None else is_correct(t, ref, spec.match) for t, ref in zip(texts, references)
        ]
        correct = [c for c in correct_of[name] if c is not None]
        kl = None
        if reference is not None:
            if name == REFERENCE:
                kl = 0.0
            else:  # the same samples on every evaluation of this checkpoint: a rerun reports the same KL
                set_seed(recipe.seed)
                samples = generate(model, tokenizer, prompts, spec.max_new_tokens, spec.batch_size, sample=True)
                own = _logprobs(model, tokenizer, prompts, samples, spec.batch_size)
                ref = _logprobs(reference, tokenizer, prompts, samples, spec.batch_size)
                kl = _mean(a - b for a, b in zip(own, ref))
        scores = (
            reward_scores(reward_model, tokenizer, [p + r for p, r in zip(prompts, responses)], spec.batch_size)
            if reward_model is not None
            else []
        )
        results[name] = {
            "gold_accuracy": _mean(correct),
            "reward_mean": _mean(scores),
            KL: kl,
            "length_mean": _mean(map(len, responses)),
            "eos_rate": _mean(tokenizer.eos_token_id in r for r in responses),
            "repetition": _mean(map(_repetition, responses)),
        }
        scores_of[name] = scores
        log(
            "eval",
            f"{name}: "
            + ", ".join(keep(f"{k} {v:.3f}") for k, v in results[name].items() if v is not None)
            + f" ({time.time() - t0:.0f}s)",
        )
    report = {"eval": results, "reward_accuracy": None, WIN_RATE: None, "win_rates": {}, "eval_prompts": len(rows)}
    report["reward_model"] = shown(reward_path, out) if reward_path else None
    report["verdict"], report["correct"] = {}, correct_of
    if reward_model is not None and spec.comparisons is not None:
        report["reward_accuracy"] = reward_accuracy(recipe, reward_model, tokenizer)
        log("eval", f"reward model: pairwise accuracy {report['reward_accuracy']:.3f} on held-out comparisons")
    # each policy trained after the reference (else every one after the earliest checkpoint), against it
    against = REFERENCE if REFERENCE in answers else next(iter(found))
    later = trained[trained.index(against) + 1 :] if against in trained else trained
    outcomes_of = {
        name: outcomes(answers[name], answers[against], references, spec.match, scores_of[name], scores_of[against])
        for name in later
    }
    if against == REFERENCE:  # the win rates; the last one's also on its own
        report["win_rates"] = {name: win_rate(judged) for name, judged in outcomes_of.items()}
        report[WIN_RATE] = report["win_rates"][later[-1]] if later else None
    for name, judged in outcomes_of.items():
        scored = REGISTRY[checkpoint_round(name)[0]].training_reward
        during = [h[scored] for h in _history(checkpoint_folder(out, name)) if scored in h] if scored else []
        report["verdict"][name] = verdict(
            against, correct_of[name], correct_of[against], judged, results[name]["reward_mean"], _mean(during)
        )
    report["samples"] = [
        {
            "prompt": data.render(rows[i], tokenizer, add_generation_prompt=True),
            "reference": references[i],
            **{name: answers[name][i] for name in found},
        }
        for i in range(min(8, len(rows)))
    ]
    report["rounds"] = None
    if recipe.rounds is not None:
        judge = {"answers": answers, "scores": scores_of, "references": references}
        report["rounds"] = rounds_block(recipe, report, judge, tokenizer)
    return report


def rounds_block(recipe: Recipe, report: dict, judge: dict, tokenizer) -> list[dict]:
    """A row per round whose policy was evaluated (round 1: the ppo stage): the policy's figures, its win rate against
    the previous round's policy (judged as outcomes() judges), and the held-out pairwise accuracy of the round's own
    reward model (the scoring one's is report["reward_accuracy"] already)."""
    from . import models

    out, results = Path(recipe.output_dir), report["eval"]
    names = [(n, round_checkpoint(ROUND_POLICY, n)) for n in [1, *rounds_done(recipe)]]
    own = reward_models(recipe)
    rows, previous = [], None
    for n, name in names:
        if name not in results:
            continue
        row = {"round": n, "checkpoint": name, "previous": previous}
        row.update({k: results[name][k] for k in ("gold_accuracy", "reward_mean", KL)})
        row[WIN_RATE] = report["win_rates"].get(name)
        row["win_rate_vs_previous"] = (
            None
            if previous is None
            else win_rate(
                outcomes(
                    judge["answers"][name],
                    judge["answers"][previous],
                    judge["references"],
                    recipe.eval.match,
                    judge["scores"][name],
                    judge["scores"][previous],
                )
            )
        )
        path = own.get(n)
        row["reward_model"] = shown(path, out) if path else None
        row["reward_accuracy"] = None
        if path and recipe.eval.comparisons is not None:
            if path == reward_model_path(recipe):
                row["reward_accuracy"] = report["reward_accuracy"]
            else:
                model = models.load_reward_model(recipe, path, tokenizer).to(device()).eval()
                row["reward_accuracy"] = reward_accuracy(recipe, model, tokenizer)
                del model
        figures = ("gold_accuracy", WIN_RATE, "win_rate_vs_previous", "reward_accuracy")
        log(
            "eval",
            f"round {n} ({name}): "
            + (", ".join(keep(f"{k} {row[k]:.3f}") for k in figures if row[k] is not None) or "no figures"),
        )
        rows.append(row)
        previous = name
    return rows


def reward_accuracy(recipe: Recipe, reward_model, tokenizer) -> float:
    """Share of held-out pairs (rankings expanded) where the chosen answer scores above the rejected one."""
    pairs = data.load(recipe.eval.comparisons, "eval.comparisons", recipe, "comparisons")

    # a ranking of K answers expands into C(K,2) pairs of the same K answers: each distinct text is scored once
    texts = {}
    sides = [
        [texts.setdefault(data.render({**r, "chosen": r[side]}, tokenizer), len(texts)) for r in pairs]
        for side in ("chosen", "rejected")
    ]
    encoded = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    from . import models

    context = models.context_length(reward_model.config)
    encoded, cut = fit_prompts(encoded, context)  # the end, where the score is read, kept
    if cut:
        log(
            "eval", f"warning: {cut} of {len(encoded)} held-out answers longer than {context} tokens cut from the left"
        )
    scores = reward_scores(reward_model, tokenizer, encoded, recipe.eval.batch_size)
    return _mean(scores[c] > scores[r] for c, r in zip(*sides))


def outcomes(
    policy: list[str], reference: list[str], references: list, match: str, policy_scores, reference_scores
) -> list[int | None]:
    """Prompt by prompt, whether a policy's answer beats the reference policy's (1), ties with it (0) or loses (-1):
    judged by the reference answer where a row has one, else by the reward model; None where neither can judge."""
    judged = []
    for i, (a, b) in enumerate(zip(policy, reference)):
        if references[i] is not None:
            x, y = is_correct(a, references[i], match), is_correct(b, references[i], match)
        elif policy_scores:
            x, y = policy_scores[i], reference_scores[i]
        else:
            judged.append(None)
            continue
        judged.append(1 if x > y else 0 if x == y else -1)
    return judged


def win_rate(judged: list[int | None]) -> float | None:
    """How often a policy's answer beats the reference policy's (outcomes()), ties counting half."""
    return _mean((o + 1) / 2 for o in judged if o is not None)


RESAMPLES, SEED = 10_000, 0  # the verdict's bootstrap: resamples, and a fixed seed


def paired_bootstrap(a: list[bool], b: list[bool]) -> tuple[float, tuple[float, float]]:
    """The difference in accuracy a - b on the same prompts and its LEVEL percentile interval, from resampling the
    prompts (each prompt's pair kept together) RESAMPLES times with a fixed seed: the same data, the same interval."""
    import numpy as np

    d = np.asarray(a, dtype=int) - np.asarray(b, dtype=int)
    n = len(d)
    # A resample's mean is (its +1s - its -1s) / n, and its counts of +1, 0 and -1 are multinomial in the shares of
    # the data's: drawing the counts is drawing the resamples, in RESAMPLES x 3 numbers instead of RESAMPLES x n.
    shares = [np.mean(d == 1), np.mean(d == 0), np.mean(d == -1)]
    counts = np.random.default_rng(SEED).multinomial(n, shares, size=RESAMPLES)
    lo, hi = np.quantile((counts[:, 0] - counts[:, 2]) / n, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(d.mean()), (float(lo), float(hi))


def verdict(
    against: str,
    correct: list[bool | None],
    against_correct: list[bool | None],
    judged: list[int | None],
    held_out_reward: float | None = None,
    training_reward: float | None = None,
) -> dict:
    """What a policy bought over `against`: its gold accuracy less against's on the prompts with a reference answer
    (correct / against_correct: per prompt, None without one), with its paired bootstrap interval; its wins, ties
    and losses (outcomes()); the reward model's mean score of its held-out answers and of its training samples; and
    the conclusion: "no measurable gain" when the interval holds 0, else "better" or "worse"."""
    pairs = [(x, y) for x, y in zip(correct, against_correct) if x is not None and y is not None]
    diff, interval = paired_bootstrap(*zip(*pairs)) if pairs else (None, None)
    conclusion = (
        "no gold answers"
        if interval is None
        else "no measurable gain"
        if interval[0] <= 0 <= interval[1]
        else "better"
        if interval[0] > 0
        else "worse"
    )
    return {
        "against": against,
        "gold_accuracy_diff": diff,
        "interval": list(interval) if interval else None,
        "wins": judged.count(1),
        "ties": judged.count(0),
        "losses": judged.count(-1),
        "held_out_reward": held_out_reward,
        "training_reward": training_reward,
        "conclusion": conclusion,
    }


# --- the report ---------------------------------------------------------------------------------------------------


def write_report(recipe: Recipe, report: dict, stages: dict, wall_seconds: float) -> Path:
    """report.json, report.md and the plots, in {output_dir}."""
    out = Path(recipe.output_dir)
    report = {"wall_seconds": wall_seconds, "stages": _with_figures(out, stages), **report}
    # what was evaluated, and by which reward models: a card leaves out a report of other outputs than it pushes
    found = checkpoints(recipe)
    scorers = [report.get("reward_model"), *(r.get("reward_model") for r in report.get("rounds") or [])]
    folders = [Path(found[name]) for name in report["eval"] if name in found] + [out / s for s in scorers if s]
    report["outputs"] = identities(out, folders)
    plots = _plots(out, report["eval"])
    if report.get("rounds"):
        plots.append(_rounds_plot(out, report["rounds"]))
    # each file replaced whole: a kill mid-write leaves the previous report, never a cut-off one
    files.write_json(out / "report.json", report)
    files.write_text(out / "report.md", _markdown(recipe, report, plots))
    log("eval", f"report: {out / 'report.md'}")
    return out / "report.md"


def _with_figures(out: Path, stages: dict) -> dict:
    """Each stage's entry with the key figures its training ended on (from its metrics.json) and, for those logged
    before its last step, the step they were logged at."""
    from .guard import logged_at

    result = {}
    for stage, entry in stages.items():
        try:
            metrics = json.loads((out / stage / "metrics.json").read_text())
        except (OSError, ValueError):
            metrics = {}
        figures = metrics.get("figures") or {}
        at = logged_at(REGISTRY[stage], metrics.get("log_history") or []) if stage in REGISTRY else {}
        result[stage] = {**entry, "figures": figures} if figures else dict(entry)
        result[stage].update({"logged_at": at} if at else {})
    return result


def _history(folder: Path) -> list[dict]:
    """A stage output's training log (its metrics.json), or none."""
    try:
        return json.loads((folder / "metrics.json").read_text())["log_history"]
    except (OSError, ValueError, KeyError):
        return []


def _save(fig, path: Path) -> None:
    """A figure as PNG, written as files.write_text writes text: a temporary file, synced, renamed over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        fig.savefig(f, format="png", dpi=80)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _plots(out: Path, results: dict) -> list[str]:
    """loss.png: the training loss of every stage that logs one; {stage}.png: the curves a stage declares (PPO's
    reward and KL, say); eval.png: the held-out figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    stages = [s.name for s in ORDER if any("loss" in h for h in _history(out / s.name))]
    if stages:
        fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3), squeeze=False)
        for ax, stage in zip(axes[0], stages):
            points = [(h["step"], h["loss"]) for h in _history(out / stage) if "loss" in h]
            ax.plot(*zip(*points), marker=".")
            ax.set(title=f"{stage} training loss", xlabel="step", ylabel="loss")
        fig.tight_layout()
        _save(fig, out / "loss.png")
        plt.close(fig)
        made.append("loss.png")
    for stage in ORDER:
        history = [h for h in _history(out / stage.name) if any(key in h for key, _, _ in stage.curves)]
        curves = [c for c in stage.curves if any(c[0] in h for h in history)]  # e.g. ptx loss only with PPO-ptx
        if not curves:
            continue
        by = "episode" if all("episode" in h for h in history) else "step"
        fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3), squeeze=False)
        colours = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown")
        for ax, (key, title, label), colour in zip(axes[0], curves, colours):
            ax.plot(*zip(*[(h[by], h[key]) for h in history if key in h]), marker=".", color=colour)
            ax.set(title=title, xlabel=by, ylabel=label)
        fig.tight_layout()
        _save(fig, out / f"{stage.name}.png")
        plt.close(fig)
        made.append(f"{stage.name}.png")
    return made + [_eval_plot(out, results)]


def _eval_plot(out: Path, results: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    metrics = [m for m in ("gold_accuracy", "eos_rate") if any(results[n][m] is not None for n in names)]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    width = 0.8 / max(1, len(metrics))
    for k, metric in enumerate(metrics):
        axes[0].bar(
            [i + k * width for i in range(len(names))], [results[n][metric] or 0 for n in names], width, label=metric
        )
    axes[0].set_xticks([i + width * (len(metrics) - 1) / 2 for i in range(len(names))], names)
    axes[0].set(title="held-out answers", ylim=(0, 1))
    axes[0].legend()
    axes[1].bar(names, [results[n]["reward_mean"] or 0 for n in names], color="tab:green")
    axes[1].set(title="reward model's mean score")
    fig.tight_layout()
    _save(fig, out / "eval.png")
    plt.close(fig)
    return "eval.png"


def _rounds_plot(out: Path, rounds: list[dict]) -> str:
    """rounds.png: by round, the policy's gold accuracy on the held-out prompts and the round's reward model's
    accuracy on the held-out comparisons."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    for key, label, colour in (
        ("gold_accuracy", "policy: gold accuracy", "tab:blue"),
        ("reward_accuracy", "reward model: pairwise accuracy", "tab:green"),
    ):
        points = [(r["round"], r[key]) for r in rounds if r[key] is not None]
        if points:
            ax.plot(*zip(*points), marker="o", color=colour, label=label)
    ax.set_xticks([r["round"] for r in rounds])
    ax.set(title="held-out figures by round", xlabel="round", ylim=(-0.05, 1.05))
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, out / "rounds.png")
    plt.close(fig)
    return "rounds.png"


def _training(stages: dict) -> list[str]:
    """What each stage's training ended on, and what its figures mean (as the stage declares)."""
    from .guard import at_step

    lines = []
    for name, entry in stages.items():
        figures, at = entry.get("figures"), entry.get("logged_at") or {}
        if figures:
            lines.append(
                f"- **{name}**: " + ", ".join(f"{k} {fmt(v)}{at_step(at.get(k))}" for k, v in figures.items())
            )
            notes = REGISTRY[name].notes if name in REGISTRY else ""
            lines += [f"  ({notes})"] if notes else []
    return ["## Training", "", "Each stage's figures at the end of its training:", "", *lines, ""] if lines else []


def _markdown(recipe: Recipe, report: dict, plots: list[str]) -> str:
    lines = [
        f"# alignkit report: {recipe.source}",
        "",
        f"Wall time {report['wall_seconds']:.0f} s. Stages: "
        + ", ".join(f"{s} {v['status']} ({v['seconds']:.0f} s)" for s, v in report["stages"].items())
        + ".",
        "",
        f"## Held-out evaluation ({report['eval_prompts']} prompts)",
        "",
        *eval_table(report["eval"]),
    ]
    lines += [
        "",
        f"- Reward model's pairwise accuracy on held-out comparisons: {fmt(report['reward_accuracy'])}",
        *win_rate_lines(report),
        "",
        *([*verdict_lines(report), ""] if report.get("verdict") else []),
        "gold_accuracy: share of answers equal to the reference"
        f" ({recipe.eval.match} match, ignoring case and end punctuation). {KL}: nats per response, on the "
        "checkpoint's own samples at temperature 1. length_mean: tokens per answer. repetition: share of an "
        "answer's token bigrams that repeat an earlier one." + (" " + KL_NOTE if shows_kl(report["eval"]) else ""),
        "",
    ]
    lines += [f"![{p}]({p})" for p in plots if p != "rounds.png"] + [""]
    if "rounds.png" in plots:
        lines += [*rounds_lines(report), "![rounds.png](rounds.png)", ""]
    lines += [*_training(report["stages"]), "## Sample answers", ""]
    for sample in report["samples"]:
        lines.append(f"**Prompt** `{sample['prompt']!r}` (reference: {sample['reference']!r})")
        lines += [f"- {name}: {sample[name]!r}" for name in report["eval"] if name in sample] + [""]
    return "\n".join(lines)
