"""`alignkit sample`: K answers per prompt from a run's policy stages (or model folders), written as unranked rankings
for a labeller or a judge program (`alignkit rank`) to order, and the reward stage to train on.

Each row is one prompt: its answers from every model asked, shuffled together so that whoever ranks them compares
the models blind, `ranks: null` (not ranked yet), and its provenance (each model's folder, stage and fingerprint, the
sampling settings, the seed, the round, the prompt's file and line). The K answers of a prompt are split among the
models as evenly as K allows (the first named get one more). An answer that is empty or repeats another answer of its
prompt is drawn again, a bounded number of times; what stays so is left out and counted, and a prompt left with
fewer than two answers is left out of the file (a ranking needs two). Prompts are generated in batches, left-padded,
through the model's generate() with its KV cache, longest prompts first; a prompt too long for the context less the
answer's room is cut from the left. The same command (prompts, models, settings, seed, batch size) writes the same
file.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import data, files
from .errors import DataError, UserError
from .log import log


@dataclass(frozen=True)
class Sampling:
    """How answers are drawn; each row carries these as its provenance."""

    k: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 42
    batch_size: int = 32
    redraws: int = 3
    round: int | None = None


def check(sampling: Sampling, models: int) -> None:
    """Refuse settings that cannot give a ranking, naming the option."""
    if sampling.k < 2:
        raise UserError(f"--k {sampling.k}: a ranking needs at least two answers per prompt")
    if sampling.k < models:
        raise UserError(
            f"--k {sampling.k} answers per prompt cannot be shared among {models} models; give --k {models} or more"
        )
    if not sampling.temperature > 0:
        raise UserError(f"--temperature {sampling.temperature}: give a number above 0 (1 samples the model as it is)")
    if not 0 < sampling.top_p <= 1:
        raise UserError(f"--top-p {sampling.top_p}: give a share of the probability mass, above 0 and at most 1")
    if not 0 <= sampling.seed < 2**32:
        raise UserError(f"--seed {sampling.seed}: give a whole number from 0 to {2**32 - 1}")
    for option, value, least in (
        ("--max-new-tokens", sampling.max_new_tokens, 1),
        ("--batch-size", sampling.batch_size, 1),
        ("--redraws", sampling.redraws, 0),
    ):
        if value < least:
            raise UserError(f"{option} {value}: give {least} or more")


def sources(target: str, stages: list[str] | None) -> list[dict]:
    """The models to sample, each {stage, model, fingerprint}: the named stages of a run folder (default its last
    policy stage), or a model folder; a stage's fingerprint comes from its alignkit_stage.json."""
    from .chat import resolve
    from .pipeline import identity, read_manifest

    if stages and len(set(stages)) < len(stages):
        raise UserError(f"--stage {' --stage '.join(stages)}: each stage once")
    out = []
    for stage in stages or [None]:
        folder = resolve(target, stage)
        manifest = read_manifest(Path(folder)) if Path(folder).is_dir() else None
        out.append(
            {
                "stage": stage or (manifest or {}).get("stage"),
                "model": folder,
                "fingerprint": identity(manifest),
            }
        )
    return out


def prompt_key(prompt) -> str:
    """A prompt as the held-out check compares it: its turns, roles and words (spacing aside); plain text is a
    user's turn."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return json.dumps([[m["role"], " ".join(m["content"].split())] for m in messages])


def refuse_held_out(prompts, locate, recipe) -> None:
    """Raise DataError naming every prompt (file and line) that the recipe's eval data also holds: held-out prompts
    must never reach training through sampled answers. `recipe`: a loaded recipe or a recipe's path."""
    from .recipe import load_recipe

    recipe_path = recipe if isinstance(recipe, str) else str(recipe.source)
    if isinstance(recipe, str):
        recipe = load_recipe(recipe, check_trainers=False)
    if recipe.eval is None:
        log("sample", f"{recipe_path} has no eval section: no prompt is held out")
        return
    held: dict[str, str] = {}
    for key, kind in (("dataset", "eval"), ("comparisons", "rankings")):
        spec = getattr(recipe.eval, key)
        if spec is None:
            continue
        rows, where = data.load_located(spec, f"eval.{key}", recipe, kind)
        for i, row in enumerate(rows):
            prompt = row.get("prompt")
            if prompt is None and row.get("ranked"):  # the prompt inside the conversations (TRL's implicit prompt)
                first = row["ranked"][0]
                if isinstance(first, list) and first and first[-1].get("role") == "assistant":
                    prompt = first[:-1]
            if prompt:  # (a pair of plain texts holds no prompt of its own)
                held.setdefault(prompt_key(prompt), where(i))
    keys = [prompt_key(row["prompt"]) for row in prompts]
    found = [(locate(i), held[key]) for i, key in enumerate(keys) if key in held]
    if found:
        lines = [f"  {mine}: also {theirs}" for mine, theirs in found[:20]]
        more = [f"  ... and {len(found) - 20} more"] if len(found) > 20 else []
        raise DataError(
            f"{len(found)} of {len(prompts)} prompts are held out by {recipe_path} (its eval data): answers to them "
            "would carry held-out prompts into training. Remove these rows, or sample from other prompts:\n"
            + "\n".join(lines + more)
        )


