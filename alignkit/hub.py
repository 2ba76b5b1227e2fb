"""Push a run's stages to the Hugging Face Hub: weights, tokenizer with its chat template, and a model card that
records the whole lineage (base model, datasets, every stage's key settings, the round) and the run's evaluation.
In a run with rounds a push reads one round (pipeline.pick_round(): the last unless asked): its own reward and ppo,
and the stages before them that every round builds on.

The token comes from HF_TOKEN or the user's `hf auth login`, through huggingface_hub; alignkit never prints it or
writes it anywhere. Only two calls touch the network: HfApi.create_repo and HfApi.upload_folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from .errors import UserError
from .pipeline import (
    BEST_OF_K,
    complete_stages,
    finish_moves,
    identities,
    pick_round,
    read_complete,
    read_manifest,
    stage_folder,
    stages_in_round,
    upstream_in,
)
from .preflight import is_hub_id, is_repo_id
from .report import KL_NOTE, eval_table, fmt, rounds_lines, shows_kl, verdict_lines, win_rate_lines
from .stages import NAMES, POLICIES, REGISTRY, ROUND_STAGES

SKIP = {"adapter", "checkpoints", "alignkit_stage.json", "training_args.bin"}  # kept local: paths of this machine
KEY_SETTINGS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "total_episodes",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "packing",
    "assistant_only_loss",
    "kl_coef",
    "response_length",
    "temperature",
    "num_ppo_epochs",
    "cliprange",
    "vf_coef",
    "missing_eos_penalty",
    "kl_target",
    "ptx_coef",
    "beta",
    "loss_type",
    "bf16",
    "gradient_checkpointing",
)
SHORTENED = (
    "# alignkit push shortened the training machine's local paths: relative to the run's parent folder "
    "where they lay under it, else to their last component\n"
)


def push_run(
    run_dir: Path,
    repo_id: str | None,
    stages: list[str] | None,
    private: bool | None,
    adapter: bool,
    round: int | None = None,
) -> list[str]:
    """`alignkit push`: what the command line leaves out comes from the run recipe's hub section."""
    finish_moves(run_dir, f"alignkit push {run_dir}")  # a stage a kill left between its two renames
    done = complete_stages(run_dir)
    if not done:
        raise UserError(
            f"{run_dir}: no finished stage here (no {'/'.join(NAMES)} folder with a complete manifest); "
            "give the output_dir of a run"
        )
    hub = _recipe(run_dir, done[-1]).get("hub") or {}
    repo_id = repo_id or hub.get("repo_id")
    if not repo_id:
        raise UserError("no repo id: pass --repo-id owner/name (or set hub.repo_id in the recipe)")
    return push(
        run_dir,
        repo_id,
        stages or hub.get("stages"),
        private if private is not None else hub.get("private"),
        adapter or hub.get("weights") == "adapter",
        round,
    )


