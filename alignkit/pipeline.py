"""The pipeline: stage order, how outputs chain, fingerprints, skipping unchanged stages, resuming, the done marker.

Each stage writes {output_dir}/{stage}/. While it trains it works in {output_dir}/{stage}.partial/, so an old output
stays whole until the new one is complete, and an interrupted stage resumes from the checkpoints kept there. A stage
folder holds a manifest (alignkit_stage.json) whose fingerprint covers the stage's config, its data and its upstream
stages, and which lists the files of the output; a later run reuses the output while the fingerprint matches and the
files are there. In a run of many processes every process trains and only the main one writes (distributed.py).

Finishing a stage is ordered so that a kill at any instant leaves either the old complete output or a new one that
`recover()` completes: the manifest is marked complete in {stage}.partial, the old output is renamed aside to
{stage}.old, the new one renamed into place, then {stage}.old and the checkpoints are deleted.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shlex
import shutil
import time
from pathlib import Path

import yaml

from . import data, files
from .distributed import is_main, wait_for_everyone, world_size
from .errors import UserError
from .log import keep, log
from .recipe import Recipe, plain
from .stages import NAMES, REGISTRY
from .stages.spec import stage_datasets

MANIFEST = "alignkit_stage.json"


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


def read_complete(folder: Path) -> dict | None:
    """The manifest of a complete stage output whose files are all there, else None."""
    manifest = read_manifest(folder)
    if not manifest or manifest.get("status") != "complete" or missing_files(folder, manifest):
        return None
    return manifest


def complete_stages(run_dir: Path) -> list[str]:
    """The stages of a run folder whose output is complete, in pipeline order."""
    return [s for s in NAMES if read_complete(Path(run_dir) / s)]


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


def _hash(obj) -> str:
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
    spec = plain(recipe.stages[stage])
    m = recipe.model
    template_file = m.chat_template if m.chat_template and "{" not in m.chat_template else None
    files = [local_files_hash(p, recipe) for p in (m.name_or_path, m.tokenizer, template_file)]
    lora, quantization = recipe.adapters(stage)
    model_settings = {
        "model": plain(m),
        "files": files,
        "lora": lora,
        "quantization": quantization,
        "seed": recipe.seed,
    }
    own, *more = [data.fingerprint(d, recipe) for _, d, _ in stage_datasets(REGISTRY[stage], recipe)]
    return {
        "config": _hash([spec, model_settings]),
        "data": [own, *more] if more else own,  # a stage that reads only its own dataset: that one's hash
        "upstream": upstream_fps,
    }


def _why(old: dict | None, new: dict, folder: Path) -> str:
    if not old:
        return "no earlier output"
    if old.get("status") != "complete":
        return "the earlier run did not finish"
    gone = missing_files(folder, old)
    if gone:
        return f"its output is damaged: {', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''} missing or cut"
    names = {"config": "its config", "data": "its data", "upstream": "an upstream stage"}
    changed = [names[k] for k in names if old.get("parts", {}).get(k) != new[k]]
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
        specs += [(own[0], own[1], stage, None)] + [(key, spec, key, kind) for key, spec, kind in more]
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


def run(recipe: Recipe, only: str | None = None, start: str | None = None, force: bool = False) -> dict:
    """Run the recipe's stages in order; returns {stage: {"status": "trained" | "reused", "seconds": float}}."""
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
    for stage in names:
        folder = out / stage
        manifest = read_manifest(folder)
        complete = read_complete(folder)
        if stage not in selected:
            fingerprints[stage] = complete["fingerprint"] if complete else None
            continue
        roles = upstream(recipe, stage)  # select() made sure that each is chosen or complete
        parts = fingerprint_parts(recipe, stage, {up: fingerprints[up] for up in roles.values() if up})
        fp = _hash(parts)
        fingerprints[stage] = fp
        if complete and complete["fingerprint"] == fp and not force:
            log(stage, f"up to date, reusing {folder} (config, data and upstream unchanged; --force reruns it)")
            summary[stage] = {"status": "reused", "seconds": complete.get("seconds", 0.0)}
            continue
        summary[stage] = _train(
            recipe, stage, folder, roles, fp, parts, _why(complete or manifest, parts, folder), force
        )
    return summary


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


def _train(recipe: Recipe, stage: str, folder: Path, roles: dict, fp: str, parts: dict, why: str, force: bool) -> dict:
    partial = folder.with_name(folder.name + ".partial")
    started = read_manifest(partial)
    resume = None
    if started and started.get("fingerprint") == fp and not force:
        resume, broken = last_checkpoint(partial / "checkpoints")
        for path in broken:
            log(stage, f"ignoring {path}: the run was stopped while it was being written")
    wait_for_everyone()  # every process has decided before the main one changes the folder
    if is_main():
        if resume is not None:
            for path in broken:
                shutil.rmtree(path)  # the trainer writes these steps again
        if resume is None and partial.exists():
            shutil.rmtree(partial)  # an interrupted run of other inputs: nothing in it can be reused
        partial.mkdir(parents=True, exist_ok=True)
        files.write_json(partial / MANIFEST, {"stage": stage, "status": "running", "fingerprint": fp, "parts": parts})
        files.write_text(partial / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    wait_for_everyone()

    out, declared = folder.parent, REGISTRY[stage]
    inputs = {role: str(out / up) if up else None for role, up in roles.items()}
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
    t0 = time.time()
    metrics = declared.run(recipe, partial, inputs, resume, args)
    seconds = time.time() - t0
    wait_for_everyone()  # the model is saved before the stage is declared complete
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
                "parts": parts,
                "inputs": inputs,
                "seconds": seconds,
                "processes": world_size(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "files": output_files(partial),
            },
        )
        _swap(partial, folder)
    wait_for_everyone()  # the next stage reads this one's output
    figures = "".join(f", {keep(f'{k} {v:.4g}')}" for k, v in metrics.get("figures", {}).items())
    log(stage, f"done in {seconds:.1f}s{figures} -> {folder}")
    return {"status": "trained", "seconds": seconds}
