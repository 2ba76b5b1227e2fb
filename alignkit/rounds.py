"""Rounds: the loop RLHF is named for. Round 1 is the recipe's stages; each later round N samples K answers per prompt
from the newest policy, has them ranked (a judge program, or people), retrains the reward model on the recipe's
comparisons plus every round's rankings so far, and continues PPO from the last round's policy (its value model from
the new reward model, as in round 1) with the KL reference still the model ppo first started from (the sft model),
as Llama 2's and Anthropic's iterated rounds do.

Round N writes {output_dir}/round-N/: samples.jsonl (unranked, as `alignkit sample` writes them), rankings.jsonl
(ranked: by the judge, or filled in by people), reward/ and ppo/ (stage folders, reused and resumed like any stage),
and round.json, which records what the samples and rankings were made from: they are made again only when that
changed. The samples' fingerprint covers the policy's, the sampling settings and the prompts; the rankings' the
samples' and the judge's file (or, ranked by people, the rankings themselves); the reward stage's its rankings too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from dataclasses import asdict
from pathlib import Path

from . import data, files, pipeline
from .distributed import is_main, wait_for_everyone
from .errors import DataError, WaitingForRankings
from .log import log
from .pipeline import BEST_OF_K
from .recipe import Recipe, best_of_k_stage, round_recipe, round_stages
from .sample import Sampling, draw, refuse_held_out, rows_for
from .stages import REGISTRY
from .stages.reward import ROUND_RANKINGS

PEOPLE = "people"
STAMP = "round.json"


def policy_folder(recipe: Recipe, n: int) -> str:
    """Round n's policy, relative to the run's folder."""
    policy, _ = round_stages(recipe)
    return policy if n == 1 else f"round-{n}/{policy}"


def prepare(recipe: Recipe) -> None:
    """What can be checked before anything trains: the rounds' prompts load and none is held out, the judge imports."""
    rounds = recipe.rounds
    if rounds is None:
        return
    prompts, locate = data.load_located(rounds.prompts, "rounds.prompts", recipe, "prompts")
    refuse_held_out(prompts, locate, recipe)
    if rounds.rank_by != PEOPLE:
        from .rank import load_judge

        load_judge(_judge_spec(recipe))


