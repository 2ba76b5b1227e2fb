"""Checking plain data (YAML's) against dataclasses: every unknown, missing, mistyped or out-of-range key named, all
at once. Knows no stage: the loader hands it the schemas (alignkit's, TRL's and peft's config classes)."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal

import yaml

from .errors import Problem
from .schema import Range, range_of


@dataclass(frozen=True)
class Keyed:
    """A mapping whose values each have a schema of their own, by key (the recipe's stages: the stage declares it)."""

    schema: Callable[[str], type | None]  # None: a key without one (reported by the loader), kept unbuilt
    example: str  # a key for the example in a message


def build(cls, data, key: str, problems: list[Problem], keyed: Keyed | None = None):
    """Turn a mapping into the dataclass `cls`, recording a problem for every unknown, missing, mistyped or
    out-of-range key. A field marked "keyed" is a mapping whose values `keyed` gives the schemas of."""
    if not isinstance(data, dict):
        problems.append(Problem(key, f"expected a mapping, got {show(data)}; {_mapping_hint(cls, key, data)}"))
        return None
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}
    hints = typing.get_type_hints(cls)
    unknown_keys(data, fields, key, cls.__name__ if key else "a recipe", problems)
    values = {}
    for name, f in fields.items():
        sub = f"{key}.{name}" if key else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(Problem(sub, f"required: {f.metadata.get('help', '')}"))
            continue
        value, tp = data[name], hints[name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if (
            typing.get_origin(tp) in (typing.Union, types.UnionType)
            and len(inner) == 1
            and dataclasses.is_dataclass(inner[0])
        ):
            tp = inner[0] if value is not None else type(None)  # an optional section
        if tp is type(None):
            pass
        elif dataclasses.is_dataclass(tp):
            value = build(tp, value, sub, problems, keyed)
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            if not isinstance(value, dict):
                problems.append(
                    Problem(
                        sub,
                        f"expected a mapping of stage names to their settings, got "
                        f"{show(value)}; e.g. {name}: {{{(keyed.example if keyed else 'NAME')}: {{dataset: {{path: "
                        f"data/{(keyed.example if keyed else 'NAME')}.jsonl}}}}}}",
                    )
                )
                continue
            schema = keyed.schema if keyed and f.metadata.get("keyed") else (lambda k, tp=tp: typing.get_args(tp)[1])
            # a key without a schema (an unknown stage) is reported by _check; its value is kept unbuilt
            value = {
                k: build(schema(k), v, f"{sub}.{k}", problems, keyed) if schema(k) else None for k, v in value.items()
            }
        else:
            start = len(problems)
            value = check_value(value, tp, sub, problems, f.metadata.get("help", ""))
            if len(problems) == start:
                check_range(range_of(f), value, sub, problems, f.default)
        values[name] = value
    try:
        return cls(**values)
    except TypeError:  # a required field was missing: already reported
        return None


def _mapping_hint(cls, key: str, value) -> str:
    """How to write a section given as a scalar or a list: `model: gpt2` -> `model: {name_or_path: gpt2}`."""
    leaf = key.rpartition(".")[2] or "it"
    names = [f.name for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)]
    if not isinstance(value, str):
        return f"give {leaf} its keys, one per line below it: {', '.join(names)}"
    example, inner = value, cls
    nesting = []
    while dataclasses.is_dataclass(inner):  # the first field, as far down as it goes: {dataset: {path: x}}
        first = dataclasses.fields(inner)[0]
        nesting.append(first.name)
        inner = typing.get_type_hints(inner)[first.name]
    for name in reversed(nesting):
        example = f"{{{name}: {example}}}"
    return f"write it as {leaf}: {example} (its keys: {', '.join(names)})"


def check_range(rule: Range | None, value, key: str, problems: list[Problem], default=None) -> None:
    """Check a number against its range (no range, and a value of the wrong type, pass)."""
    if rule is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return  # no range, or a type or non-finite problem reported on its own
    if not rule.test(value):
        known = default not in (None, dataclasses.MISSING)
        problems.append(
            Problem(
                key,
                f"must be {rule.rule}, got {value!r}; set a value in that range, or remove the key "
                f"to get the default{f' ({default!r})' if known else ''}",
            )
        )


