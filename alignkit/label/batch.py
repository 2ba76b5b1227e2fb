"""A batch to label: the rows `alignkit sample` wrote (a prompt, its K answers, "ranks": null, provenance), checked
before any server starts, and found from a file, a round's folder or a run's output_dir."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

SAMPLES = "samples.jsonl"


@dataclass(frozen=True)
class Item:
    line: int  # 1-based line of the batch file
    prompt: object  # text, or a list of {role, content} messages
    responses: list[str]
    provenance: dict


def locate(target: str | Path) -> Path:
    """The batch file `target` names: a .jsonl file, a round's folder (its samples.jsonl) or a run's output_dir (the
    samples of the round that waits for people, else of its last round)."""
    path = Path(target)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / SAMPLES).is_file():
            return path / SAMPLES
        rounds = sorted(
            (p for p in path.glob("round-*") if p.name[6:].isdigit() and (p / SAMPLES).is_file()),
            key=lambda p: int(p.name[6:]),
        )
        waiting = [p for p in rounds if _waits(p)]
        if waiting:  # the earliest: a later round's samples are older than the work it waits for
            return waiting[0] / SAMPLES
        if rounds:
            return rounds[-1] / SAMPLES
        raise DataError(
            f"{path}: a folder with no {SAMPLES} and no round-N/{SAMPLES}; give the file `alignkit sample --out` "
            "wrote, or the output_dir of a run whose round waits for people"
        )
    raise DataError(f"{path}: no such file or folder; give the file `alignkit sample --out` wrote")


def _waits(folder: Path) -> bool:
    """Whether a run's round waits for people on these very samples (its round.json says so)."""
    try:
        stamp = json.loads((folder / "round.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(stamp, dict) and stamp.get("waiting") is not None and stamp.get("waiting") == stamp.get("samples")
    )


def read(path: Path) -> list[Item]:
    """Every row of the batch, or a DataError naming the file, the line and the fix."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 (byte {e.start}); alignkit sample writes UTF-8, write it again"
        ) from e
    if not text.strip():
        raise DataError(f"{path}: empty; nothing to label (alignkit sample writes one row per prompt)")
    items = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            cut = " (the file looks cut off: was alignkit sample interrupted?)" if n == text.count("\n") + 1 else ""
            raise DataError(f"{path}:{n}: not a JSON object: {e.msg}{cut}; write the batch again") from e
        items.append(_item(path, n, row))
    return items


def _item(path: Path, n: int, row) -> Item:
    def bad(what: str) -> DataError:
        return DataError(
            f"{path}:{n}: {what}; give a file `alignkit sample` wrote (prompt, responses, ranks, provenance)"
        )

    if not isinstance(row, dict) or "responses" not in row or "prompt" not in row:
        raise bad("not a row of alignkit sample's format: it needs 'prompt' and 'responses'")
    prompt, responses = row["prompt"], row["responses"]
    if isinstance(prompt, list):
        if not prompt or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt
        ):
            raise bad("'prompt' is a list, but not of {role, content} messages")
    elif not isinstance(prompt, str) or not prompt.strip():
        raise bad("'prompt' must be text or a list of {role, content} messages")
    if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
        raise bad("'responses' must be a list of at least two answers, each text")
    if len(set(responses)) != len(responses) or not all(r.strip() for r in responses):
        raise bad("'responses' has an empty or repeated answer")
    provenance = row.get("provenance") or {}
    if not isinstance(provenance, dict):
        raise bad("'provenance' must be an object")
    return Item(n, prompt, responses, provenance)


def fingerprint(items: list[Item]) -> str:
    """What the labels are labels of: the prompts and answers, in order."""
    return hashlib.sha256(json.dumps([[i.prompt, i.responses] for i in items]).encode()).hexdigest()[:16]


def messages(prompt) -> list[dict]:
    """A prompt as a conversation (text becomes one user message)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
