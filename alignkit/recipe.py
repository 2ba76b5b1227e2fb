"""The recipe loader: one YAML file read with its line numbers, overrides applied, built against the schema
(alignkit/schema.py) and checked all at once, each stage's section by the stage's own declaration. Every problem is
named by file, line and key, with the fix."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import yaml

from . import lora_targets, preflight, typecheck
from .errors import Problem, RecipeError, utf8_error
from .schema import (  # noqa: F401  (the schema's names, as everything above the stages imports them from here)
    CONTEXT_KEYS,
    DATA_SUFFIXES,
    Dataset,
    Eval,
    Hub,
    Model,
    Recipe,
    RewardModelSettings,
    Rounds,
    StageSettings,
    is_template_file,
    plain,
    resolve_path,
)
from .stages import NAMES, ORDER, REGISTRY
from .stages.spec import build_config


def _example_stage() -> str:
    """A stage for examples in messages: the first that fine-tunes a pretrained model."""

    return next(s.name for s in ORDER if not s.from_scratch)


def stage_settings(name: str) -> type | None:
    """The schema of `stages.<name>`, as the stage declares it; None for a name that is not a stage."""

    return REGISTRY[name].settings if isinstance(name, str) and name in REGISTRY else None


def round_stages(recipe: Recipe) -> tuple[str | None, str | None]:
    """(the stage a later round continues, the reward stage it reads), as the stages declare them; None where the
    recipe lacks one."""

    names = list(recipe.stages or {})
    policy = next((s.name for s in ORDER if s.rounds and s.name in names), None)
    if policy is None:
        return None, None
    makers = [s.name for s in ORDER if s.writes == "reward_model" and s.name in names[: names.index(policy)]]
    return policy, (makers[-1] if makers else None)


def best_of_k_stage(recipe: Recipe) -> str | None:
    """The stage that fine-tunes a later round's policy on its best answers (rounds.rejection_sampling): the one the
    policy stage starts from, where it trains on demonstrations; None where there is none."""

    policy, _ = round_stages(recipe)
    if policy is None:
        return None
    earlier = [s for s in REGISTRY[policy].model_from if s in (recipe.stages or {})]
    return earlier[-1] if earlier and REGISTRY[earlier[-1]].data == "demonstrations" else None


def load_recipe(path: str | os.PathLike, overrides: list[str] = (), check_trainers: bool = True) -> Recipe:
    """Read, override and check a recipe; raise RecipeError listing every problem found."""
    path = Path(path)
    raw, lines, duplicates = _read_yaml(path)
    problems: list[Problem] = duplicates  # PyYAML keeps the last of two equal keys without a word
    overridden = set()
    for item in overrides:
        key = _apply_override(raw, item, problems)
        if key:
            overridden.add(key)
    recipe = typecheck.build(Recipe, raw, "", problems, typecheck.Keyed(stage_settings, _example_stage()))
    if recipe is not None:
        recipe.source, recipe.overrides = path, list(overrides)
        _check(recipe, problems, check_trainers)
    for p in problems:
        if p.where is None and any(
            p.key == k or p.key.startswith(k + ".") or (k.startswith(p.key + ".") and p.key not in lines)
            for k in overridden
        ):
            p.where = "command line"
        elif p.where is None:
            p.where = _nearest_line(lines, p.key)
    if problems:
        raise RecipeError(str(path), problems)
    return recipe


def _read_yaml(path: Path) -> tuple[dict, dict[str, int], list[Problem]]:
    """The recipe file as a mapping, the line of each dotted key, and the keys written twice."""
    try:
        data = path.read_bytes()
    except OSError as e:
        hint = (
            "; to set a recipe key, write KEY=VALUE (e.g. seed=1)" if not path.suffix and "/" not in str(path) else ""
        )
        raise RecipeError(str(path), [Problem("", f"cannot read the recipe: {e.strerror}{hint}")]) from e
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark, as some editors write, is harmless
    except UnicodeDecodeError as e:
        line, what = utf8_error(data, e)
        raise RecipeError(str(path), [Problem("", what, where=f"line {line}")]) from e
    duplicates: list[Problem] = []
    try:
        raw = yaml.safe_load(text)
        lines = _line_map(text, duplicates)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        what = (
            f"not valid YAML: {getattr(e, 'problem', e)}; fix the syntax there "
            "(indentation, a missing colon or closing bracket, quotes)"
        )
        raise RecipeError(str(path), [Problem("", what, where=f"line {mark.line + 1}" if mark else None)]) from e
    except RecursionError as e:  # PyYAML composes nested collections recursively
        what = "nested too deeply to read; a recipe is a few levels of mappings"
        raise RecipeError(str(path), [Problem("", what)]) from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        what = (
            "expected a mapping of keys (output_dir, model, stages, ...); write "
            "the recipe as `key: value` lines, as recipes/tiny.yaml does"
        )
        raise RecipeError(str(path), [Problem("", what)])
    return raw, lines, duplicates


def _apply_override(raw: dict, item: str, problems: list[Problem]) -> str | None:
    """Apply `a.b.c=value` (value read as YAML) or `~a.b.c` (remove the key) to the raw recipe."""
    remove = item.startswith("~") and "=" not in item
    key, sep, value = (item[1:], "", "") if remove else item.partition("=")
    if not (sep or remove) or not key or any(not part for part in key.split(".")):
        problems.append(
            Problem(
                "",
                f"override {item!r} is not KEY=VALUE or ~KEY with a dotted key, e.g. "
                "stages.ppo.trainer.learning_rate=1e-5",
                where="command line",
            )
        )
        return None
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            problems.append(
                Problem(
                    ".".join(parts[: i + 1]),
                    f"is {child!r}, not a mapping, so {key} cannot be set",
                    where="command line",
                )
            )
            return None
        node = child
    if remove:
        if parts[-1] not in node:
            problems.append(Problem(key, "cannot remove it: the recipe does not set it", where="command line"))
            return None
        del node[parts[-1]]
    else:
        node[parts[-1]] = parsed
    return key


def _check(recipe: Recipe, problems: list[Problem], check_trainers: bool) -> None:
    """Every check that needs no model loaded, as named rules. Values of the wrong type are already reported, so each
    rule looks only at values of the type it expects (a section given as a scalar arrives as None)."""
    context = _check_model(recipe, problems)
    _check_output_dir(recipe, problems)
    known = _check_stage_names(recipe, problems)
    for name in known:
        if recipe.stages[name] is not None:
            _check_stage(recipe, name, known, context, problems, check_trainers)
    _check_eval(recipe, context, problems)
    if recipe.hub is not None:
        _check_hub(recipe, known, problems)
    if isinstance(recipe.rounds, Rounds):
        _check_rounds(recipe, recipe.rounds, problems, check_trainers)
    if _check_adapter_blocks(recipe, known, problems, check_trainers):
        _check_quantized_stages(recipe, known, problems)
        if check_trainers:
            _check_lora_targets(recipe, known, problems)


def _base(recipe: Recipe) -> Path:
    return recipe.source.parent


def _check_model(recipe: Recipe, problems: list[Problem]) -> tuple[int, str] | None:
    """model: one of name_or_path and config, the files it names, its chat template and config. Returns the model's
    context length and where it comes from, where that is known without a download."""
    m, base = recipe.model, _base(recipe)
    if not isinstance(m, Model):
        return None
    if (m.name_or_path is None) == (m.config is None):
        problems.append(
            Problem(
                "model",
                "set exactly one of model.name_or_path (a pretrained model) and "
                "model.config (an untrained model built from a config)",
            )
        )
    if m.config is not None and m.tokenizer is None:
        problems.append(Problem("model.tokenizer", "required with model.config: a tokenizer folder or Hub id"))
    folder = "a model folder (with config.json)"
    preflight.check_local(m.name_or_path, "model.name_or_path", base, problems, folder=folder)
    preflight.check_local(m.tokenizer, "model.tokenizer", base, problems, folder="a tokenizer folder")
    if isinstance(m.chat_template, str):
        if is_template_file(m.chat_template):
            key, suffixes = "model.chat_template", (".jinja", ".j2")
            preflight.check_local(m.chat_template, key, base, problems, always_local=True, suffixes=suffixes)
        preflight.check_chat_template(m.chat_template, base, problems)
    if isinstance(m.config, dict):
        return preflight.check_model_config(m.config, problems)
    if isinstance(m.name_or_path, str) and (local := resolve_path(m.name_or_path, base)) and local.is_dir():
        return preflight.check_local_model(local, problems)
    return None


def _check_output_dir(recipe: Recipe, problems: list[Problem]) -> None:
    if not isinstance(recipe.output_dir, str):
        return
    out = Path(recipe.output_dir).expanduser()
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        problems.append(
            Problem(
                "output_dir",
                f"{blocker} is a file, but the run's folder {out} must be a folder "
                "(it is made if missing); choose another output_dir",
            )
        )


def _check_stage_names(recipe: Recipe, problems: list[Problem]) -> list[str]:
    """stages: known names, in the pipeline's order, starting where the model can. Returns the known ones."""
    names = list(recipe.stages)
    for name in names:
        if name not in REGISTRY:
            hint = difflib.get_close_matches(str(name), NAMES, n=1)
            problems.append(
                Problem(
                    f"stages.{name}",
                    "unknown stage; " + (f"did you mean {hint[0]}?" if hint else f"stages are {', '.join(NAMES)}"),
                )
            )
    known = [n for n in names if n in REGISTRY]
    if known != sorted(known, key=NAMES.index):
        problems.append(
            Problem("stages", f"stages run in the order {' -> '.join(NAMES)}; list them so (got {', '.join(known)})")
        )
    if not names:
        problems.append(Problem("stages", "no stages: name at least one of " + ", ".join(NAMES)))
    m = recipe.model
    if isinstance(m, Model) and m.config is not None and known and not REGISTRY[known[0]].from_scratch:
        first = next((s.name for s in ORDER if s.from_scratch), "a stage that trains from scratch")
        problems.append(
            Problem(
                "model.config",
                f"builds an untrained model, which only a {first} stage trains, but "
                f"this recipe starts with {known[0]}; add a {first} stage before it, "
                "or replace model.config with model.name_or_path (a pretrained model)",
            )
        )
    return known