def push(
    run_dir: Path,
    repo_id: str,
    stages: list[str] | None,
    private: bool | None,
    adapter: bool,
    round: int | None = None,
) -> list[str]:
    from huggingface_hub import HfApi, get_token

    if not is_repo_id(repo_id):
        raise UserError(f"repo id {repo_id!r}: expected owner/name (your user or organisation, then the repo)")
    n = pick_round(run_dir, round, stages or [])
    done = [s for s in stages_in_round(n) if read_complete(stage_folder(run_dir, s, n))]
    of_round = f" of round {n}" if n > 1 else ""
    if not stages:
        policies = [s for s in done if s in POLICIES]
        if not policies:
            raise UserError(f"{run_dir}: no finished policy stage ({', '.join(POLICIES)}){of_round} to push")
        stages = policies[-1:]
    missing = [s for s in stages if s not in done]
    if missing:
        raise UserError(
            f"{run_dir}: stage(s) {', '.join(missing)}{of_round} did not finish here (finished: "
            f"{', '.join(done) or 'none'}); run them first"
        )
    stages = sorted(set(stages), key=NAMES.index)
    targets = {s: repo_id if s == stages[-1] else f"{repo_id}-{s}" for s in stages}
    for stage in stages if adapter else []:  # every stage's refusal before any repo is made
        check_adapter(run_dir, stage, targets, n)
    token = get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN, or run `hf auth login`")
    api = HfApi(token=token)
    report, lines = _json(run_dir / "report.json"), []
    pushed = [stage_folder(run_dir, s, n).relative_to(run_dir).as_posix() for s in stages]
    if report and (older := outdated(run_dir, report, pushed)):
        lines.append(
            f"the model cards leave out {run_dir / 'report.json'}: it evaluated other outputs than the run holds now "
            f"({'; '.join(older)}); `alignkit eval` on the run's recipe writes a report of these, then push again "
            "for a card with it"
        )
        report = None
    for stage in stages:
        with tempfile.TemporaryDirectory(prefix="alignkit-push-") as tmp:
            staged = Path(tmp)
            base = stage_files(run_dir, stage, staged, adapter, targets, n)
            model_card(run_dir, stage, targets[stage], base, adapter, report, n).save(staged / "README.md")
            try:
                api.create_repo(targets[stage], private=private, exist_ok=True)
                api.upload_folder(
                    repo_id=targets[stage],
                    folder_path=str(staged),
                    commit_message=f"alignkit: the {stage} stage{of_round} of {run_dir.resolve().name}",
                )
            except Exception as e:  # network, permissions, a name taken: the run itself is untouched
                raise UserError(
                    f"pushing {stage} to {targets[stage]} failed: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}\n  the run is unchanged; push again with "
                    f"alignkit push {run_dir} --repo-id {repo_id}" + (f" --round {n}" if round is not None else "")
                ) from e
        lines.append(
            f"{stage:9s} pushed    https://huggingface.co/{targets[stage]}"
            + (f"  (round {n}: {stage_folder(run_dir, stage, n)})" if n > 1 else "")
        )
    return lines


def outdated(run_dir: Path, report: dict, pushed: list[str]) -> list[str]:
    """Why a report does not describe the outputs pushed (paths in the run folder): the outputs it evaluated that the
    run no longer holds as they were, and those pushed that it did not evaluate. None for a report from before reports
    recorded what they evaluated."""
    if "outputs" not in report:
        return []
    recorded = report["outputs"]
    now = identities(run_dir, [run_dir / path for path in {*recorded, *pushed}])
    return [f"{path} trained again since" for path, was in recorded.items() if now.get(path) != was] + [
        f"{path} not evaluated in it" for path in pushed if path not in recorded
    ]


def check_adapter(run_dir: Path, stage: str, targets: dict, n: int = 1) -> None:
    """Raise UserError where a stage of round n has no adapter the Hub could apply: none at all, one trained on a
    model no Hub repo holds (a later round's, on the last round's merged model), or one on a model of this run that
    is not pushed with it."""
    folder = stage_folder(run_dir, stage, n)
    if not (folder / "adapter").is_dir():
        raise UserError(
            f"{folder} has no LoRA adapter (this stage trained every weight); push merged weights "
            "(drop --adapter / hub.weights: adapter)"
        )
    up = _model_stage(run_dir, stage, n)
    started = Path(((read_manifest(folder) or {}).get("inputs") or {}).get("model") or "")
    if n > 1 and started.name != up:
        raise UserError(
            f"{stage} of round {n} trained its adapter on {started} (a model this run made in its rounds, merged), "
            "which no Hub repo holds: push merged weights (drop --adapter / hub.weights: adapter)"
        )
    if hub_base(run_dir, stage, targets, n) is None:
        raise UserError(
            f"{stage}'s adapter sits on a model trained in this run ({up}), which the Hub cannot "
            f"resolve: push {up} too (--stage {up} --stage {stage}), or push merged weights"
        )