def run(recipe: Recipe, force: bool = False) -> dict:
    """Rounds 2 to rounds.count, after the stages (round 1) are complete; returns their summary entries by folder
    ('round-2/reward', 'round-2/ppo', ...). Raises WaitingForRankings where people have not ranked enough yet."""
    rounds = recipe.rounds
    if rounds is None:
        return {}
    out = Path(recipe.output_dir)
    policy, reward = round_stages(recipe)
    tuned = best_of_k_stage(recipe) if rounds.rejection_sampling else None  # fine-tunes on the best answers
    reference = pipeline.upstream(recipe, policy)["model"]  # the KL reference in every round
    prompts, locate = data.load_located(rounds.prompts, "rounds.prompts", recipe, "prompts")
    more = []
    if rounds.train_on_prompts:  # later rounds' policy trains on its stage's prompts and the rounds' own
        mixed = out / "round-prompts.jsonl"
        own = data.load(recipe.stages[policy].dataset, policy, recipe, REGISTRY[policy].data)
        if is_main():
            rows = [{"prompt": row["prompt"]} for part in (own, prompts) for row in part]
            files.write_jsonl(mixed, rows)
        wait_for_everyone()
        more = [f"stages.{policy}.dataset={json.dumps({'path': str(mixed.resolve())})}"]
    if recipe.adapters(policy)[0] and hasattr(recipe.stages[policy], "separate_reference"):
        # LoRA: a later round's policy is the last round's (merged) with a new adapter, so disabling the adapter no
        # longer gives the KL reference; the sft model is loaded as a second frozen copy (quantized like the policy)
        more.append(f"stages.{policy}.separate_reference=true")
        log("rounds", f"{policy} has LoRA: later rounds load its KL reference ({reference}) as a second frozen copy")
    later = round_recipe(recipe, more)
    sampling = Sampling(
        k=rounds.k,
        temperature=rounds.temperature,
        top_p=rounds.top_p,
        max_new_tokens=rounds.max_new_tokens or later.configs[policy].args.response_length,
        seed=recipe.seed,
        batch_size=rounds.batch_size,
        redraws=rounds.redraws,
    )
    summary: dict[str, dict] = {}
    rankings: dict[str, str] = {}  # the reward stage's inputs: "rankings of round N" -> file, relative to out
    ranking_fps: list[str] = []
    previous = policy_folder(recipe, 1)
    previous_fp = _fp(out, previous)
    before = reference  # with compare_previous, the policy before the newest: round 2 compares with its start
    for n in range(2, rounds.count + 1):
        here = pipeline.round_folder(out, n)
        compared = [(before, _fp(out, before) if before else None)] if rounds.compare_previous else []
        log(
            f"round {n}",
            f"of {rounds.count}: sampling from {out / previous}"
            + (f" and, blind beside it, {_model_path(recipe, before)}" if compared else "")
            + f", ranked by {rounds.rank_by}",
        )
        if is_main():
            here.mkdir(parents=True, exist_ok=True)
            for folder in (reward, policy, BEST_OF_K):
                pipeline.recover(here / folder)
        wait_for_everyone()
        sources = [(previous, previous_fp), *compared]
        drawn = _samples(recipe, here, n, sources, prompts, locate, sampling, force)
        ranked_file, ranked_fp = _rankings(recipe, here, n, drawn, force)
        rankings[f"{ROUND_RANKINGS}{n}"] = str(ranked_file.relative_to(out))
        ranking_fps.append(ranked_fp)

        # the reward model: from what the recipe's starts from (or the last round's, rounds.reward_from), on its
        # comparisons and every round's rankings
        ups = pipeline.upstream(later, reward)
        if rounds.reward_from == "previous":  # on from the last round's reward model instead
            ups["model"] = reward if n == 2 else f"round-{n - 1}/{reward}"
        parts = pipeline.fingerprint_parts(later, reward, {up: _fp(out, up) for up in ups.values() if up})
        reward_fp, summary[f"round-{n}/{reward}"] = pipeline.build(
            later, reward, here / reward, {**ups, **rankings}, {**parts, "rankings": list(ranking_fps)}, force, out
        )

        start, start_fp = previous, previous_fp
        if tuned:  # rejection sampling: the last round's policy fine-tuned on the best answers first
            start, start_fp, entry = _best_of_k(
                recipe, more, tuned, here, n, (ranked_file, ranked_fp), reward_fp, (previous, previous_fp), force
            )
            if entry:
                summary[start] = entry

        # the policy: on from the last round's, against this round's reward model, its KL to the first reference
        # (its value model starts from this round's reward model, as round 1's does: one trained on the last round's
        # rewards would start off by what the reward model has learnt since)
        roles = {"model": start, "reference": reference, "reward_model": f"round-{n}/{reward}"}
        ups = {start: start_fp, f"round-{n}/{reward}": reward_fp}
        if reference:
            ups[reference] = _fp(out, reference)
        previous_fp, summary[f"round-{n}/{policy}"] = pipeline.build(
            later, policy, here / policy, roles, pipeline.fingerprint_parts(later, policy, ups), force, out
        )
        before, previous = previous, policy_folder(recipe, n)
    return summary


def _best_of_k(recipe, more, tuned: str, here: Path, n: int, ranked: tuple, reward_fp: str, previous: tuple, force):
    """Rejection sampling (Llama 2): the last round's policy fine-tuned, as the `tuned` stage trains, on each prompt's
    best answer (round-N/best-of-k.jsonl). `ranked` and `previous` are (folder or file, fingerprint). Returns (the
    model PPO starts from, its fingerprint, its summary entry or None): the last round's policy itself where no answer
    was good enough."""
    out = Path(recipe.output_dir)
    answers, _ = _best_answers(recipe, here, n, *ranked, here / round_stages(recipe)[1], reward_fp, force)
    if answers is None:
        return (*previous, None)
    dataset = json.dumps({"path": str(answers.resolve())})
    trains = round_recipe(recipe, [*more, f"stages.{tuned}.dataset={dataset}"])
    folder = f"round-{n}/{BEST_OF_K}"
    parts = pipeline.fingerprint_parts(trains, tuned, dict([previous]))
    fp, entry = pipeline.build(trains, tuned, out / folder, {"model": previous[0]}, parts, force, out)
    return folder, fp, entry


