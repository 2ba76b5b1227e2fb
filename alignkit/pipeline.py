"""The pipeline: stage order, how outputs chain, fingerprints, skipping unchanged stages, resuming, the done marker.

Each stage writes {output_dir}/{stage}/. While it trains it works in {output_dir}/{stage}.partial/, so an old output
stays whole until the new one is complete, and an interrupted stage resumes from the checkpoints kept there. A stage
folder holds a manifest (alignkit_stage.json) whose fingerprint covers the stage's config, its data and its upstream
stages, and which lists the files of the output; a later run reuses the output while the fingerprint matches and the
files are there. In a run of many processes every process trains and only the main one writes (distributed.py).

Finishing a stage is ordered so that a kill at any instant leaves either the old complete output or a new one that
`recover()` completes: the manifest is marked complete in {stage}.partial, the old output is renamed aside to
{stage}.old, the new one renamed into place, then {stage}.old and the checkpoints are deleted.

A recipe with rounds writes round N >= 2 in {output_dir}/round-N/, whose reward/ and ppo/ are stage folders of the
same layout; round 1 is the stages themselves.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import shlex
import shutil
import time
from pathlib import Path

import yaml

from . import data, files
from .distributed import fresh_accelerator_state, is_main, wait_for_everyone, world_size
from .errors import DiskFull, UserError, is_disk_full, unsafe_file
from .log import keep, log
from .recipe import Recipe, plain
from .schema import is_template_file
from .stages import NAMES, REGISTRY, ROUND_STAGES
from .stages.spec import stage_datasets

MANIFEST = "alignkit_stage.json"
# trainer keys that change how a stage logs and how often it saves a checkpoint, never its weights: an output trained
# with other values of them is the same training (reused, and resumed when interrupted), though they stay in the
# fingerprint as written (taking them out would change every existing output's)
QUIET_KEYS = (
    "logging_steps",
    "logging_first_step",
    "logging_strategy",
    "save_steps",
    "save_strategy",
    "save_total_limit",
    "report_to",
    "run_name",
    "disable_tqdm",
)


def upstream(recipe: Recipe, stage: str) -> dict[str, str | None]:
    """The stages whose outputs `stage` consumes, by role: "model" (the latest of the stages it starts from that the
    recipe has; None: the base model) and, for a stage that reads a reward model and is given none, "reward_model"
    (the latest earlier stage that writes one)."""
    given = getattr(recipe.stages[stage], "reward_model", None) is not None
    return upstream_in(list(recipe.stages), stage, given)


def upstream_in(names: list[str], stage: str, reward_model_given: bool) -> dict[str, str | None]:
    """upstream() for a recipe whose stages are `names` (a recipe.yaml read as data, too)."""
    declared = REGISTRY[stage]
    earlier = [s for s in declared.model_from if s in names]
    roles = {"model": earlier[-1] if earlier else None}
    if declared.reward_model and not reward_model_given:
        makers = [s for s in names[: names.index(stage)] if REGISTRY[s].writes == "reward_model"]
        roles["reward_model"] = makers[-1] if makers else None
    return roles


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def output_files(folder: Path) -> dict[str, int]:
    """The files of a stage's output and their sizes (checkpoints and the manifest aside)."""
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and p.relative_to(folder).parts[0] != "checkpoints"
    }


def missing_files(folder: Path, manifest: dict) -> list[str]:
    """The files a complete manifest lists that are gone or of another size (an output damaged after it was
    written). A manifest from before files were listed needs at least the model's config.json."""
    listed = manifest.get("files", {"config.json": None})
    return [
        name
        for name, size in listed.items()
        if not (folder / name).is_file() or (size is not None and (folder / name).stat().st_size != size)
    ]


def identity(manifest: dict | None) -> str | None:
    """What the stages after a stage record of it: its output's identity. The fingerprint of its inputs, except for
    an output trained again on the same inputs (--force, or a damaged one): then a new one, so that what was built
    on the old output is not taken as built on this one."""
    return (manifest or {}).get("identity") or (manifest or {}).get("fingerprint")


