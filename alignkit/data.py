"""Datasets: read local files or Hub datasets, convert the formats people have into TRL's, check every row.

Each stage declares the kind of rows it reads, and gets them in one of TRL's formats, plain or conversational:
  text: text;  demonstrations: text | prompt+completion | messages;  comparisons: [prompt+]chosen+rejected;
  rankings: [prompt+]ranked (answers, best first) [+ranks];  prompts: prompt;  eval: prompt (+ reference).
A ranking of K answers (prompt + responses, best first) stays one row for rankings (the reward stage trains it as one
batch element, as InstructGPT does) and gives comparisons all K(K-1)/2 pairs; a pair is a ranking of two. With a
`ranks` list beside `responses` (one per answer, 1 = best, equal ranks for ties) the answers may come in any order:
they are put best first, ties keep their order, and only strictly ordered pairs are compared; `ranks: null` marks
answers not ranked yet (as `alignkit sample` writes them), which only the prompts' readers take.
Converters turn Alpaca (instruction/input/output), ShareGPT (conversations of from/value) and Anthropic HH
transcripts ("\\n\\nHuman: ... \\n\\nAssistant: ...") into those. Errors name the file and line.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable

from .errors import DataError, utf8_error
from .schema import DATA_SUFFIXES, Recipe
from .schema import Dataset as DatasetSpec

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}
ONE_KIND = "a column holds the same kind of value in every row (text, or a list of {role, content} messages)"
MESSAGES_FIX = (
    '\'messages\' is always a list of {role, content} messages, e.g. [{"role": "user", "content": "Hi"}, '
    '{"role": "assistant", "content": "Hello!"}]; plain text goes in a \'text\' column, a prompt and its '
    "answer in 'prompt' and 'completion'"
)
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
MAX_DEPTH = 16  # levels of lists and objects in a row; a conversational row has 3 (row, messages, message)
# The kinds of rows a stage (or the evaluation) reads, and what each needs.
KINDS = {
    "text": "a 'text' column",
    "demonstrations": "'messages', 'prompt' and 'completion', or 'text' columns, or Alpaca / ShareGPT data",
    "comparisons": "'chosen' and 'rejected' columns (with an optional 'prompt'), a ranking ('prompt' and "
    "'responses', best first), or Anthropic HH transcripts",
    "rankings": "a ranking ('prompt' and 'responses', best first or with 'ranks'), 'chosen' and 'rejected' columns "
    "(with an optional 'prompt'; a ranking of two), or Anthropic HH transcripts",
    "prompts": "a 'prompt' column, or 'messages', Alpaca, ShareGPT or HH data to take the prompts from",
    "eval": "a 'prompt' column (with an optional 'reference' answer), or 'messages'",
}


def load(spec: DatasetSpec, reader: str, recipe: Recipe | None, kind: str):
    """A dataset as a `datasets.Dataset` in TRL's format for the `kind` of rows (KINDS) its reader takes, every row
    checked. `reader` names who reads it, for messages: a stage (a plain name, as "sft": its key is
    stages.sft.dataset), a recipe key such as "eval.comparisons", or a command's option ("--prompts"). Without a
    recipe, a path is relative to the current folder."""
    return load_located(spec, reader, recipe, kind)[0]


def load_located(spec: DatasetSpec, reader: str, recipe: Recipe | None, kind: str):
    """load(), and a function that names the file and line of a row (by its index in the source; None: the file).
    Rows of the kinds that keep one row per source row (rankings, prompts, eval) keep their index."""
    stage = reader.isidentifier()
    key = f"stages.{reader}.dataset" if stage else reader
    who = f"the {reader} stage" if stage else reader
    ds, locate = _read(spec, recipe)
    if spec.max_rows is not None:
        ds = ds.select(range(min(spec.max_rows, len(ds))))
    for want, have in spec.columns.items():
        if have not in ds.column_names:
            raise DataError(
                f"{locate(None)}: {key}.columns.{want}: no column {have!r}; "
                f"the columns are {', '.join(ds.column_names)}"
            )
        if want in ds.column_names and want != have:
            ds = ds.remove_columns(want)
        ds = ds.rename_column(have, want)
    if len(ds) == 0:
        raise DataError(
            f"{locate(None)}: no rows; add rows to it, or point the dataset's path at a file that has them"
        )
    fmt = spec.format if spec.format != "auto" else detect_format(ds.column_names, ds[0])
    columns: list[str] = []

    def convert(batch, indices):
        out: dict[str, list] = {}
        for j, i in enumerate(indices):
            try:
                rows = shape_for(kind, convert_row({k: batch[k][j] for k in batch}, fmt), who)
            except DataError as e:
                raise DataError(f"{locate(i)}: {e}") from e
            for row in rows:
                if not columns:
                    columns.extend(row)
                if list(row) != columns:
                    raise DataError(
                        f"{locate(i)}: this row gives {', '.join(row)} but earlier rows gave "
                        f"{', '.join(columns)}; use one shape for every row of a file"
                    )
                for k, v in row.items():
                    out.setdefault(k, []).append(v)
        return out

    converted = ds.map(
        convert,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        load_from_cache_file=False,
        desc=f"{reader}: checking {fmt} rows",
    )
    return converted, locate


def _read(spec: DatasetSpec, recipe: Recipe | None):
    """Load rows and return (dataset, locate) where locate(i) names the file and line of row i."""
    import datasets
    import pyarrow

    local = recipe.resolve(spec.path) if recipe is not None else Path(spec.path).expanduser()
    if local.is_file():
        kind = DATA_SUFFIXES.get(local.suffix)
        if _is_pickle(local):
            named = "" if kind is None else f", not a {local.suffix} file"
            raise DataError(
                f"{spec.path}: a Python pickle{named}; alignkit never unpickles data (loading a pickle "
                f"runs code from the file): save the rows as {', '.join(DATA_SUFFIXES)} instead"
            )
        if kind is None:
            raise DataError(f"{spec.path}: unsupported file type {local.suffix!r}; use {', '.join(DATA_SUFFIXES)}")
        if kind == "json":
            rows, lines = _read_json(local, spec.path)
            for row, line in zip(rows, lines):
                # datasets' type inference takes time exponential in the nesting on some rows: 22 levels, seconds
                if _depth(row) > MAX_DEPTH:
                    raise DataError(_too_deep(spec.path, line)) from None
                if row.get("ranks") is not None and isinstance(row.get("responses"), list):
                    try:  # here, as written: one float rank makes Arrow read every row's ranks as floats
                        check_ranks(row["ranks"], len(row["responses"]))
                    except DataError as e:
                        raise DataError(f"{spec.path}:{line}: {e}") from None
            # datasets takes the columns from the first row alone, and drops the others' own keys
            columns = list(dict.fromkeys(k for row in rows for k in row))
            rows = [{k: row.get(k) for k in columns} for row in rows]
            try:
                ds = datasets.Dataset.from_list(rows)
            except OverflowError as e:  # a whole number beyond 64 bits, which no Arrow column holds
                line = next((line for row, line in zip(rows, lines) if _huge(row)), None)
                where = spec.path if line is None else f"{spec.path}:{line}"
                raise DataError(
                    f"{where}: a whole number too large to read ({e}); numbers here must lie within "
                    f"±{2**63 - 1:,}: write it as text if it is an identifier"
                ) from e
            except pyarrow.ArrowException as e:  # a column of mixed types, which one Arrow column cannot hold
                raise DataError(
                    _mismatch(rows, lines, columns, spec.path)
                    or f"{spec.path}: the rows do not share one shape ({e}); {ONE_KIND}"
                ) from e
            return ds, lambda i: spec.path if i is None else f"{spec.path}:{lines[i]}"
        if kind == "csv":
            return _read_csv(local, spec.path), lambda i: spec.path if i is None else f"{spec.path}:{i + 2}"
        return _read_parquet(local, spec.path), lambda i: spec.path if i is None else f"{spec.path}: row {i + 1}"
    try:
        ds = datasets.load_dataset(spec.path, spec.name, split=spec.split, revision=spec.revision)
    except Exception as e:
        raise DataError(
            f"{spec.path}: cannot load this Hub dataset ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "check the id and split, your network (HF_HUB_OFFLINE), or point dataset.path at a "
            "local file"
        ) from e
    return ds, lambda i: f"{spec.path} [{spec.split}]" + ("" if i is None else f" row {i}")


def _mismatch(rows: list[dict], lines: list[int], columns: list[str], shown: str) -> str | None:
    """Where rows stop sharing one shape: the file, line and column of the first value that one Arrow column cannot
    hold beside the earlier rows' values of that column (found by bisection: this runs only on a refused file)."""
    import datasets
    import pyarrow

    def fails(column: str, n: int) -> bool:
        try:
            datasets.Dataset.from_list([{column: row[column]} for row in rows[:n]])
        except pyarrow.ArrowException:
            return True
        return False

    found = []
    for column in columns:
        if not fails(column, len(rows)):
            continue
        lo, hi = 1, len(rows)  # the shortest run of rows that fails ends at the first offending one
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fails(column, mid) else (mid + 1, hi)
        found.append((lo - 1, column))
    if not found:
        return None
    i, column = min(found)
    here = rows[i][column]
    earlier = next((j for j in range(i) if rows[j][column] is not None), None)
    if earlier is None:
        return f"{shown}:{lines[i]}: column '{column}' holds other kinds of value than in the earlier rows; {ONE_KIND}"
    there = rows[earlier][column]
    what = (
        f"is {_kind(here)} here but {_kind(there)} on line {lines[earlier]}"
        if _kind(here) != _kind(there)
        else f"holds values of other types inside it than on line {lines[earlier]}"
    )
    fix = MESSAGES_FIX if column == "messages" else ONE_KIND
    return f"{shown}:{lines[i]}: column '{column}' {what}; {fix}"