def _best_answers(
    recipe, here: Path, n: int, ranked: Path, ranked_fp: str, reward_dir: Path, reward_fp: str | None, force: bool
):
    """round-N/best-of-k.jsonl: for each prompt, an answer ranked 1 (of several, the one the round's reward model
    scores highest), as a demonstration; with rounds.best_min_reward, only where that model scores it at least that.
    Returns the file (None when none was kept) and its fingerprint."""
    floor = recipe.rounds.best_min_reward
    parts = {"rankings": ranked_fp, "reward_model": reward_fp, "floor": floor}
    # the rankings' fingerprint is their answers and ranks (what the reward stage reads); which rows a labeller found
    # none acceptable in (and wrote nothing) changes the best answers alone, so it joins here, where any are
    refused = [i for i, row in enumerate(data.read_rows(ranked)[0]) if _refused(row)]
    if refused:
        parts["none_acceptable"] = refused
    fp = pipeline.digest(parts)
    path = here / f"{BEST_OF_K}.jsonl"
    stamp = _stamp(here).get(BEST_OF_K) or {}
    fresh = not force and stamp.get("fingerprint") == fp and (path.is_file() or stamp.get("kept") == 0)
    wait_for_everyone()  # every process has read the stamp before the main one rewrites it
    if fresh:
        log(f"round {n}", f"best answers up to date ({stamp.get('kept')} kept), reusing them")
    elif is_main():
        rankings = data.read_rows(ranked)[0]
        rows = _pick_best(recipe, rankings, reward_dir, floor, recipe.rounds.batch_size)
        if rows:
            files.write_jsonl(path, rows)
        elif path.is_file():
            path.unlink()
        files.write_json(here / STAMP, {**_stamp(here), BEST_OF_K: {"fingerprint": fp, "kept": len(rows)}})
        prompts = len({_key(row["prompt"]) for row in rankings})
        log(
            f"round {n}",
            f"rejection sampling: {len(rows)} of {prompts} prompts have an answer ranked 1"
            + (f" that {reward_dir} scores at least {floor:g}" if floor is not None else "")
            + (f" -> {path}" if rows else "; the policy goes on to PPO as it is"),
        )
    wait_for_everyone()
    kept = (_stamp(here).get(BEST_OF_K) or {}).get("kept", 0)
    return (path if kept else None), fp


def _pick_best(recipe, rankings: list[dict], reward_dir: Path, floor: float | None, batch_size: int) -> list[dict]:
    """Each prompt's answer ranked 1 (in any of its rankings: people may each rank it), the reward model's best
    where there are several, at or above `floor` where one is given, as a demonstration row (the sft data's own
    shape: messages for a conversation, prompt and completion for text). A judge whose ranks are a scale may rank
    none 1; a ranking whose labeller found none acceptable and wrote nothing gives none."""
    from . import models
    from .evaluate import device, fit_prompts, reward_scores
    from .stages.reward import scored_text

    firsts: dict[str, dict] = {}  # prompt -> {"row": its first ranking, "answers": its answers ranked 1}
    for row in rankings:
        if _refused(row):
            continue
        entry = firsts.setdefault(_key(row["prompt"]), {"row": row, "answers": []})
        entry["answers"] += [a for a, r in zip(row["responses"], row["ranks"]) if r == 1 and a not in entry["answers"]]
    pool = [(key, answer) for key, entry in firsts.items() for answer in entry["answers"]]
    if not pool:
        return []
    tokenizer = models.load_tokenizer(recipe, str(reward_dir))
    model = models.load_reward_model(recipe, str(reward_dir), tokenizer).to(device()).eval()
    texts = [scored_text(_demonstration(firsts[key]["row"]["prompt"], answer), tokenizer) for key, answer in pool]
    encoded, _ = fit_prompts(
        [tokenizer(t, add_special_tokens=False).input_ids for t in texts], models.context_length(model.config)
    )
    scores = reward_scores(model, tokenizer, encoded, batch_size)
    del model
    best: dict[str, tuple[float, str]] = {}
    for (key, answer), score in zip(pool, scores):
        if key not in best or score > best[key][0]:
            best[key] = (score, answer)
    return [
        {
            **_demonstration(firsts[key]["row"]["prompt"], answer),
            "score": round(score, 4),
            "provenance": firsts[key]["row"].get("provenance"),
        }
        for key, (score, answer) in best.items()
        if floor is None or score >= floor
    ]


def _refused(row: dict) -> bool:
    """A labeller found no answer acceptable and wrote none better: the row gives rejection sampling nothing."""
    seen = row.get("provenance") or {}
    return bool(seen.get("none_acceptable") and not seen.get("written"))