def _check_stage(recipe: Recipe, name: str, known: list[str], context, problems: list[Problem], trainers: bool):
    """stages.NAME: its data files, its reward model, and its trainer block, built into the stage's config class
    (kept in recipe.configs)."""
    stage, declared, base, key = recipe.stages[name], REGISTRY[name], _base(recipe), f"stages.{name}"
    if stage.dataset is not None:
        preflight.check_local(stage.dataset.path, f"{key}.dataset.path", base, problems)
    if declared.more_data is not None:
        for more, spec, _ in declared.more_data(recipe, stage):
            if more.startswith(key) and isinstance(spec, Dataset):  # another stage's is checked there
                preflight.check_local(spec.path, f"{more}.path", base, problems)
    given = getattr(stage, "reward_model", None)
    if given is not None:
        folder = "a reward model folder (a reward stage's output)"
        preflight.check_local(given, f"{key}.reward_model", base, problems, folder=folder)
        local = resolve_path(given, base) if isinstance(given, str) else None
        if local is not None and local.is_dir() and not (local / "config.json").is_file():
            problems.append(
                Problem(
                    f"{key}.reward_model",
                    f"{given} holds no config.json, so it is not a model folder; give a reward stage's output folder",
                )
            )
    elif declared.reward_model and not any(REGISTRY[n].writes == "reward_model" for n in known[: known.index(name)]):
        makers = [s.name for s in ORDER if s.writes == "reward_model"]
        problems.append(
            Problem(
                f"{key}.reward_model",
                f"{name} needs a reward model: add a {' or '.join(makers)} "
                f"stage before it, or set {key}.reward_model to a trained one",
            )
        )
    if trainers and isinstance(stage.trainer, dict):
        built = build_config(declared, recipe, stage.trainer, context, problems)
        if built is not None:
            recipe.configs[name] = built
            stage.trainer = {**stage.trainer, **built.values}  # as checked: what the fingerprints read