def stage_files(run_dir: Path, stage: str, staged: Path, adapter: bool, targets: dict, n: int = 1) -> str | None:
    """Copy what the Hub repo holds of a stage of round n into `staged`; return the Hub id of the stage's base model
    (None if local)."""
    folder = stage_folder(run_dir, stage, n)
    base = hub_base(run_dir, stage, targets, n)
    if adapter:  # push checked it can be (check_adapter), every stage before the first upload
        shutil.copytree(folder / "adapter", staged, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*SKIP))
        config = json.loads((staged / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base  # a Hub id, not this machine's path
        (staged / "adapter_config.json").write_text(json.dumps(config, indent=2))
        if (folder / "metrics.json").exists():  # the stage's record, as a merged push carries it
            shutil.copy2(folder / "metrics.json", staged / "metrics.json")
    else:
        shutil.copytree(folder, staged, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*SKIP))
    # the run's own recipe.yaml keeps its paths; the Hub gets none of this machine's (an unreadable one is not sent)
    recipe = _recipe(run_dir, stage, n)
    (staged / "recipe.yaml").unlink(missing_ok=True)
    if recipe:
        shared = portable(recipe, run_dir)
        (staged / "recipe.yaml").write_text(
            (SHORTENED if shared != recipe else "") + yaml.safe_dump(shared, sort_keys=False)
        )
    return base


def local_path(value: str) -> bool:
    """Whether a recipe string is an absolute path of this machine (or one under a home folder, ~)."""
    return value.startswith("~") or os.path.isabs(value)


def shorten(value, run_dir: Path):
    """A local absolute path made relative to the run folder's parent when it lies under it, else its last component;
    anything else as it is."""
    if not isinstance(value, str) or not local_path(value):
        return value
    path = Path(os.path.expanduser(value)).resolve()
    try:
        return str(path.relative_to(run_dir.resolve().parent))
    except ValueError:
        return "~" if path == Path.home().resolve() else path.name or "."  # (a home folder's name is a user's)


def portable(obj, run_dir: Path):
    """A copy of a recipe (nested dicts and lists) with every local path shortened."""
    if isinstance(obj, dict):
        return {k: portable(v, run_dir) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v, run_dir) for v in obj]
    return shorten(obj, run_dir)


def lineage(run_dir: Path, stage: str, n: int = 1) -> list[str]:
    """`stage` (of round n) and every stage of the run whose output went into it (its model, its reward model,
    theirs ...), in pipeline order, as the stage's own recipe.yaml chains them."""
    stages = _recipe(run_dir, stage, n).get("stages") or {}
    found, todo = set(), [stage]
    while todo:
        current = todo.pop()
        if current in found or current not in stages:
            continue
        found.add(current)
        given = (stages[current] or {}).get("reward_model") is not None
        todo += [up for up in upstream_in(list(stages), current, given).values() if up]
    return [s for s in NAMES if s in found]


def _model_stage(run_dir: Path, stage: str, n: int = 1) -> str | None:
    """The stage of the run whose model `stage` started from (None: the recipe's base model)."""
    stages = _recipe(run_dir, stage, n).get("stages") or {}
    return upstream_in(list(stages), stage, True)["model"] if stage in stages else None


def hub_base(run_dir: Path, stage: str, targets: dict, n: int = 1) -> str | None:
    """The Hub id a stage started from: the recipe's Hub model, or an upstream stage pushed in the same go."""
    up = _model_stage(run_dir, stage, n)
    if up is not None:
        return targets.get(up)
    model = (_recipe(run_dir, stage, n).get("model") or {}).get("name_or_path")
    return model if model and is_hub_id(model) else None