def stale(run_dir: Path, folder: Path, _seen: dict | None = None) -> str | None:
    """Why the complete output in `folder` no longer follows from the run's outputs it was built on (one of them was
    trained again since, or is itself stale), else None: the report leaves such an output out."""
    seen = {} if _seen is None else _seen
    key = str(folder)
    if key not in seen:
        seen[key] = None  # (no output is built on itself; a cycle ends here)
        recorded = ((read_complete(folder) or {}).get("parts") or {}).get("upstream") or {}
        for up, was in recorded.items():
            there = Path(run_dir) / up
            if was is None or not there.is_dir():
                continue
            if identity(read_complete(there)) != was:
                seen[key] = f"built on {up}, which was trained again since"
            elif stale(run_dir, there, seen):
                seen[key] = f"built on {up}, which is itself out of date"
            if seen[key]:
                break
    return seen[key]


def read_complete(folder: Path) -> dict | None:
    """The manifest of a complete stage output whose files are all there, else None."""
    manifest = read_manifest(folder)
    if not manifest or manifest.get("status") != "complete" or missing_files(folder, manifest):
        return None
    return manifest


def complete_stages(run_dir: Path) -> list[str]:
    """The stages of a run folder whose output is complete, in pipeline order."""
    return [s for s in NAMES if read_complete(Path(run_dir) / s)]


ROUND_POLICY = next(s for s in ROUND_STAGES if REGISTRY[s].policy)  # a later round's policy, what it is judged by
BEST_OF_K = "best-of-k"  # rejection sampling: round-N/best-of-k.jsonl, the answers, and round-N/best-of-k/, the model


def round_folder(run_dir: Path, n: int) -> Path:
    """Where round n of a run writes: round 1 is the stages, in the run folder itself; round N >= 2 in round-N/."""
    return Path(run_dir) if n == 1 else Path(run_dir) / f"round-{n}"


def stage_folder(run_dir: Path, stage: str, n: int = 1) -> Path:
    """Where round n finds a stage's output: its own folder for a stage the round retrains (ROUND_STAGES), the run
    folder for the others (pretrain and sft: every round builds on them)."""
    return (round_folder(run_dir, n) if stage in ROUND_STAGES else Path(run_dir)) / stage


def later_rounds(run_dir: Path) -> list[int]:
    """The rounds N >= 2 of a run folder whose policy is complete (round-N/ppo), in order."""
    found = []
    for folder in Path(run_dir).glob("round-*"):
        n = folder.name.removeprefix("round-")
        if n.isdigit() and int(n) >= 2 and read_complete(folder / ROUND_POLICY):
            found.append(int(n))
    return sorted(found)


def identities(run_dir: Path, folders: list[Path]) -> dict[str, str]:
    """The complete outputs among `folders` (of the run folder) by their path in it, with their identities: what a
    report records of the outputs it evaluated, to tell later whether they are still the run's."""
    run_dir = Path(run_dir).resolve()
    found = {}
    for folder in folders:
        try:
            inside = Path(folder).resolve().relative_to(run_dir).as_posix()
        except ValueError:
            continue  # a model from elsewhere (the Hub's, a path)
        if manifest := read_complete(Path(folder)):
            found[inside] = identity(manifest)
    return found


def stages_in_round(n: int) -> tuple[str, ...]:
    """The stages round n holds: every one in round 1; in a later round those it retrains (ROUND_STAGES) and the
    earlier ones it builds on (pretrain, sft), not a stage after them (dpo)."""
    return NAMES if n == 1 else NAMES[: max(map(NAMES.index, ROUND_STAGES)) + 1]


def pick_round(run_dir: Path, asked: int | None, stages: list[str]) -> int:
    """The round of a run folder that `chat` and `push` read: `asked` (--round), else the last complete round that
    holds every stage in `stages` (1 when the run has no later round). A round that is not there or not complete, or
    that does not hold a stage asked, is refused, naming the rounds there are."""
    later = later_rounds(run_dir)
    if asked is None:
        fits = [n for n in later if all(s in stages_in_round(n) for s in stages)]
        return fits[-1] if fits else 1
    if asked != 1 and asked not in later:
        why = (
            f"did not finish (no complete {ROUND_POLICY} in {round_folder(run_dir, asked)})"
            if asked > 1 and round_folder(run_dir, asked).is_dir()
            else "is not in this run"
        )
        raise UserError(
            f"{run_dir}: round {asked} {why}; rounds here: {', '.join(map(str, [1, *later]))} (round 1 is the "
            "stages; --round picks one, default the last)"
        )
    outside = [s for s in stages if s not in stages_in_round(asked)]
    if outside:
        raise UserError(
            f"round {asked} has no {' or '.join(outside)}: a later round retrains {' and '.join(ROUND_STAGES)} on "
            f"{', '.join(s for s in stages_in_round(asked) if s not in ROUND_STAGES)}; ask round 1 for it (--round 1)"
        )
    return asked