def _check_eval(recipe: Recipe, context, problems: list[Problem]) -> None:
    if recipe.eval is None:
        return
    for key in ("dataset", "comparisons"):
        spec = getattr(recipe.eval, key)
        if spec is not None:
            preflight.check_local(spec.path, f"eval.{key}.path", _base(recipe), problems)
    if context and isinstance(recipe.eval.max_new_tokens, int) and recipe.eval.max_new_tokens >= context[0]:
        problems.append(
            Problem(
                "eval.max_new_tokens",
                f"{recipe.eval.max_new_tokens} tokens leave no room for a prompt in the model's context of "
                f"{context[0]} tokens ({context[1]}); set it below {context[0]}, with room for the prompts",
            )
        )


def _check_adapter_blocks(recipe: Recipe, known: list[str], problems: list[Problem], trainers: bool) -> bool:
    """The lora and quantization blocks, the recipe's and each stage's: mappings (or false), checked against peft's
    LoraConfig and transformers' BitsAndBytesConfig. False where one is `true`, which the later rules cannot read."""
    blocks = [("lora", recipe.lora), ("quantization", recipe.quantization)]
    blocks += [
        (f"stages.{n}.{k}", getattr(recipe.stages[n], k))
        for n in known
        if recipe.stages[n]
        for k in ("lora", "quantization")
    ]
    for key, value in blocks:
        if value is True:
            problems.append(Problem(key, "expected a mapping of settings, or false to turn it off for this stage"))
        elif isinstance(value, dict) and trainers:
            if key.endswith("lora"):
                from peft import LoraConfig

                reserved = {"task_type": "set by each stage"}
                typecheck.check_config_class(LoraConfig, value, key, problems, reserved, lora_targets.RANGES)
            else:
                preflight.check_quantization(value, problems, key)
    return not any(value is True for _, value in blocks)