def _huge(value) -> bool:
    """Whether `value` holds a whole number that 64 bits cannot."""
    if isinstance(value, dict):
        return any(_huge(v) for v in value.values())
    if isinstance(value, list):
        return any(_huge(v) for v in value)
    return isinstance(value, int) and not -(2**63) <= value < 2**63


def _kind(value) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "a list" if isinstance(value, list) else "an object"


def _read_text(path: Path, shown: str) -> str:
    """A data file's text; a file that is not UTF-8 is named with the line of its first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark, as some editors write, is harmless
    except UnicodeDecodeError as e:
        line, what = utf8_error(data, e)
        raise DataError(f"{shown}:{line}: {what}") from e


def _is_pickle(path: Path) -> bool:
    """Whether a file starts as Python's pickles of protocol 2 and later do (0x80, then the protocol)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _too_deep(shown: str, line: int | None = None) -> str:
    return (
        f"{shown}{f':{line}' if line else ''}: nested too deeply (lists or objects inside each other more than "
        f"{MAX_DEPTH} levels); a row holds text, or lists of {{role, content}} messages: flatten it"
    )


def _depth(value) -> int:
    """How deeply lists and mappings nest in value, counted without recursion (the data may be nested past the
    limit)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            todo.extend((child, depth + 1) for child in children)
    return deepest


def _read_csv(path: Path, shown: str):
    """Rows of a CSV file with a header line; every cell is text, so "2" stays an answer, not a number."""
    import io

    import datasets
    import pandas

    text = _read_text(path, shown)
    try:
        frame = pandas.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pandas.errors.EmptyDataError:
        raise DataError(
            f"{shown}: empty: no header line and no rows; a CSV file starts with a header naming its "
            "columns (e.g. prompt,completion), then one row per line"
        ) from None
    except pandas.errors.ParserError as e:
        found = re.search(r"(line|row) (\d+)", str(e))  # pandas counts rows from 0, the header's
        line = f":{int(found.group(2)) + (found.group(1) == 'row')}" if found else ""
        raise DataError(
            f"{shown}{line}: not valid CSV ({_tail(e)}); check its quotes (a field that opens a quote "
            "must close it) and that every row has as many fields as the header"
        ) from e
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


def _read_parquet(path: Path, shown: str):
    """Rows of a Parquet file, read with pyarrow (whose errors name what is wrong with the file)."""
    import datasets
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as e:  # not Parquet, cut short, or corrupt inside
        raise DataError(
            f"{shown}: not a readable Parquet file ({_tail(e)}); write it again (e.g. pandas' "
            "DataFrame.to_parquet) or use JSON Lines"
        ) from e
    return datasets.Dataset(table)


def _tail(e: BaseException) -> str:
    """An error's own words without the file name it repeats."""
    text = " ".join(str(e).split())
    return text.split(": ", 1)[1] if text.startswith(("Could not open", "Error tokenizing")) and ": " in text else text