def recover(folder: Path) -> None:
    """Finish what a kill interrupted while a stage was being put in place (main process only): a complete
    {stage}.partial is moved in, {stage}.old is restored or removed, leftover checkpoints are removed."""
    partial, old = folder.with_name(folder.name + ".partial"), folder.with_name(folder.name + ".old")
    if read_complete(partial):
        log(folder.name, f"finishing the move of {partial} into place (the last run stopped while doing it)")
        _swap(partial, folder)
    if old.exists():
        if folder.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, folder)
    if (folder / "checkpoints").exists() and read_complete(folder):
        shutil.rmtree(folder / "checkpoints")


def interrupted(run_dir: Path) -> list[str]:
    """The stages of a run folder that a kill left between the two renames that put an output in place."""
    run_dir = Path(run_dir)
    return [s for s in NAMES if read_complete(run_dir / f"{s}.partial") or (run_dir / f"{s}.old").exists()]


def finish_moves(run_dir: Path, command: str) -> None:
    """What `eval`, `chat` and `push` do before they read a run folder: finish the moves a kill interrupted (under the
    folder's lock, so never under a running `alignkit run`), or say that `alignkit run` finishes them."""
    from . import lock

    stages = interrupted(run_dir)
    if not stages:
        return
    try:
        with lock.exclusive(run_dir, command):
            for stage in stages:
                recover(Path(run_dir) / stage)
    except PermissionError:
        log(
            "",
            f"{run_dir}: {', '.join(stages)} stopped while being put in place and this user cannot finish it; "
            "`alignkit run` with the same recipe does",
        )


def _swap(partial: Path, folder: Path) -> None:
    """Put a complete {stage}.partial in place of {stage}: the old output is renamed aside first, never deleted
    before the new one is in place."""
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(folder, old)
    os.replace(partial, folder)
    if old.exists():
        shutil.rmtree(old)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # only needed to resume the run that wrote them