def _trains_from_scratch(recipe: Recipe, name: str) -> bool:
    m = recipe.model
    return REGISTRY[name].from_scratch and isinstance(m, Model) and m.config is not None


def _check_quantized_stages(recipe: Recipe, known: list[str], problems: list[Problem]) -> None:
    """A stage that loads quantized weights trains LoRA adapters over them (QLoRA), in bf16."""
    for name in known:
        stage = recipe.stages[name]
        if stage is None or _trains_from_scratch(recipe, name):
            continue  # training from scratch trains every weight, unquantized
        lora, quantization = recipe.adapters(name)
        if not isinstance(quantization, dict):
            continue  # none, or of a wrong type that is reported already
        where = f"stages.{name}.quantization" if stage.quantization else "quantization"
        if lora is None:
            problems.append(
                Problem(
                    where,
                    f"the {name} stage would train quantized weights in full, which cannot be "
                    "done; give it LoRA settings to train adapters over them (QLoRA)",
                )
            )
        if isinstance(stage.trainer, dict) and stage.trainer.get("bf16") is False:
            problems.append(
                Problem(
                    f"stages.{name}.trainer.bf16",
                    "with quantization TRL casts the LoRA "
                    "adapters to bf16 (as QLoRA does), so training needs bf16 on; remove bf16: false",
                )
            )


def _check_lora_targets(recipe: Recipe, known: list[str], problems: list[Problem]) -> None:
    """Each LoRA block's target_modules against the module names of the model it adapts (built on the meta device
    from model.config or a local model's config.json; a Hub model is checked when it loads)."""
    base = _base(recipe)

    m = recipe.model
    blocks = []
    for name in known:
        stage = recipe.stages[name]
        if stage is None or (REGISTRY[name].from_scratch and isinstance(m, Model) and m.config is not None):
            continue
        lora, _ = recipe.adapters(name)
        if isinstance(lora, dict):
            blocks.append((f"stages.{name}.lora" if isinstance(stage.lora, dict) else "lora", lora))
    if not blocks or not isinstance(m, Model):
        return
    try:
        from transformers import AutoConfig

        if isinstance(m.config, dict) and isinstance(m.config.get("model_type"), str):
            settings = {k: v for k, v in m.config.items() if k != "model_type"}
            config = AutoConfig.for_model(m.config["model_type"], **settings)
        elif isinstance(m.name_or_path, str) and (local := resolve_path(m.name_or_path, base)) and local.is_dir():
            config = AutoConfig.from_pretrained(local)
        else:
            return
        layers = lora_targets.layer_names(config)
    except Exception:  # a config the checks above refuse already, or one only the real load can judge
        return
    seen = set()
    for key, lora in blocks:
        if key in seen:
            continue
        seen.add(key)
        lora_targets.check(lora.get("target_modules"), layers, config.model_type, f"{key}.target_modules", problems)