def _key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True)


def _demonstration(prompt, answer: str) -> dict:
    if isinstance(prompt, list):
        return {"messages": [*prompt, {"role": "assistant", "content": answer}]}
    return {"prompt": prompt, "completion": answer}


def _model_path(recipe: Recipe, stage: str | None) -> str:
    """A model the rounds sample from: a stage's folder in the run, or (no stage) the recipe's base model."""
    return str(Path(recipe.output_dir) / stage) if stage else recipe.model.name_or_path


def _fp(out: Path, stage: str) -> str | None:
    return pipeline.identity(pipeline.read_complete(out / stage))


def _stamp(here: Path) -> dict:
    try:
        return json.loads((here / STAMP).read_text())
    except (OSError, ValueError):
        return {}


def _samples(recipe, here: Path, n: int, sources: list, prompts, locate, sampling: Sampling, force: bool):
    """round-N/samples.jsonl: K answers per prompt from the last round's policy (and, with compare_previous, the one
    before it: sources holds (stage folder, fingerprint) of each); drawn again only when a model, the prompts or the
    sampling settings changed. Returns the samples' fingerprint."""
    sampling = Sampling(**{**asdict(sampling), "seed": sampling.seed + n, "round": n})  # each round its own draws
    fps = {
        "policy": sources[0][1],
        "sampling": asdict(sampling),
        "prompts": data.fingerprint(recipe.rounds.prompts, recipe),
    }
    chosen = _selection(recipe.rounds.prompts)
    if chosen:  # (only when set, so that a run whose prompts file is read whole keeps its fingerprint)
        fps["selection"] = chosen
    if len(sources) > 1:
        fps["compared"] = [fp or _model_path(recipe, stage) for stage, fp in sources[1:]]
    fp = pipeline.digest(fps)
    path = here / "samples.jsonl"
    fresh = not force and path.is_file() and _stamp(here).get("samples") == fp
    wait_for_everyone()  # every process has read the stamp before the main one rewrites it: all meet the same barriers
    if fresh:
        log(f"round {n}", f"samples up to date, reusing {path}")
        return fp
    if is_main():
        t0 = time.time()
        models = [
            {
                "stage": stage.rpartition("/")[2] if stage else None,
                "model": _model_path(recipe, stage),
                "fingerprint": fp,
            }
            for stage, fp in sources
        ]
        answers, counts = draw(prompts, models, sampling, "rounds.max_new_tokens")
        rows = rows_for(prompts, locate, answers, models, sampling)
        if not rows:  # nothing to rank: say why here, not as an empty file that the ranking or the reward stage names
            raise DataError(
                f"round {n}: no prompt of {recipe.rounds.prompts.path} got two different answers from "
                f"{models[0]['model']} ({counts['equal']} answers equal to another, {counts['empty']} empty, after "
                f"{sampling.redraws} redraws each); sample more freely (raise rounds.temperature or rounds.top_p, or "
                "rounds.max_new_tokens) or give other prompts"
            )
        files.write_jsonl(path, rows)
        files.write_json(here / STAMP, {**_stamp(here), "samples": fp})
        left = counts["equal"] + counts["empty"]
        log(
            f"round {n}",
            f"sampled {sum(len(r['responses']) for r in rows)} answers to {len(rows)} prompts in "
            f"{time.time() - t0:.0f}s -> {path}"
            + (f" ({left} empty or repeated answers left out)" if left else "")
            + (
                f"; {counts['prompts_dropped']} prompts with fewer than two answers left out"
                if counts["prompts_dropped"]
                else ""
            ),
        )
    wait_for_everyone()
    return fp


def _selection(spec) -> dict:
    """The settings of rounds.prompts that choose rows or columns of the file (format, columns, max_rows), where
    they differ from their defaults: the file's hash alone does not see them."""
    defaults = {"format": "auto", "columns": {}, "max_rows": None}
    return {key: getattr(spec, key) for key, default in defaults.items() if getattr(spec, key, default) != default}


def _judge_spec(recipe: Recipe) -> str:
    """rounds.rank_by with a judge file's path resolved as the recipe's paths are."""
    module, _, function = recipe.rounds.rank_by.rpartition(":")
    return f"{recipe.resolve(module)}:{function}" if module.endswith(".py") else recipe.rounds.rank_by