def digest(obj) -> str:
    """A short hash of plain data (fingerprints)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def local_files_hash(path: str | None, recipe: Recipe) -> str | None:
    """What a local model, tokenizer or template folder holds: contents of small files, size and time of large ones."""
    if path is None:
        return None
    root = recipe.resolve(path)
    if not root.exists():
        return None  # a Hub id: its name (in the config) stands for it
    h = hashlib.sha256()
    for f in sorted(p for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(root) if f != root else f.name}:{st.st_size}".encode())
        h.update(f.read_bytes() if st.st_size < 50_000_000 else str(st.st_mtime_ns).encode())
    return h.hexdigest()[:16]


def fingerprint_parts(recipe: Recipe, stage: str, upstream_fps: dict) -> dict:
    own, *more = [data.fingerprint(d, recipe) for _, d, _ in stage_datasets(REGISTRY[stage], recipe)]
    return {
        "config": config_part(recipe, stage),
        "data": [own, *more] if more else own,  # a stage that reads only its own dataset: that one's hash
        "upstream": upstream_fps,
    }


def config_part(recipe: Recipe, stage: str) -> str:
    """The fingerprint's part for a stage's settings: its section, the model and its local files, adapters, seed."""
    spec = _in_run(plain(recipe.stages[stage]), recipe)
    m = recipe.model
    template_file = m.chat_template if is_template_file(m.chat_template) else None
    files = [local_files_hash(p, recipe) for p in (m.name_or_path, m.tokenizer, template_file)]
    lora, quantization = recipe.adapters(stage)
    if REGISTRY[stage].from_scratch and m.config is not None:
        lora = quantization = None  # a stage that builds the model trains every weight, unquantized
    model_settings = {
        "model": plain(m),
        "files": files,
        "lora": lora,
        "quantization": quantization,
        "seed": recipe.seed,
    }
    # a reward model named by path (stages.ppo.reward_model) is known by what its folder holds, not its name
    given = getattr(recipe.stages[stage], "reward_model", None)
    if given is not None:
        model_settings["reward_model_files"] = local_files_hash(given, recipe)
    return digest([spec, model_settings])


def _in_run(spec: dict, recipe: Recipe) -> dict:
    """A dataset the run wrote itself (a later round's prompts) named by its place in the run's folder: a run moved or
    copied elsewhere is still up to date (the data part holds its contents)."""
    dataset = spec.get("dataset")
    if not isinstance(dataset, dict) or not isinstance(dataset.get("path"), str):
        return spec
    try:
        inside = Path(dataset["path"]).resolve().relative_to(Path(recipe.output_dir).resolve())
    except ValueError:
        return spec
    return {**spec, "dataset": {**dataset, "path": f"{{output_dir}}/{inside.as_posix()}"}}


def _why(old: dict | None, new: dict, folder: Path) -> str:
    if not old:
        return "no earlier output"
    if old.get("status") != "complete":
        return "the earlier run did not finish"
    gone = missing_files(folder, old)
    if gone:
        return f"its output is damaged: {', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''} missing or cut"
    names = {"config": "its config", "data": "its data", "upstream": "an upstream stage", "rankings": "its rankings"}
    changed = [names[k] for k in names if old.get("parts", {}).get(k) != new.get(k)]
    return (" and ".join(changed) + " changed") if changed else "forced"


def check_data(recipe: Recipe, stages, local_only: bool = False) -> list[str]:
    """Load every selected stage's dataset (and the eval data) before anything trains; report all problems at once.
    With `local_only`, Hub datasets are left unread (nothing is downloaded); returns the keys left unread."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    problems = []
    specs = []
    for stage in stages:
        own, *more = stage_datasets(REGISTRY[stage], recipe)
        specs += [(own[0], own[1], stage, own[2])] + [(key, spec, key, kind) for key, spec, kind in more]
    if recipe.eval is not None:
        specs.append(("eval.dataset", recipe.eval.dataset, "eval.dataset", "eval"))
        if recipe.eval.comparisons is not None:
            specs.append(("eval.comparisons", recipe.eval.comparisons, "eval.comparisons", "comparisons"))
    unread, seen = [], set()
    for key, spec, reader, kind in specs:
        if key in seen:  # read for two stages (the sft stage's data normalises the reward model): checked once
            continue
        seen.add(key)
        if local_only and not recipe.resolve(spec.path).is_file():
            unread.append(f"{key} ({spec.path})")
            continue
        try:
            data.load(spec, reader, recipe, kind)
        except UserError as e:
            problems.append(f"  {key}: {e}")
    if bars:
        datasets.enable_progress_bars()
    if problems:
        raise UserError(f"{recipe.source}: the data has {len(problems)} problem(s):\n" + "\n".join(problems))
    return unread


def select(recipe: Recipe, only: str | None = None, start: str | None = None) -> list[str]:
    """The stages `--only` / `--from` choose; raises UserError when one that they need, and do not choose, has no
    complete output."""
    names = list(recipe.stages)
    for flag, stage in (("--only", only), ("--from", start)):
        if stage is not None and stage not in names:
            raise UserError(
                f"{flag} {stage}: the recipe {recipe.source} has no {stage} stage; its stages are {', '.join(names)}"
            )
    selected = [only] if only else names[names.index(start) :] if start else names
    out = Path(recipe.output_dir)

    def missing(stage: str) -> list[str]:  # the stages `stage` needs that have no complete output, nearest first
        ups = [up for up in upstream(recipe, stage).values() if up and not read_complete(out / up)]
        return ups + [m for up in ups for m in missing(up)]

    for stage in selected:
        for up in upstream(recipe, stage).values():
            if up is not None and up not in selected and not read_complete(out / up):
                first = min([up, *missing(up)], key=names.index)
                command = shlex.join(
                    [
                        "alignkit",
                        "run",
                        str(recipe.source),
                        *recipe.overrides,
                        *(["--only", up] if first == up else ["--from", first]),
                    ]
                )
                raise UserError(
                    f"{stage} needs the {up} stage's output, but {out / up} is missing or incomplete; "
                    f"run it first: {command}"
                )
    return selected


def run(
    recipe: Recipe,
    only: str | None = None,
    start: str | None = None,
    force: bool = False,
    accept_upstream: bool = False,
) -> dict:
    """Run the recipe's stages in order; returns {stage: {"status": "trained" | "reused", "seconds": float}}.

    A stage that `--only`/`--from` leave out and a chosen one builds on is checked against the recipe: trained with
    other settings or data, it is refused (naming them) unless `accept_upstream`."""
    names = list(recipe.stages)
    out = Path(recipe.output_dir)
    if is_main():
        for stage in names:
            recover(out / stage)
    wait_for_everyone()
    selected = select(recipe, only, start)
    check_data(recipe, selected)

    fingerprints: dict[str, str | None] = {}
    summary = {}
    needed = _built_on(recipe, selected)
    for stage in names:
        folder = out / stage
        complete = read_complete(folder)
        if stage not in selected:
            fingerprints[stage] = identity(complete)
            if complete and stage in needed:
                _check_reused(recipe, stage, folder, complete, fingerprints, accept_upstream)
            continue
        roles = upstream(recipe, stage)  # select() made sure that each is chosen or complete
        parts = fingerprint_parts(recipe, stage, {up: fingerprints[up] for up in roles.values() if up})
        fingerprints[stage], summary[stage] = build(recipe, stage, folder, roles, parts, force)
    return summary


def build(
    recipe: Recipe, stage: str, folder: Path, roles: dict, parts: dict, force: bool, run_dir: Path | None = None
) -> tuple[str, dict]:
    """Reuse `folder` if it holds `stage` trained with these `parts`, else train it (resuming an interrupted run of the
    same parts). `roles` name the inputs as folders relative to `run_dir` (default: the folder's parent). Returns the
    identity downstream stages record of it (see identity()) and the summary entry."""
    fp = digest(parts)
    complete, manifest = read_complete(folder), read_manifest(folder)
    partial = folder.with_name(folder.name + ".partial")
    started = read_manifest(partial) or {}
    # trained (or begun) with other values of keys that change no weights, or local paths spelled otherwise: the same
    resumable = bool(started) and started.get("fingerprint") in (fp, _as_trained(recipe, stage, partial, parts, fp))
    equivalent = manifest is not None and manifest.get("fingerprint") in (
        fp,
        _as_trained(recipe, stage, folder, parts, fp),
    )
    same = complete is not None and equivalent  # (a complete output's manifest is `manifest`)
    if same and not force and not resumable:
        quiet = complete["fingerprint"] != fp and changed_settings(folder / "recipe.yaml", recipe, stage)
        why = (
            f"only {'; '.join(quiet)} differ, which change no weights"
            if quiet
            else "config, data and upstream unchanged"
        )
        log(stage, f"up to date, reusing {folder} ({why}; --force reruns it)")
        return identity(complete), {"status": "reused", "seconds": complete.get("seconds", 0.0)}
    why = "an interrupted rerun" if resumable and not force else _why(complete or manifest, parts, folder)
    # --force on the inputs the output there had: a new identity, derived from the old one so that every process
    # computes the same (a damaged output trained again on the same inputs keeps its identity: it is the same
    # training, and the stages after it stay up to date); an interrupted forced run resumed keeps the one it began with
    if resumable and not force:
        new = started.get("identity") or started["fingerprint"]
    elif force and equivalent:
        new = digest({"retrained": identity(manifest)})
    elif equivalent:  # a damaged output: the same training again
        new = identity(manifest)
    else:
        new = fp
    return new, _train(recipe, stage, folder, roles, fp, parts, why, force, run_dir or folder.parent, new, resumable)


def _as_trained(recipe: Recipe, stage: str, folder: Path, parts: dict, fp: str) -> str | None:
    """The fingerprint of `parts` with the recipe spelled as the one the output in `folder` was trained with (its
    recipe.yaml): the same local files under other names, the same values of the keys that change no weights. None
    where `folder` holds none, or one of these very parts (fingerprint `fp`)."""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("fingerprint") == fp:
        return None
    return digest({**parts, "config": config_part(_spelled_as(recipe, folder / "recipe.yaml", stage), stage)})


def _built_on(recipe: Recipe, selected: list[str]) -> set[str]:
    """The stages that the selected ones build on, directly or through others, and that are not selected."""
    found, todo = set(), list(selected)
    while todo:
        for up in upstream(recipe, todo.pop()).values():
            if up and up not in found and up not in selected:
                found.add(up)
                todo.append(up)
    return found


def _check_reused(recipe: Recipe, stage: str, folder: Path, manifest: dict, fingerprints: dict, accept: bool) -> None:
    ups = {up: fingerprints.get(up) for up in upstream(recipe, stage).values() if up}
    if "parts" not in manifest or any(fp is None for fp in ups.values()):
        return  # an output from before fingerprints had parts, or an upstream of unknown origin: nothing to compare
    now, before = fingerprint_parts(_spelled_as(recipe, folder / "recipe.yaml", stage), stage, ups), manifest["parts"]
    what = []
    if before.get("config") != now["config"]:
        what += changed_settings(folder / "recipe.yaml", recipe, stage) or ["its model or stage settings"]
    if before.get("data") != now["data"]:
        what.append(f"its data changed ({recipe.stages[stage].dataset.path})")
    redone = [up for up, fp in ups.items() if (before.get("upstream") or {}).get(up, fp) != fp]
    if redone:
        what.append(f"{' and '.join(redone)}, which it was built on, was trained again since")
    if not what:
        return
    shown = "; ".join(what[:6]) + (f"; and {len(what) - 6} more" if len(what) > 6 else "")
    message = f"{stage}: {folder} was trained with other settings than this recipe gives: {shown}"
    if accept:
        log(stage, f"warning: {message}; used as it is (--accept-upstream)")
        return
    command = shlex.join(["alignkit", "run", str(recipe.source), *recipe.overrides, "--from", stage])
    raise UserError(
        f"{message}. The stages you chose would build on it as if it matched. Retrain it ({command}), or use it as "
        "it is: add --accept-upstream"
    )


def _spelled_as(recipe: Recipe, saved_recipe: Path, stage: str) -> Recipe:
    """`recipe` with each local path that names the same file as the recipe a stage was trained with spelled as that
    one spelled it (data/tiny/tokenizer and /work/data/tiny/tokenizer are one folder; the files' contents are in the
    fingerprint apart)."""
    try:
        old = yaml.safe_load(Path(saved_recipe).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return recipe
    respelled = copy.copy(recipe)
    respelled.model = copy.copy(recipe.model)
    for key in ("name_or_path", "tokenizer", "chat_template"):
        before, now = (old.get("model") or {}).get(key), getattr(recipe.model, key)
        if isinstance(before, str) and isinstance(now, str) and before != now and _same_place(recipe, before, now):
            setattr(respelled.model, key, before)
    saved = (old.get("stages") or {}).get(stage) or {}
    before = (saved.get("dataset") or {}).get("path")
    spec = recipe.stages[stage]
    if isinstance(before, str) and before != spec.dataset.path and _same_place(recipe, before, spec.dataset.path):
        respelled.stages = {**recipe.stages, stage: copy.copy(spec)}
        respelled.stages[stage].dataset = copy.copy(spec.dataset)
        respelled.stages[stage].dataset.path = before
    trainer, was = spec.trainer, saved.get("trainer") if isinstance(saved.get("trainer"), dict) else {}
    quiet = {k: v for k, v in trainer.items() if k not in QUIET_KEYS} | {
        k: v for k, v in was.items() if k in QUIET_KEYS
    }
    if quiet != trainer:  # the keys that change no weights as the stage was trained with them
        if respelled.stages is recipe.stages:
            respelled.stages = {**recipe.stages, stage: copy.copy(spec)}
        respelled.stages[stage].trainer = quiet
    return respelled


def _same_place(recipe: Recipe, a: str, b: str) -> bool:
    try:
        return recipe.resolve(a).exists() and recipe.resolve(a).resolve() == recipe.resolve(b).resolve()
    except (OSError, ValueError):
        return False


def changed_settings(saved_recipe: Path, recipe: Recipe, stage: str) -> list[str]:
    """The keys (dotted, as the recipe spells them) that differ between the recipe a stage was trained with and this
    one, for what the stage's fingerprint covers: the model, the seed, the adapters and the stage's own section."""
    try:
        old = yaml.safe_load(Path(saved_recipe).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    new = recipe.to_dict()

    def relevant(d: dict) -> dict:
        kept = {k: v for k, v in d.items() if k not in ("stages", "output_dir", "eval", "hub")}
        kept["stages"] = {stage: (d.get("stages") or {}).get(stage)}
        return kept

    out = []

    def walk(a, b, key):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
        elif a != b:
            out.append(f"{key} {'(unset)' if a is None else a} -> {'(unset)' if b is None else b}")

    walk(relevant(old), relevant(new), "")
    return out


def last_checkpoint(folder: Path) -> tuple[str | None, list[Path]]:
    """The newest checkpoint in folder that was written to the end, and the newer ones that were not.

    The Trainer writes trainer_state.json last, so a checkpoint without a readable one was cut off mid-save (a kill,
    a full disk). One with a state but without its weights or optimizer state was cut off while being deleted (the
    Trainer removes old checkpoints as it goes). Neither can be resumed from."""
    if not folder.is_dir():
        return None, []
    step = {p: p.name.removeprefix("checkpoint-") for p in folder.glob("checkpoint-*") if p.is_dir()}
    steps = sorted((p for p, n in step.items() if n.isdigit()), key=lambda p: int(step[p]), reverse=True)
    broken = []
    for path in steps:
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            broken.append(path)
            continue
        if _has_weights(path):
            return str(path), broken
        broken.append(path)
    return None, broken


def _has_weights(checkpoint: Path) -> bool:
    """Whether a checkpoint holds weights and optimizer state: plain files, a safetensors index whose shards are all
    there, or DeepSpeed's / FSDP's folders."""
    if any(checkpoint.glob("global_step*")) or any(checkpoint.glob("pytorch_model_fsdp*")):
        return True
    if (checkpoint / "accelerator").is_dir():  # a trainer that saves its optimizer with accelerate (DeepSpeed)
        return any(checkpoint.glob("*.safetensors"))
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return False
        weights = all((checkpoint / s).is_file() for s in shards)
    else:
        weights = any(
            (checkpoint / name).is_file()
            for name in ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")
        )
    return weights and any((checkpoint / name).is_file() for name in ("optimizer.pt", "optimizer.bin"))


def _train(
    recipe: Recipe,
    stage: str,
    folder: Path,
    roles: dict,
    fp: str,
    parts: dict,
    why: str,
    force: bool,
    run_dir: Path,
    new_identity: str,
    resumable: bool,
) -> dict:
    partial = folder.with_name(folder.name + ".partial")
    started = read_manifest(partial)
    resume = None
    if started and resumable and not force:
        resume, broken = last_checkpoint(partial / "checkpoints")
        for path in broken:
            log(stage, f"ignoring {path}: the run was stopped while it was being written")
        was = started.get("processes", world_size())
        if resume is not None and was != world_size():  # its data was split `was` ways, its schedule counted so
            raise UserError(
                f"{stage}: {partial} was stopped while training in {was} processes, and this run has "
                f"{world_size()}; resuming would mix two batch sizes and skip the wrong data. Resume it with "
                f"--num-processes {was}, or train it from the start with --force"
            )
    wait_for_everyone()  # every process has decided before the main one changes the folder
    if is_main():
        if resume is not None:
            for path in broken:
                shutil.rmtree(path)  # the trainer writes these steps again
        if resume is None and partial.exists():
            shutil.rmtree(partial)  # an interrupted run of other inputs: nothing in it can be reused
        partial.mkdir(parents=True, exist_ok=True)
        running = {"stage": stage, "status": "running", "fingerprint": fp, "parts": parts}
        files.write_json(partial / MANIFEST, {**running, "identity": new_identity, "processes": world_size()})
        files.write_text(partial / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    wait_for_everyone()

    declared = REGISTRY[stage]
    inputs = {role: str(run_dir / up) if up else None for role, up in roles.items()}
    given = getattr(recipe.stages[stage], "reward_model", None)
    if declared.reward_model and given:
        inputs["reward_model"] = given
    if inputs.get("model") is None and not declared.from_scratch:
        inputs["model"] = recipe.model.name_or_path  # model.config without a stage that trains from scratch: refused
    source = ", ".join(f"{role} from {path}" for role, path in inputs.items() if path)
    base = "an untrained model built from model.config" if declared.from_scratch and recipe.model.config else ""
    log(stage, f"{'resuming from ' + resume if resume else 'training'} ({why}); {source or base or 'base model'}")
    built = recipe.configs[stage]
    for line in built.applied:  # alignkit's departures from TRL's defaults, each where it is used
        log(stage, line)
    args = copy.deepcopy(built.args)  # the recipe's stays as loaded
    args.output_dir = str(partial / "checkpoints")

    # Seed before any model loads: weights a stage creates (a reward model's score head, rows for an added pad
    # token) come from torch's global generator, which each process otherwise seeds at random.
    from transformers import set_seed

    set_seed(args.seed)
    fresh_accelerator_state()  # this stage's precision and plugins, not the last one's
    t0 = time.time()
    try:
        metrics = declared.run(recipe, partial, inputs, resume, args)
        seconds = time.time() - t0
        wait_for_everyone()  # the model is saved before the stage is declared complete
        _finish(stage, partial, folder, fp, new_identity, parts, inputs, metrics, seconds)
    except pickle.UnpicklingError as e:  # torch refused a file as unsafe: name it, load nothing more
        raise unsafe_file(stage, [resume, *(p for p in inputs.values() if p)]) from e
    except Exception as e:
        if type(e).__name__ != "NoMatchingPeftModuleError":  # peft's, for a model validate could not build
            full = is_disk_full(e)
            if full is None:
                raise
            raise DiskFull(_disk_full(stage, folder, full)) from e
        lora, _ = recipe.adapters(stage)
        raise UserError(
            f"{stage}: the LoRA target_modules {lora.get('target_modules')} match no module of this model "
            f"({str(e).splitlines()[0]}); name its layers, e.g. GPT-2's c_attn, c_proj, c_fc"
        ) from e
    wait_for_everyone()  # the next stage reads this one's output
    from .guard import at_step, logged_at

    at = logged_at(declared, metrics.get("log_history", []))  # figures older than the last step say so
    figures = "".join(f", {keep(f'{k} {v:.4g}{at_step(at.get(k))}')}" for k, v in metrics.get("figures", {}).items())
    log(stage, f"done in {seconds:.1f}s{figures} -> {folder}")
    return {"status": "trained", "seconds": seconds}


def _finish(
    stage, partial: Path, folder: Path, fp: str, new_identity: str, parts: dict, inputs: dict, metrics: dict, seconds
):
    """Mark the stage complete and put it in place (main process)."""
    if is_main():
        metrics["seconds"] = seconds
        metrics["processes"] = world_size()
        files.write_json(partial / "metrics.json", metrics)
        # complete from here on: a kill after this line leaves a partial folder that recover() moves into place
        files.write_json(
            partial / MANIFEST,
            {
                "stage": stage,
                "status": "complete",
                "fingerprint": fp,
                **({"identity": new_identity} if new_identity != fp else {}),
                "parts": parts,
                "inputs": inputs,
                "seconds": seconds,
                "processes": world_size(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "files": output_files(partial),
            },
        )
        _swap(partial, folder)


def _disk_full(stage: str, folder: Path, error: OSError) -> str:
    """What a full disk stopped, what is kept, and what to do. Checkpoints the full disk cut off are removed (the
    stage writes them again), which also gives some space back."""
    out, partial = folder.parent, folder.with_name(folder.name + ".partial")
    kept, broken = last_checkpoint(partial / "checkpoints")
    if is_main():
        for path in broken:
            shutil.rmtree(path, ignore_errors=True)
        for tmp in partial.glob(".*.tmp") if partial.exists() else []:
            tmp.unlink(missing_ok=True)
    finished = complete_stages(out)
    try:
        free = shutil.disk_usage(out).free / 2**30
    except OSError:
        free = None
    return (
        f"{stage}: the disk is full ({error.filename or out}: {error.strerror or error}). Kept: "
        + (f"the finished stages ({', '.join(finished)}) and " if finished else "")
        + (
            f"{stage}'s last whole checkpoint, {kept}, where it resumes"
            if kept
            else f"nothing of {stage} yet (it starts again)"
        )
        + ". Free space on that disk"
        + (f" ({free:.1f} GiB free now)" if free is not None else "")
        + " and run the same command again"
    )
