"""Writing files so that a kill at any instant leaves either the old file or the new one, never a cut-off one."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, flush it to disk, then rename it over `path` (atomic)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk (or a kill) leaves no temporary file behind
        raise


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str))


def write_jsonl(path: Path, rows) -> None:
    """Rows as JSON Lines (non-ASCII kept as it is), replacing `path` whole."""
    write_text(path, "".join(_line(row) for row in rows))


# characters that str.splitlines (and so many readers) takes for line ends, which json.dumps leaves raw in strings
_LINE_ENDS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def _line(row) -> str:
    return json.dumps(row, ensure_ascii=False).translate(_LINE_ENDS) + "\n"


PICKLED = (".bin", ".pt", ".pth")
NEVER_LOADED = {"training_args.bin"}  # the Trainer writes it for people; no alignkit or library code loads it


def unsafe_pickles(folder: Path) -> list[Path]:
    """The pickled files under `folder` that torch's weights_only loader refuses (with the numpy types the Trainer's
    own checkpoints hold allowed, as transformers allows them): files that could run code if loaded unsafely."""
    import pickle
    import zipfile

    import torch

    folder = Path(folder)
    if not folder.exists():
        return []
    candidates = [folder] if folder.is_file() else sorted(folder.rglob("*"))
    refused = []
    for path in candidates:
        if not path.is_file() or path.suffix not in PICKLED or path.name in NEVER_LOADED:
            continue
        try:
            from transformers.trainer_pt_utils import safe_globals

            with safe_globals():
                torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError:
            refused.append(path)
        except Exception:  # not a torch file at all, cut off, ...: not what this looks for
            continue
    return refused