def _judge_source(spec: str) -> str:
    """The judge's source file and the Python files beside it (a judge may read the world from a module next to it,
    as data/chat/judge.py reads make.py), so that a changed judge ranks again."""
    module = spec.rpartition(":")[0]
    path = Path(module) if module.endswith(".py") else None
    if path is None:
        found = importlib.util.find_spec(module)
        path = Path(found.origin) if found is not None and found.origin else None
    if path is None or not path.is_file():
        return spec
    h = hashlib.sha256()
    for source in [path, *sorted(p for p in path.parent.glob("*.py") if p.name != path.name)]:
        h.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _ranked_fp(rows: list[dict]) -> str:
    """What the reward stage sees of a round's rankings, and so its fingerprint: each row's answers and ranks (not
    who ranked or where: a judge named another way that ranks alike retrains nothing)."""
    return pipeline.digest([row["responses"] + [row["ranks"]] for row in rows])


def _rankings(recipe: Recipe, here: Path, n: int, samples_fp: str, force: bool = False) -> tuple[Path, str]:
    """The round's ranked answers: (the file the reward stage reads, its fingerprint). A judge ranks again when the
    samples, the judge or its source changed, or with --force; the fingerprint is the rankings' contents."""
    if recipe.rounds.rank_by == PEOPLE:
        return _people(recipe, here, n, samples_fp)
    from .rank import rank_rows

    spec = _judge_spec(recipe)
    path = here / "rankings.jsonl"
    fp = pipeline.digest({"samples": samples_fp, "judge": recipe.rounds.rank_by, "source": _judge_source(spec)})
    fresh = not force and path.is_file() and _stamp(here).get("rankings") == fp
    wait_for_everyone()  # as in _samples: no process reads the stamp the main one is writing
    if fresh:
        log(f"round {n}", f"rankings up to date, reusing {path}")
        return path, _ranked_fp(data.read_rows(path)[0])
    if is_main():
        rows = rank_rows(here / "samples.jsonl", spec)
        stamp = _stamp(here)
        if "offered" in stamp and path.is_file():  # the file people were given (rank_by was people): kept aside
            _set_aside(n, [path], stamp["offered"])
        files.write_jsonl(path, rows)
        rest = {k: v for k, v in stamp.items() if k not in ("offered", "waiting")}  # no longer waits for people
        files.write_json(here / STAMP, {**rest, "rankings": fp})
        pairs = sum(len(data.strict_pairs(row["ranks"])) for row in rows)
        log(f"round {n}", f"{recipe.rounds.rank_by} ranked {len(rows)} prompts: {pairs} ordered pairs -> {path}")
    wait_for_everyone()
    return path, _ranked_fp(data.read_rows(path)[0])


GUIDELINES = "guidelines.md"


def _aside(path: Path, tag: str) -> Path:
    """rankings.jsonl -> rankings-TAG.jsonl; samples.labels.db -> samples-TAG.labels.db."""
    stem, _, suffixes = path.name.partition(".")
    return path.with_name(f"{stem}-{tag}.{suffixes}")


def _free_tag(tag: str, paths: list[Path]) -> str:
    """`tag`, or tag-2, tag-3, ... where an earlier set of rankings already holds the name (samples that changed back
    and forth): people's work set aside is never replaced."""
    n, free = 1, tag
    while any(_aside(path, free).exists() for path in paths):
        n += 1
        free = f"{tag}-{n}"
    return free


def _set_aside(n: int, paths: list[Path], offered: str | None) -> None:
    """Rankings that no longer fit the round (its samples changed, or who ranks did) moved to rankings-TAG.jsonl
    (and the labels database to samples-TAG.labels.db, with its log), TAG the fingerprint of the samples they were
    made from: people's work is never deleted or replaced."""
    tag = _free_tag((offered or "older")[:8], paths)
    for old in paths:
        for suffix in ("", "-wal", "-shm"):  # a labels database left by a server that was killed keeps its log
            side = old.with_name(old.name + suffix)
            if side.is_file():
                side.rename(_aside(old, tag).with_name(_aside(old, tag).name + suffix))
    log(f"round {n}", f"{paths[0]} no longer fits the round's samples or ranker: kept aside as rankings-{tag}.*")


