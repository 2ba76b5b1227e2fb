"""`alignkit rank FILE --by MODULE:FUNCTION`: a program orders each prompt's answers (ties allowed), standing in for
people in tests and benchmarks, or an AI labeller (RLAIF).

The judge is called once per row as `judge(prompt, answers) -> ranks`: the prompt as the file holds it (text, or a
list of {role, content} messages), the answers' texts in the file's order, and back one whole number per answer, 1
for the best, equal numbers for answers it cannot tell apart. Every row is judged and checked before anything is
written; then the file (or --out) is replaced whole, each row with its `ranks` and `ranked_by`, every other column
kept.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import numbers
import os
import sys
from pathlib import Path
from typing import Callable

from . import data, files
from .errors import DataError, UserError
from .log import log

SHOWN = 20  # problems listed in one error; the count says how many more


def load_judge(spec: str) -> Callable:
    """MODULE:FUNCTION, where MODULE is a Python file (path/to/judge.py) or a dotted module importable from the
    current folder or the installed packages. A user's program is named by a string here by nature: this is the one
    place alignkit imports by name."""
    module, _, name = spec.rpartition(":")
    if not module or not name.isidentifier():
        raise UserError(
            f"--by {spec}: give MODULE:FUNCTION, a Python file or module and the function in it that ranks, e.g. "
            "data/chat/judge.py:rank or mypackage.judges:rank"
        )
    try:
        if module.endswith(".py") or os.sep in module:
            path = Path(module)
            if not path.is_file():
                raise UserError(f"--by {spec}: no such file {module}")
            found = importlib.util.spec_from_file_location(f"alignkit_judge_{path.stem}", path)
            loaded = importlib.util.module_from_spec(found)
            # registered as an import would be: dataclasses, pickle and typing look a module up by its name
            sys.modules[found.name] = loaded
            try:
                found.loader.exec_module(loaded)
            except BaseException:
                del sys.modules[found.name]
                raise
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())  # a judge beside the data, as `python -m` would find it
            loaded = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):  # the module itself, or its package
            raise UserError(
                f"--by {spec}: no module {e.name} (looked in {os.getcwd()} and the installed packages); give a "
                "file path (path/to/judge.py:function) or install the package"
            ) from e
        raise UserError(f"--by {spec}: importing {module} failed: {type(e).__name__}: {e}") from e
    except UserError:
        raise
    except Exception as e:  # the judge's own module failed to run: its error, named
        raise UserError(f"--by {spec}: importing {module} failed: {type(e).__name__}: {e}") from e
    judge = getattr(loaded, name, None)
    if not callable(judge):
        there = sorted(n for n, v in vars(loaded).items() if callable(v) and not n.startswith("_"))
        raise UserError(f"--by {spec}: {module} has no function {name} (it has: {', '.join(there) or 'none'})")
    return judge


def judged(judge: Callable, spec: str, row: dict) -> list[int]:
    """The judge's ranks of one row's answers, checked: one whole number from 1 per answer. Raises DataError."""
    answers = [data.answer_text(r) for r in row["responses"]]
    try:
        ranks = judge(copy.deepcopy(row["prompt"]), answers)  # a judge that edits its prompt edits no output
    except Exception as e:  # whatever the user's program raises is its verdict on this row: named, with its cause
        raise DataError(f"the judge {spec} raised {type(e).__name__}: {e}") from e
    if isinstance(ranks, tuple):
        ranks = list(ranks)
    if isinstance(ranks, list):  # numpy's and torch's integers are whole numbers too
        ranks = [int(r) if isinstance(r, numbers.Integral) and not isinstance(r, bool) else r for r in ranks]
    data.check_ranks(ranks, len(answers), what=f"the judge {spec} returned {_short(ranks)}, which")
    return ranks


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def rank_rows(path: Path, spec: str) -> list[dict]:
    """Every row of `path` with the judge's `ranks` and `ranked_by`; every problem (bad rows, a judge that raises or
    answers wrongly) found first and raised together, naming file and line."""
    rows, lines = data.read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows; give the file alignkit sample wrote")
    judge = load_judge(spec)
    problems, out = [], []
    for row, line in zip(rows, lines):
        try:
            data.check_unranked(row)
            ranks = judged(judge, spec, row)
        except DataError as e:
            problems.append((f"{path}:{line}: {e}", e.__cause__))
            continue
        out.append({**row, "ranks": ranks, "ranked_by": spec})
    if problems:
        shown = [text for text, _ in problems[:SHOWN]]
        more = [f"... and {len(problems) - SHOWN} more"] if len(problems) > SHOWN else []
        error = DataError(
            f"{path}: {len(problems)} of {len(rows)} rows cannot be ranked; nothing was written:\n  "
            + "\n  ".join(shown + more)
        )
        raise error from problems[0][1]
    return out


def main(args) -> int:
    path = Path(args.file)
    if not args.out and path.suffix != ".jsonl":
        raise UserError(
            f"{path}: rankings are written as JSON Lines, not over a {path.suffix} file; give --out FILE.jsonl"
        )
    out = Path(args.out) if args.out else path  # --out checked by the command line
    rows = rank_rows(path, args.by)
    files.write_jsonl(out, rows)
    pairs = sum(len(data.strict_pairs(row["ranks"])) for row in rows)
    ties = sum(len(set(row["ranks"])) == 1 for row in rows)
    log(
        "rank",
        f"ranked {len(rows)} prompts with {args.by}: {pairs} ordered pairs"
        + (f"; {ties} rankings are all ties (the reward stage leaves them out)" if ties else "")
        + f"; wrote {out}",
    )
    return 0