def model_card(
    run_dir: Path, stage: str, repo_id: str, base: str | None, adapter: bool, report: dict | None, n: int = 1
):
    from huggingface_hub import ModelCard, ModelCardData

    recipe = _recipe(run_dir, stage, n)
    stages = [s for s in lineage(run_dir, stage, n) if s in (recipe.get("stages") or {})]
    hub_datasets = sorted(
        {
            spec["dataset"]["path"]
            for s, spec in recipe["stages"].items()
            if s in stages
            if is_hub_id(spec["dataset"]["path"])
        }
    )
    data = ModelCardData(
        base_model=base,
        datasets=hub_datasets or None,
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-classification" if REGISTRY[stage].writes == "reward_model" else "text-generation",
        tags=["alignkit", "trl", *dict.fromkeys(t for s in stages for t in REGISTRY[s].hub_tags)],
    )
    model = recipe.get("model") or {}
    start = (
        shorten(model.get("name_or_path"), run_dir)
        or f"an untrained {(model.get('config') or {}).get('model_type', 'model')} built from a config "
        f"({_inline(model.get('config'))})"
    )
    rows = []
    for s in stages:
        spec = recipe["stages"][s]
        manifest = read_manifest(stage_folder(run_dir, s, n)) or {}
        retrained = f" (round {n})" if n > 1 and s in ROUND_STAGES else ""
        tuned = Path(manifest.get("inputs", {}).get("model") or "")
        if n > 1 and tuned.name == BEST_OF_K and read_complete(tuned):  # rejection sampling: the policy's start
            by = read_manifest(tuned)
            label = f"{by['stage']} ({tuned.parent.name}: each prompt's best answer, rejection sampling)"
            rows.append(_row(run_dir, label, _recipe_in(tuned)["stages"][by["stage"]], by))
        rows.append(_row(run_dir, f"{s}{retrained}", spec, manifest))
    lines = [
        f"# {repo_id}",
        "",
        f"The **{stage}** stage{f' of round {n}' if n > 1 else ''} of an alignkit run ({' -> '.join(stages)}), "
        "trained with Hugging Face TRL.",
        "This repo holds "
        + ("a LoRA adapter over " + f"`{base}`" if adapter else "full weights")
        + ", the tokenizer and its chat template.",
        "",
        "## Lineage",
        "",
        f"- Base model: {start}",
        f"- Seed: {recipe.get('seed')}",
        *(
            [
                f"- Round: {n} of the run (round 1 is the stages; each later round ranks answers of the newest "
                f"policy, retrains {' and '.join(ROUND_STAGES)} on them, and continues from that policy)"
            ]
            if n > 1
            else []
        ),
        f"- LoRA: {_inline(recipe.get('lora')) if recipe.get('lora') else 'none (full fine-tuning)'}",
        f"- Quantization: {_inline(recipe.get('quantization')) if recipe.get('quantization') else 'none'}",
        "",
        "| stage | dataset | key settings | processes | time |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    if report and report.get("eval"):
        lines += [
            "## Evaluation (held-out prompts)",
            "",
            *eval_table(report["eval"]),
            "",
            f"- Reward model pairwise accuracy on held-out comparisons: {fmt(report.get('reward_accuracy'))}",
            *win_rate_lines(report),
            "",
            *([*verdict_lines(report), ""] if report.get("verdict") else []),
            *([KL_NOTE, ""] if shows_kl(report["eval"]) else []),
            *rounds_lines(report),
        ]
    load = (
        f"from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained('{repo_id}')"
        if adapter
        else f"from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained('{repo_id}')"
    )
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoTokenizer",
        load,
        f"tokenizer = AutoTokenizer.from_pretrained('{repo_id}')",
        "messages = [{'role': 'user', 'content': 'Hello!'}]",
        "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt', "
        "return_dict=True)",
        "print(tokenizer.decode(model.generate(**ids, max_new_tokens=64)[0]))",
        "```",
        "",
        "Or in a terminal: `alignkit chat " + repo_id + "`.",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _row(run_dir: Path, label: str, spec: dict, manifest: dict) -> str:
    """A stage's row of the card's lineage table: its dataset, key settings, processes and time."""
    settings = {k: v for k, v in (spec.get("trainer") or {}).items() if k in KEY_SETTINGS}
    return (
        f"| {label} | `{shorten(spec['dataset']['path'], run_dir)}` | {_inline(settings)} | "
        f"{manifest.get('processes', 1)} | {manifest.get('seconds', 0):.0f} s |"
    )


def _recipe(run_dir: Path, stage: str, n: int = 1) -> dict:
    """The recipe.yaml of a stage's output (of round n), as data; {} where there is none to read."""
    return _recipe_in(stage_folder(run_dir, stage, n))


def _recipe_in(folder: Path) -> dict:
    """The recipe.yaml of a stage output folder, as data; {} where there is none to read."""
    try:
        return yaml.safe_load((folder / "recipe.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _inline(obj) -> str:
    return yaml.safe_dump(obj, default_flow_style=True, width=10_000).strip() if obj else ""