def _read_json(path: Path, shown: str) -> tuple[list[dict], list[int]]:
    """Rows of a JSON Lines file or a JSON array, with the line each row starts on."""
    text = _read_text(path, shown)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{shown}:{e.lineno}: not valid JSON: {e.msg}; fix the file there") from e
        except RecursionError:
            raise DataError(_too_deep(shown)) from None
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise DataError(f"{shown}: element {i + 1} of the array is {type(row).__name__}, expected an object")
        return data, _array_lines(text, len(data))
    rows, lines = [], []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{shown}:{n}: not valid JSON ({e.msg}, column {e.colno}); each line must be one JSON object"
            ) from e
        except RecursionError:
            raise DataError(_too_deep(shown, n)) from None
        if not isinstance(row, dict):
            raise DataError(f"{shown}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        lines.append(n)
    return rows, lines


def read_rows(path: Path) -> tuple[list[dict], list[int]]:
    """The rows of a JSON Lines file (or a JSON array), as written, with the line each starts on: for commands that
    rewrite a file's rows and keep every column (alignkit rank)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if _is_pickle(path) or DATA_SUFFIXES.get(path.suffix) != "json":
        raise DataError(f"{path}: not a JSON Lines file; give the .jsonl file alignkit sample wrote")
    return _read_json(path, str(path))


def _array_lines(text: str, count: int) -> list[int]:
    """Line on which each top-level object of a JSON array starts (best effort; the row number otherwise)."""
    decoder, lines, pos = json.JSONDecoder(), [], text.index("[") + 1
    for _ in range(count):
        while text[pos] in " \t\r\n,":
            pos += 1
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = decoder.raw_decode(text, pos)
    return lines


def detect_format(columns: list[str], first: dict) -> str:
    cols = set(columns)
    if "conversations" in cols:
        return "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if (
        {"chosen", "rejected"} <= cols
        and "prompt" not in cols
        and isinstance(first.get("chosen"), str)
        and HH_TURN.search(first["chosen"])
    ):
        return "hh"
    return "trl"


# --- converters: each takes one row and returns TRL-format columns ------------------------------------------------


def convert_row(row: dict, fmt: str) -> dict:
    if fmt == "alpaca":
        return from_alpaca(row)
    if fmt == "sharegpt":
        return from_sharegpt(row)
    if fmt == "hh":
        return from_hh(row)
    return row  # TRL's own formats: the stage picks its columns


def from_alpaca(row: dict) -> dict:
    instruction, extra, output = row.get("instruction"), row.get("input") or "", row.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str):
        raise DataError("Alpaca rows need 'instruction' and 'output' text")
    prompt = instruction if not extra.strip() else f"{instruction}\n\n{extra}"
    return {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": output}]}


def from_sharegpt(row: dict) -> dict:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError("ShareGPT rows need 'conversations': a list of {from, value}")
    messages = []
    for n, turn in enumerate(turns):
        who = turn.get("from") if isinstance(turn, dict) else None
        if who not in SHAREGPT_ROLES or not isinstance(turn.get("value"), str):
            raise DataError(f"conversations[{n}]: expected {{from: human|gpt|system, value: text}}, got {turn!r}")
        messages.append({"role": SHAREGPT_ROLES[who], "content": turn["value"]})
    return {"messages": messages}


def parse_hh(transcript: str) -> list[dict]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [{user: hi}, {assistant: hello}]."""
    parts = HH_TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        raise DataError("an HH transcript must start with '\\n\\nHuman: ' and alternate Human/Assistant turns")
    return [
        {"role": "user" if who == "Human" else "assistant", "content": text.strip()}
        for who, text in zip(parts[1::2], parts[2::2])
    ]


def from_hh(row: dict) -> dict:
    chosen, rejected = parse_hh(row.get("chosen") or ""), parse_hh(row.get("rejected") or "")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise DataError("an HH transcript must end with an Assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise DataError(
            "'chosen' and 'rejected' differ before their last Assistant turn; HH pairs share the dialogue "
            "and differ only in the final answer"
        )
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def shape_for(kind: str, row: dict, who: str = "this dataset") -> list[dict]:
    """The rows (usually one) in the columns that a reader of `kind` takes; raise DataError naming what is missing.

    A ranking, `responses` best first, gives comparisons every pair of it: K answers make K(K-1)/2 pairs.
    """
    # before: taken unchecked by the readers of rankings (other readers never look at the column)
    if kind in ("rankings", "comparisons") and row.get("ranked") is not None and row.get("responses") is None:
        raise DataError(
            "'ranked' is the column alignkit makes of 'responses' (its ranks checked); give the answers as "
            "'responses' (best first, or with 'ranks', 1 = best), or rename the column with dataset.columns: "
            "{responses: ranked}"
        )
    has = {k for k, v in row.items() if v is not None}
    for key in ("prompt", "completion", "messages", "chosen", "rejected"):
        if key in has:
            _check_content(row[key], key)
    if "responses" in has:
        if "ranks" in row and row["ranks"] is None and kind in ("demonstrations", "rankings", "comparisons"):
            raise DataError(
                "the answers of this row are not ranked yet ('ranks' is null, as alignkit sample writes them): rank "
                "them first (alignkit rank FILE --by MODULE:FUNCTION), or give 'ranks' (one per answer, 1 = best)"
            )
        row = {**row, **_ranking(row)}
        has = {k for k, v in row.items() if v is not None}
    if kind == "text" and "text" in has:
        return [{"text": row["text"]}]
    if kind == "demonstrations":
        if "messages" in has:
            return [{"messages": row["messages"]}]
        for answer in ("completion", "chosen"):  # from comparisons: learn the preferred answer
            if {"prompt", answer} <= has:
                _same_kind(row, "prompt", answer)
                return [{"prompt": row["prompt"], "completion": row[answer]}]
        if "text" in has:
            return [{"text": row["text"]}]
    if kind == "rankings":  # a ranking stays one row, best first; a pair is a ranking of two
        if "ranked" in row:
            ties = {"ranks": row["ranks"]} if row.get("ranks") is not None else {}
            return [{"prompt": row["prompt"], "ranked": row["ranked"], **ties}]
        if {"chosen", "rejected"} <= has:
            _same_kind(row, "chosen", "rejected")
            if "prompt" in has:
                _same_kind(row, "prompt", "chosen")
                return [{"prompt": row["prompt"], "ranked": [row["chosen"], row["rejected"]]}]
            return [{"ranked": [row["chosen"], row["rejected"]]}]
    if kind == "comparisons":
        if "ranked" in row:  # only the strictly ordered pairs: tied answers are no comparison
            ranked, ranks = row["ranked"], row.get("ranks") or list(range(len(row["ranked"])))
            return [
                {"prompt": row["prompt"], "chosen": ranked[i], "rejected": ranked[j]} for i, j in strict_pairs(ranks)
            ]
        if {"chosen", "rejected"} <= has:
            out = {"chosen": row["chosen"], "rejected": row["rejected"]}
            _same_kind(row, "chosen", "rejected")
            if "prompt" in has:
                _same_kind(row, "prompt", "chosen")
                out = {"prompt": row["prompt"], **out}
            return [out]
    if kind in ("prompts", "eval"):
        prompt = None
        if "prompt" in has:
            prompt = row["prompt"]
        elif "messages" in has:
            messages = row["messages"]
            if messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            if not messages or messages[-1]["role"] != "user":
                raise DataError("'messages' has no user turn to use as a prompt")
            prompt = messages
        if prompt is not None:
            if kind == "prompts":
                return [{"prompt": prompt}]
            reference = row.get("reference")
            if reference is not None and not isinstance(reference, str):
                raise DataError(f"'reference' must be text, got {type(reference).__name__}")
            return [{"prompt": prompt, "reference": reference}]
    empty = sorted(k for k, v in row.items() if v is None)
    raise DataError(
        f"{who} needs {KINDS[kind]}; this row has {', '.join(sorted(has)) or 'no value in any column'}"
        + (f" ({', '.join(empty)}: null or missing)" if empty else "")
        + ". Rename columns with dataset.columns, or set dataset.format"
    )


def _ranking(row: dict) -> dict:
    """`prompt` + `responses` (best first, or in any order with `ranks`) -> the best as `chosen` and the whole
    ranking as `ranked`, best first (with `ranks` in the same order, where the row gives them)."""
    responses = row.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise DataError("'responses' must list at least two answers, best first")
    if "prompt" not in row or row["prompt"] is None:
        raise DataError("a ranking needs a 'prompt' beside its 'responses'")
    ranks = row.get("ranks")
    if ranks is not None:
        check_ranks(ranks, len(responses))
        check_answers(responses)
    conversational = isinstance(row["prompt"], list)
    ranked = []
    for n, r in enumerate(responses):
        if isinstance(r, str) and conversational:
            r = [{"role": "assistant", "content": r}]
        if isinstance(r, str) == conversational:
            raise DataError(
                f"'responses'[{n}] must be {'a message list or text' if conversational else 'text'}, like the prompt"
            )
        if not isinstance(r, str):
            _check_content(r, f"responses[{n}]")
        ranked.append(r)
    if ranks is None:
        return {"chosen": ranked[0], "ranked": ranked}
    order = sorted(range(len(ranked)), key=lambda i: ranks[i])  # best first; ties keep the file's order
    return {"chosen": ranked[order[0]], "ranked": [ranked[i] for i in order], "ranks": [ranks[i] for i in order]}


def strict_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """The pairs (better, worse) of a ranking's answers, as indices, whose ranks differ: tied answers are no pair.
    Best first, as a ranking without ties lists them: (0, 1), (0, 2), ..., (1, 2), ..."""
    return [(a, b) for a in range(len(ranks)) for b in range(len(ranks)) if ranks[a] < ranks[b]]


def check_unranked(row: dict) -> None:
    """A ranking's prompt and answers before they are ranked (as `alignkit rank` reads them): a prompt, at least two
    answers like it (text, or messages), none empty, none twice. Raises DataError saying what is wrong."""
    if row.get("prompt") is not None:
        _check_content(row["prompt"], "prompt")
    _ranking({**row, "ranks": None})
    check_answers(row["responses"])


MAX_RANK = 10**9  # a scale's ranks may leave gaps; none is this far down, and every reader's integers hold it


def check_ranks(ranks, count: int, what: str = "'ranks'") -> None:
    """Ranks of `count` answers: a list of whole numbers from 1 (the best), one per answer, equal ones for ties."""
    if not isinstance(ranks, list):
        raise DataError(f"{what} is {type(ranks).__name__}, not a list of whole numbers (1 = best), one per answer")
    if len(ranks) != count:
        raise DataError(f"{what} gives {len(ranks)} ranks for {count} answers; give one rank per answer")
    for n, r in enumerate(ranks):
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_RANK:
            raise DataError(
                f"{what} has {r!r} for 'responses'[{n}]; a rank is a whole number from 1 (the best) to {MAX_RANK:,}, "
                "equal ones for ties"
            )


def check_answers(responses: list) -> None:
    """The answers of a ranking with `ranks`: none empty, none twice (a labeller cannot order an answer against
    itself)."""
    seen: dict[str, int] = {}
    for n, r in enumerate(responses):
        text = answer_text(r)
        if not text.strip():
            raise DataError(f"'responses'[{n}] is empty; a ranked answer has text")
        if text in seen:
            raise DataError(f"'responses'[{n}] repeats 'responses'[{seen[text]}] ({text!r}); each answer once")
        seen[text] = n


def answer_text(response) -> str:
    """An answer's text: itself, or the content of its messages (a conversational answer)."""
    if isinstance(response, list):
        return "".join(m.get("content") or "" for m in response if isinstance(m, dict))
    return response if isinstance(response, str) else ""


def _check_content(value, key: str) -> None:
    if isinstance(value, str) and key == "messages":
        raise DataError(f"column 'messages' holds text; {MESSAGES_FIX}")
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not value:
        raise DataError(f"'{key}' must be text or a non-empty list of messages, got {type(value).__name__}")
    for n, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"'{key}'[{n}] must be {{role: system|user|assistant, content: text}}, got {m!r}")