def round_overrides(rounds: Rounds) -> list[str]:
    """rounds.stages as the overrides that make a later round's recipe (values as JSON, which YAML reads)."""
    return [
        f"stages.{stage}.trainer.{key}={json.dumps(value)}"
        for stage, settings in sorted(rounds.stages.items())
        if isinstance(settings, dict)
        for key, value in settings.items()
    ]


def round_recipe(recipe: Recipe, more: list[str] = ()) -> Recipe:
    """The recipe rounds 2 and later train with: the stages' settings with rounds.stages and `more` overrides applied
    (and no rounds)."""
    return load_recipe(recipe.source, [*recipe.overrides, *round_overrides(recipe.rounds), *more, "~rounds"])


def _check_rounds(recipe: Recipe, rounds: Rounds, problems: list[Problem], check_trainers: bool) -> None:
    """A rounds section: what it needs of the stages, who ranks, and its trainer settings (its numbers are checked
    against their ranges as the section is built)."""
    retrained = _check_rounds_stages(recipe, problems)
    _check_rounds_ranking(recipe, rounds, problems)
    _check_rounds_trainers(recipe, rounds, retrained, problems, check_trainers)


def _check_rounds_stages(recipe: Recipe, problems: list[Problem]) -> list[str]:
    """A later round retrains a reward stage and the policy stage after it, in full (and, with rejection_sampling, the
    stage the policy starts from, on the round's best answers). Returns them."""

    policy, reward = round_stages(recipe)
    if policy is None or reward is None:
        wanted = [s.name for s in ORDER if s.rounds] + [s.name for s in ORDER if s.writes == "reward_model"]
        problems.append(
            Problem(
                "rounds",
                f"later rounds retrain a reward model and the policy trained against it ({' and '.join(wanted)}); "
                "the recipe lacks one of them: add it, or remove rounds",
            )
        )
    retrained = [name for name in (reward, policy) if name]
    if recipe.rounds.rejection_sampling is True:
        tuned = best_of_k_stage(recipe)
        if tuned is None:
            wanted = [
                s for s in (REGISTRY[policy].model_from if policy else ()) if REGISTRY[s].data == "demonstrations"
            ]
            problems.append(
                Problem(
                    "rounds.rejection_sampling",
                    f"fine-tunes each later round's policy on its best answers as the stage it starts from trains on "
                    f"demonstrations; {policy or 'the policy'} starts from no such stage here: add "
                    f"{' or '.join(wanted) or 'one'}, or remove rejection_sampling",
                )
            )
        else:
            retrained.append(tuned)
    if policy and getattr(recipe.stages[policy], "reward_model", None):
        problems.append(
            Problem(
                f"stages.{policy}.reward_model",
                f"with rounds, {policy} reads each round's own reward model, retrained on its rankings; remove "
                f"stages.{policy}.reward_model, or remove rounds",
            )
        )
    return retrained


def _check_rounds_ranking(recipe: Recipe, rounds: Rounds, problems: list[Problem]) -> None:
    """The prompts, and who ranks: a judge MODULE:FUNCTION that exists, or people (then min_ranked, guidelines)."""
    base = _base(recipe)
    if isinstance(rounds.prompts, Dataset):
        preflight.check_local(rounds.prompts.path, "rounds.prompts.path", base, problems)
    if isinstance(rounds.rank_by, str) and rounds.rank_by != "people":
        module, _, function = rounds.rank_by.rpartition(":")
        if not module or not function.isidentifier():
            problems.append(
                Problem(
                    "rounds.rank_by",
                    f"{rounds.rank_by!r}: give 'people', or a judge as MODULE:FUNCTION, a Python file or module and "
                    "the function in it that ranks, e.g. data/chat/judge.py:rank",
                )
            )
        elif module.endswith(".py") and resolve_path(module, base) is None:
            problems.append(Problem("rounds.rank_by", f"no such file {module} (relative to here or to the recipe)"))
    if rounds.best_min_reward is not None and rounds.rejection_sampling is not True:
        problems.append(
            Problem("rounds.best_min_reward", "only with rejection_sampling: true (it picks what that trains on)")
        )
    if rounds.min_ranked is not None and rounds.rank_by != "people":
        problems.append(Problem("rounds.min_ranked", "only with rank_by: people (a judge ranks every prompt)"))
    if rounds.guidelines is not None:
        if rounds.rank_by != "people":
            problems.append(Problem("rounds.guidelines", "only with rank_by: people (guidelines are for labellers)"))
        elif not isinstance(rounds.guidelines, str) or resolve_path(rounds.guidelines, base) is None:
            problems.append(
                Problem("rounds.guidelines", f"no such file {rounds.guidelines} (relative to here or to the recipe)")
            )
        else:  # read now, not after round 1 has trained: the page shows it to labellers
            try:
                resolve_path(rounds.guidelines, base).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                problems.append(
                    Problem("rounds.guidelines", f"cannot read {rounds.guidelines} ({e}); give a UTF-8 markdown file")
                )