def shares(k: int, models: int) -> list[int]:
    """How many of a prompt's K answers each model gives: as even as K allows, the first named one more."""
    return [k // models + (i < k % models) for i in range(models)]


class Progress:
    """alignkit's progress line for answers: done of total, speed and time left; at most every `every` seconds while
    a model answers, and once when it is done."""

    def __init__(self, total: int, every: float = 10.0):
        self.total, self.every, self.done = total, every, 0
        self.start = self.last = time.time()

    def add(self, n: int, what: str, done: bool = False) -> None:
        from .guard import clock

        self.done += n
        now = time.time()
        if now - self.last < self.every and not done:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        parts = [f"{what}: {self.done}/{self.total} answers", f"{rate:.1f} answers/s"]
        if self.total > self.done:
            parts.append(f"{clock((self.total - self.done) / rate)} left")
        log("sample", "  ".join(parts))


def _prompt_ids(rows, tokenizer, room: int, name: str) -> list[list[int]]:
    """Each prompt's tokens through the chat template (plain text as it is), cut from the left to `room`."""
    from .evaluate import fit_prompts

    ids = [
        tokenizer(data.render(row, tokenizer, add_generation_prompt=True), add_special_tokens=False).input_ids
        for row in rows
    ]
    ids, cut = fit_prompts(ids, room)
    if cut:
        log(
            "sample",
            f"warning: {name}: {cut} of {len(ids)} prompts longer than {room} tokens (the model's context less "
            "--max-new-tokens) cut from the left",
        )
    return ids


def draw(
    prompts, models: list[dict], sampling: Sampling, option: str = "--max-new-tokens"
) -> tuple[list[list[tuple[str, int]]], dict]:
    """Every prompt's answers as [(text, model index)]. The models answer in turn, each loaded once; an answer that
    is empty or the same as an earlier one of its prompt (its own model's or an earlier model's) is drawn again up to
    `sampling.redraws` times, then left out. Returns the answers and counts of what happened. `option`: what the
    user set max_new_tokens with, for the error that names it."""
    from transformers import set_seed

    from . import models as model_utils
    from .chat import load
    from .evaluate import generate

    set_seed(sampling.seed)
    plain = [isinstance(row["prompt"], str) for row in prompts]
    wanted = shares(sampling.k, len(models))
    slots = [[(m, None) for m, n in enumerate(wanted) for _ in range(n)] for _ in prompts]  # (model, text) per answer
    progress = Progress(len(prompts) * sampling.k)
    redrawn = 0
    for m, source in enumerate(models):
        name = source["stage"] or source["model"]
        model, tokenizer, notes = load(source["model"])
        for note in notes:
            log("sample", f"{name}: {note}")
        context = model_utils.context_length(model.config)
        if context - sampling.max_new_tokens < 1:
            raise UserError(
                f"{option} {sampling.max_new_tokens} leaves no room for a prompt in the context of {name} "
                f"({context} tokens); lower it"
            )
        ids = _prompt_ids(prompts, tokenizer, context - sampling.max_new_tokens, name)
        for attempt in range(sampling.redraws + 1):
            todo = [(i, j) for i, row in enumerate(slots) for j in _to_draw(row, plain[i]) if row[j][0] == m]
            if not todo:
                break
            if attempt:
                redrawn += len(todo)
                progress.total += len(todo)
            todo.sort(key=lambda slot: -len(ids[slot[0]]))  # longest first: batches pad less, and OOM comes at once
            answers = generate(
                model,
                tokenizer,
                [ids[i] for i, _ in todo],
                sampling.max_new_tokens,
                sampling.batch_size,
                sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                on_batch=lambda n: progress.add(n, name),
            )
            for (i, j), answer in zip(todo, tokenizer.batch_decode(answers, skip_special_tokens=True)):
                slots[i][j] = (m, answer if plain[i] else answer.strip())
        progress.add(0, name, done=True)
        del model
        if m + 1 < len(models):
            model_utils.free_accelerator_memory()  # one model in memory at a time (a full gc: not after the last)
    rows, equal, empty, dropped = [], 0, 0, 0
    for i, row in enumerate(slots):
        bad = set(_to_draw(row, plain[i]))
        empty += sum(not row[j][1].strip() for j in bad)
        equal += sum(bool(row[j][1].strip()) for j in bad)
        kept = [(text, m) for j, (m, text) in enumerate(row) if j not in bad]
        rows.append(kept)
        dropped += len(kept) < 2
    return rows, {"redrawn": redrawn, "equal": equal, "empty": empty, "prompts_dropped": dropped}


def _to_draw(row: list[tuple[int, str | None]], plain: bool) -> list[int]:
    """The answers of a prompt to draw (again): not drawn yet, empty, or the same as an earlier answer."""
    seen, out = set(), []
    for j, (_, text) in enumerate(row):
        key = None if text is None else text.strip() if not plain else text
        if key is None or not key.strip() or key in seen:
            out.append(j)
        else:
            seen.add(key)
    return out


def rows_for(prompts, locate, drawn, models: list[dict], sampling: Sampling) -> list[dict]:
    """The file's rows: each prompt with its answers shuffled (a fixed shuffle, from the seed), `ranks: null`, and
    where the row came from."""
    shuffle = random.Random(sampling.seed)
    settings = asdict(sampling)  # the batch size too: the batches' make-up decides which random numbers an answer gets
    out = []
    for i, answers in enumerate(drawn):
        if len(answers) < 2:
            continue
        answers = list(answers)
        shuffle.shuffle(answers)
        out.append(
            {
                "prompt": prompts[i]["prompt"],
                "responses": [text for text, _ in answers],
                "ranks": None,
                "provenance": {
                    "prompt": locate(i),
                    "models": models,
                    "sources": [m for _, m in answers],
                    **settings,
                },
            }
        )
    return out


def main(args) -> int:
    from .recipe import Dataset

    sampling = Sampling(
        k=args.k,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
        redraws=args.redraws,
        round=args.round,
    )
    check(sampling, len(args.stages or [None]))
    out = Path(args.out)  # checked by the command line: a .jsonl file in a folder that exists
    prompts, locate = data.load_located(Dataset(path=args.prompts), "--prompts", None, "prompts")
    if args.recipe:
        refuse_held_out(prompts, locate, args.recipe)
    models = sources(args.model, args.stages)
    t0 = time.time()
    drawn, counts = draw(prompts, models, sampling)
    rows = rows_for(prompts, locate, drawn, models, sampling)
    answers = sum(len(r["responses"]) for r in rows)
    if counts["redrawn"]:
        stayed = counts["equal"] + counts["empty"]
        log(
            "sample",
            f"{counts['redrawn']} answers drawn again (empty, or the same as another answer to their prompt); "
            + (
                f"after {sampling.redraws} tries {counts['equal']} stayed equal to another and {counts['empty']} "
                "empty: left out"
                if stayed
                else "all differ now"
            ),
        )
    elif counts["equal"] + counts["empty"]:
        log("sample", f"{counts['equal']} answers equal to another and {counts['empty']} empty left out (--redraws 0)")
    if counts["prompts_dropped"]:
        log(
            "sample",
            f"warning: {counts['prompts_dropped']} of {len(prompts)} prompts left with fewer than two different "
            "answers are not in the file (a ranking needs two)",
        )
    if not rows:  # nothing to rank: said here, not as an empty file that `alignkit rank` then names
        raise DataError(
            f"--prompts {args.prompts}: no prompt got two different answers ({counts['equal']} answers equal to "
            f"another, {counts['empty']} empty, after {sampling.redraws} redraws each); nothing was written. Sample "
            "more freely (raise --temperature, --top-p or --max-new-tokens) or give other prompts"
        )
    files.write_jsonl(out, rows)
    log(
        "sample",
        f"wrote {len(rows)} prompts, {answers} answers from {', '.join(m['stage'] or m['model'] for m in models)} "
        f"to {out} ({time.time() - t0:.0f}s)",
    )
    return 0