def _people(recipe: Recipe, here: Path, n: int, samples_fp: str) -> tuple[Path, str]:
    """Rankings by people: on the labelling page (`alignkit label`, whose database lies beside samples.jsonl: every
    labeller's ranking of a prompt is a row), or by hand in round-N/rankings.jsonl, which starts as the samples
    (ranks: null). With too few prompts ranked the run stops (WaitingForRankings); with enough, the ranked rows go to
    ranked.jsonl, which the reward stage reads, and their contents are the fingerprint."""
    from .label import export
    from .label.batch import read as read_batch
    from .label.store import Store, db_path_for

    path, ranked, db = here / "rankings.jsonl", here / "ranked.jsonl", db_path_for(here / "samples.jsonl")
    stamp = _stamp(here)
    if is_main() and path.is_file() and stamp.get("offered") != samples_fp:
        # made from other samples, or by a judge (rank_by was a program): kept aside, and the samples offered anew
        _set_aside(n, [path, db], stamp.get("offered"))
    if is_main() and not path.is_file():
        files.write_text(path, (here / "samples.jsonl").read_text())
        rest = {k: v for k, v in _stamp(here).items() if k != "rankings"}  # a judge set to rank later ranks again
        files.write_json(here / STAMP, {**rest, "offered": samples_fp})
    if is_main() and recipe.rounds.guidelines:  # the page shows the guidelines.md beside the batch
        files.write_text(here / GUIDELINES, recipe.resolve(recipe.rounds.guidelines).read_text(encoding="utf-8"))
    wait_for_everyone()
    rows, lines = data.read_rows(path)
    sampled = data.read_rows(here / "samples.jsonl")[0]
    problems, done, prompts = [], [], set()
    if len(rows) != len(sampled):
        problems.append(f"{path}: {len(rows)} rows, but {len(sampled)} prompts were sampled; keep one row per prompt")
    for index, (row, line, drawn) in enumerate(zip(rows, lines, sampled)):
        answers = row.get("responses")
        if not isinstance(answers, list) or sorted(map(str, answers)) != sorted(map(str, drawn["responses"])):
            problems.append(
                f"{path}:{line}: the answers are not the ones sampled for this prompt; rank them, do not edit"
            )
            continue
        if row.get("prompt") != drawn["prompt"]:
            problems.append(f"{path}:{line}: the prompt is not the one sampled on this line; rank, do not edit")
            continue
        if row.get("ranks") is None:
            continue
        try:
            data.check_ranks(row["ranks"], len(row.get("responses") or []))
            data.check_answers(row["responses"])
        except DataError as e:
            problems.append(f"{path}:{line}: {e}")
            continue
        done.append(row)
        prompts.add(index)
    if problems:
        raise DataError(f"{path}: {len(problems)} rankings cannot be used:\n  " + "\n  ".join(problems[:20]))
    on_page = 0
    if db.is_file():
        store = Store(db, read_batch(here / "samples.jsonl"), here / "samples.jsonl")
        try:
            labelled = export.rankings(store)
        finally:
            store.close()
        done += labelled
        on_page = len({row["provenance"]["batch_line"] for row in labelled})
        prompts |= {row["provenance"]["batch_line"] - 1 for row in labelled}
    needed = min(recipe.rounds.min_ranked or len(rows), len(rows))
    if len(prompts) < needed:
        if is_main():  # what `alignkit label RUN_DIR` opens: the round that waits, not the last one with samples
            files.write_json(here / STAMP, {**_stamp(here), "waiting": samples_fp})
        raise WaitingForRankings(
            f"round {n} waits for people to rank its answers: {len(prompts)} of {len(rows)} prompts are ranked "
            f"({on_page} on the labelling page), it needs {needed} (rounds.min_ranked). Open the page with "
            f"`alignkit label {here}` (or give each row of {path} its 'ranks', 1 = best, equal numbers for ties; or "
            f"let a program rank them: alignkit rank {path} --by MODULE:FUNCTION), then run the same command again: "
            "everything done so far is kept"
        )
    if is_main():
        files.write_jsonl(ranked, done)
        files.write_json(here / STAMP, {k: v for k, v in _stamp(here).items() if k != "waiting"})
    wait_for_everyone()
    log(
        f"round {n}",
        f"{len(prompts)} of {len(rows)} prompts ranked by people ({len(done)} rankings; {on_page} prompts on the "
        f"labelling page {db.name}, the rest in {path.name})",
    )
    return ranked, _ranked_fp(done)