def _check_rounds_trainers(recipe: Recipe, rounds: Rounds, retrained: list[str], problems, check_trainers: bool):
    """rounds.stages: trainer settings of the retrained stages only, checked as the stages' own."""
    if isinstance(rounds.stages, dict):
        for name, settings in rounds.stages.items():
            if name not in retrained:
                tuned = name == best_of_k_stage(recipe) and not rounds.rejection_sampling
                problems.append(
                    Problem(
                        f"rounds.stages.{name}",
                        f"later rounds retrain {' and '.join(retrained) or 'no stage of this recipe'} only; give "
                        "trainer settings of those"
                        + (
                            f" ({name} too with rejection_sampling: true, which fine-tunes on the best answers)"
                            if tuned
                            else ""
                        ),
                    )
                )
            elif not isinstance(settings, dict):
                problems.append(
                    Problem(
                        f"rounds.stages.{name}", f"expected trainer settings, e.g. {{{name}: {{learning_rate: 1e-5}}}}"
                    )
                )
    if check_trainers and not problems and recipe.source.is_file():
        try:
            round_recipe(recipe)  # the trainer blocks of a later round, checked as the stages' are
        except RecipeError as e:
            for p in e.problems:
                key = p.key
                for name in retrained:
                    if key.startswith(f"stages.{name}.trainer.") and key.split(".")[3] in (
                        rounds.stages.get(name) or {}
                    ):
                        key = f"rounds.stages.{name}." + key.removeprefix(f"stages.{name}.trainer.")
                problems.append(Problem(key, p.message, cause=p.cause))


def _check_hub(recipe: Recipe, known: list[str], problems: list[Problem]) -> None:
    hub = recipe.hub
    if isinstance(hub.repo_id, str) and not preflight.is_repo_id(hub.repo_id):
        problems.append(
            Problem(
                "hub.repo_id", f"expected owner/name (your user or organisation, then the repo), got {hub.repo_id!r}"
            )
        )
    for stage in hub.stages if isinstance(hub.stages, list) else []:
        if stage not in known:
            problems.append(Problem("hub.stages", f"{stage!r} is not a stage of this recipe ({', '.join(known)})"))
    if hub.weights == "adapter" and not any(recipe.adapters(s)[0] for s in known if recipe.stages[s]):
        problems.append(
            Problem(
                "hub.weights",
                "'adapter' needs a lora block: without LoRA a stage has full weights only; use weights: merged",
            )
        )


def _line_map(text: str, duplicates: list[Problem] | None = None) -> dict[str, int]:
    """Map each dotted key of a YAML document to the line it is written on; a key written twice in one mapping goes
    to `duplicates`."""
    lines: dict[str, int] = {}
    walked: set[int] = set()  # an alias is the node it names: walked once (a bomb of nested aliases would not end)

    def walk(node, prefix):
        if id(node) in walked:
            return
        walked.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                if k.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *defaults`: keys written after it override the merged ones, as meant
                path = f"{prefix}.{k.value}" if prefix else str(k.value)
                line = k.start_mark.line + 1
                if k.value in seen and duplicates is not None:
                    duplicates.append(
                        Problem(
                            path,
                            f"written twice, on lines {seen[k.value]} and {line}; YAML keeps "
                            "only the last, so the first is silently ignored: remove one",
                            where=f"line {line}",
                        )
                    )
                seen[k.value] = line
                lines[path] = line
                walk(v, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{prefix}[{i}]")

    walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    return lines


def _nearest_line(lines: dict[str, int], key: str) -> str:
    while key:
        if key in lines:
            return f"line {lines[key]}"
        key = key.rpartition(".")[0]
    return ""
