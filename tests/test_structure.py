"""The house's structure, checked: no import circle among alignkit's modules (function-local imports included), the
recipe's modules short of long functions, and a range declared beside every numeric field of alignkit's own config
classes, which `validate` enforces (kl_target 0, kl_horizon 0 and ptx_coef -1 among them)."""

import ast
import dataclasses
import types
import typing
from pathlib import Path

import pytest
from conftest import TINY, alignkit

PACKAGE = Path(__file__).resolve().parents[1] / "alignkit"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The alignkit modules `path` imports anywhere in it (at the top, in a function, under TYPE_CHECKING)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("alignkit")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("alignkit"):
                target = node.module
            else:
                continue
            found.add(target)
            for alias in node.names:  # `from . import data`: the module data
                sub = f"{target}.{alias.name}"
                if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file() or (
                    PACKAGE.parent / sub.replace(".", "/")
                ).is_dir():
                    found.add(sub)
    return found - {name}


def test_no_module_of_alignkit_imports_itself_back_through_others():
    graph = {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}
    for name in list(graph):
        graph[name] = {t for t in graph[name] if t in graph}
    visiting, done, cycles = set(), set(), []

    def visit(node, path):
        visiting.add(node)
        for nxt in sorted(graph[node]):
            if nxt in visiting:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node, [node])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


RECIPE_MODULES = ("schema.py", "typecheck.py", "preflight.py", "recipe.py")


def test_the_recipe_modules_have_no_function_over_60_lines():
    long = []
    for name in RECIPE_MODULES:
        for node in ast.walk(ast.parse((PACKAGE / name).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def numeric(tp) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(numeric(a) for a in typing.get_args(tp))
    return tp in (int, float)


def own_classes():
    """alignkit's own config classes: the recipe's schema, every stage's settings, and PPO's trainer config (its own
    fields; those it inherits from transformers' TrainingArguments have their range in a table beside the stages)."""
    from alignkit import schema
    from alignkit.stages import ORDER
    from alignkit.stages.ppo_trainer import PPOConfig

    classes = [c for c in vars(schema).values() if dataclasses.is_dataclass(c) and c.__module__ == schema.__name__]
    classes += [s.settings for s in ORDER]
    return [(c, None) for c in dict.fromkeys(classes)] + [(PPOConfig, set(PPOConfig.__annotations__))]


def test_every_numeric_field_of_alignkits_own_classes_declares_its_range():
    from alignkit.schema import range_of

    missing = []
    for cls, only in own_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if (only is None or f.name in only) and numeric(hints[f.name]) and range_of(f) is None:
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing, missing
    # and TRL's numeric fields the stages set have theirs in the stages' table
    from alignkit.stages.spec import TRAINER_RANGES

    assert {"learning_rate", "num_train_epochs", "max_length", "warmup_ratio"} <= set(TRAINER_RANGES)


@pytest.mark.parametrize(
    "override, message",
    [
        ("stages.ppo.trainer.kl_target=0", "stages.ppo.trainer.kl_target: must be > 0"),
        ("stages.ppo.trainer.kl_horizon=0", "stages.ppo.trainer.kl_horizon: must be >= 1"),
        ("stages.ppo.trainer.ptx_coef=-1", "stages.ppo.trainer.ptx_coef: must be >= 0 (0 turns PPO-ptx off)"),
        ("stages.ppo.trainer.missing_eos_penalty=-2", "stages.ppo.trainer.missing_eos_penalty: must be >= 0"),
        ("rounds.redraws=-1", "rounds.redraws: must be >= 0, got -1"),
        ("eval.batch_size=0", "eval.batch_size: must be >= 1, got 0"),
        ("lora.lora_dropout=1", "lora.lora_dropout: must be in [0, 1), got 1"),
    ],
)
def test_validate_refuses_a_number_out_of_its_declared_range(override, message, tmp_path, capsys):
    more = []
    if override.startswith("rounds."):
        more = ["rounds.count=2", "rounds.prompts.path=data/tiny/ppo.jsonl", "rounds.rank_by=people"]
    if override.startswith("lora."):
        more = ["lora.r=4"]
    code, _, err = alignkit(capsys, "validate", TINY, f"output_dir={tmp_path}", *more, override)
    assert code == 2 and message in err, err