def non_finite(value, seen: set[int] | None = None) -> bool:
    """Whether a number in value (nested in mappings and lists too) is NaN or infinite, as YAML's .nan and .inf are.
    A collection that YAML aliases several times is looked at once."""
    if isinstance(value, float):
        return not math.isfinite(value)
    seen = set() if seen is None else seen
    if id(value) in seen:
        return False
    seen.add(id(value))
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return any(non_finite(v, seen) for v in items)


def unknown_keys(data: dict, known, key: str, owner: str, problems: list[Problem]) -> None:
    for name in data:
        if name not in known:
            hint = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
            fix = f"did you mean {hint[0]}?" if hint else f"known keys: {', '.join(sorted(map(str, known)))}"
            problems.append(Problem(f"{key}.{name}" if key else str(name), f"unknown key for {owner}; {fix}"))


def check_value(value, tp, key: str, problems: list[Problem], about: str = ""):
    """Check `value` against the annotation `tp`; a number written as a string (YAML reads 1e-5 so) becomes a float.
    `about` says what the key is, for the message."""
    if _accepts(float, tp) and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if not _fits(value, tp):
        wanted = _describe(tp)
        problems.append(
            Problem(
                key,
                f"expected {wanted}, got {show(value)}; write {wanted.removesuffix(' (or null)')} "
                f"here{f' ({about})' if about else ''}",
            )
        )
    return value


def _accepts(target, tp) -> bool:
    if tp is target:
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and target in typing.get_args(tp)


def _fits(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp in (list, tuple) or origin in (list, tuple):
        return isinstance(value, list) and (origin is not list or not args or all(_fits(v, args[0]) for v in value))
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value in {m.value for m in tp} or value in tp.__members__
    return True  # an annotation we do not model: the owning class checks it


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        text = " or ".join(dict.fromkeys(parts))
        return text + (" (or null)" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    names = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        dict: "a mapping",
        list: "a list",
        tuple: "a list",
    }
    return names.get(tp) or names.get(origin) or getattr(tp, "__name__", str(tp))


def show(value) -> str:
    text = (
        repr(value) if not isinstance(value, (dict, list)) else yaml.safe_dump(value, default_flow_style=True).strip()
    )
    return (text[:60] + "...") if len(text) > 60 else text


def check_config_class(
    cls,
    settings: dict,
    key: str,
    problems: list[Problem],
    reserved=None,
    ranges: dict[str, Range] | None = None,
    **fixed,
):
    """Check `settings` against a dataclass config (TRL's, peft's, alignkit's own), then construct it: returns (the
    config, the checked values: a number YAML read as text, as it reads 1e-5, becomes a float), or (None, {}) with
    `problems` recorded. A number is checked against its field's own range, else against `ranges` (for another
    library's fields, by name). `settings` is left as it is."""
    if not isinstance(settings, dict):
        problems.append(Problem(key, f"expected a mapping, got {show(settings)}"))
        return None, {}
    start = len(problems)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown_keys(settings, fields, key, cls.__name__, problems)
    values = {}
    for name, value in settings.items():
        if name not in fields:
            continue
        if reserved and name in reserved:
            problems.append(Problem(f"{key}.{name}", f"{reserved[name]}; remove this key"))
            continue
        before = len(problems)
        values[name] = check_value(value, hints.get(name, Any), f"{key}.{name}", problems, f"see {cls.__name__}")
        if len(problems) > before:
            continue
        if non_finite(values[name]):
            problems.append(
                Problem(
                    f"{key}.{name}",
                    f"expected a finite number, got {values[name]!r}; write a number "
                    "(YAML reads .nan and .inf as not-a-number and infinity)",
                )
            )
        else:
            rule = range_of(fields[name]) or (ranges or {}).get(name)
            check_range(rule, values[name], f"{key}.{name}", problems, fields[name].default)
    if len(problems) > start:
        return None, {}
    try:
        return cls(**{**values, **fixed}), values
    except (ValueError, ImportError) as e:  # the class's own consistency checks (and a missing optional package)
        problems.append(Problem(key, f"{cls.__name__} rejected these settings: {e}", cause=e))
        return None, {}