def _same_kind(row: dict, a: str, b: str) -> None:
    if isinstance(row[a], str) != isinstance(row[b], str):
        raise DataError(f"'{a}' and '{b}' must both be text or both be message lists")


def is_conversational(row: dict) -> bool:
    return any(isinstance(row.get(k), list) for k in ("prompt", "messages", "chosen"))


# --- lengths and fingerprints ------------------------------------------------------------------------------------


def render(row: dict, tokenizer, add_generation_prompt: bool = False) -> str:
    """The text the model sees for a row: its columns joined, through the chat template when conversational."""
    parts = [row[k] for k in ("prompt", "completion", "messages", "chosen") if row.get(k) is not None] or [row["text"]]
    if isinstance(parts[0], list):
        messages = [m for p in parts for m in p]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return "".join(parts)


def check_lengths(
    ds,
    tokenizer,
    limit: int,
    stage: str,
    policy: str,
    what: str = "rows",
    measure: Callable[[dict], int] | None = None,
    dropped: bool = False,
) -> int:
    """Count rows longer than `limit` tokens; warn (policy 'truncate') or raise (policy 'error'). `dropped`: the
    stage's trainer drops such rows rather than truncating them. Returns the count."""
    from .log import log

    measure = measure or (lambda row: len(tokenizer(render(row, tokenizer), add_special_tokens=False).input_ids))
    too_long = [i for i, row in enumerate(ds) if measure(row) > limit]
    if too_long and policy == "error":
        raise DataError(
            f"stages.{stage}: {len(too_long)} of {len(ds)} {what} are longer than {limit} tokens "
            f"(rows {', '.join(str(i + 1) for i in too_long[:5])}{', ...' if len(too_long) > 5 else ''}); "
            f"shorten them, or set stages.{stage}.overlength: truncate"
        )
    if too_long:
        log(
            stage,
            f"warning: {len(too_long)} of {len(ds)} {what} are longer than {limit} tokens and are "
            f"{'dropped (a pair cut short compares answers that lost their ends)' if dropped else 'truncated'}",
        )
    return len(too_long)


def fingerprint(spec: DatasetSpec, recipe: Recipe) -> str:
    """Content hash of a local file, or the Hub coordinates of a remote dataset."""
    local = recipe.resolve(spec.path)
    if local.is_file():
        h = hashlib.sha256()
        with open(local, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return "sha256:" + h.hexdigest()
    return f"hub:{spec.path}:{spec.name}:{spec.split}:{spec.revision}"
