"""Errors caused by the user's input: the CLI prints them and exits with status 2, without a traceback."""

from __future__ import annotations

from dataclasses import dataclass


class UserError(Exception):
    """Bad input (recipe, data, missing upstream output): the message names where, what was expected, and the fix."""


@dataclass
class Problem:
    key: str
    message: str
    where: str | None = None  # "line 12", "command line", or None before it is known
    cause: BaseException | None = None  # the library's error behind it, shown with ALIGNKIT_DEBUG=1


class RecipeError(UserError):
    def __init__(self, source: str, problems: list[Problem]):
        self.source, self.problems = source, problems
        super().__init__(self.render())

    def render(self) -> str:
        out = [f"{self.source}: {len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}:"]
        for p in self.problems:
            where = (
                f"{self.source}:{p.where.removeprefix('line ')}"
                if p.where and p.where.startswith("line")
                else (p.where or self.source)
            )
            out.append(f"  {where}: {p.key + ': ' if p.key else ''}{p.message}")
        return "\n".join(out)


class DataError(UserError):
    """A problem in a dataset file; the message starts with `file:line` where one is known."""


class NonFinite(UserError):
    """A NaN or infinite loss, gradient, reward, KL or weight: the stage stops and is not marked complete."""


class FirstUpdateMismatch(UserError):
    """PPO's first update found the policy, its sampler or its reference disagreeing where they must be one model."""


class Stopped(Exception):
    """SIGTERM or Ctrl-C stopped the run; `exit_status` is 128 + the signal's number (143, 130)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.exit_status = signum, 128 + signum


class WaitingForRankings(Exception):
    """A round ranked by people has too few rankings yet: the run stops (exit status 3, WAITING), saying how many are
    ranked, how many it needs and how to rank them; the same command goes on once they are there."""

    exit_status = 3


class UnsafeFile(UserError):
    """A file in a run or model folder that torch refuses to unpickle with weights_only=True: it could run code."""


def unsafe_file(where: str, folders) -> UnsafeFile:
    """The error for a pickle refused while loading `where` (a stage, a model): names the first refused file found in
    `folders`, which is never loaded."""
    from .files import unsafe_pickles

    found = next((path for folder in folders if folder for path in unsafe_pickles(folder)), None)
    what = f"{found} holds" if found else "a file it loads holds"
    return UnsafeFile(
        f"{where}: {what} a pickle that torch refuses to load safely (it could run code on this machine), so nothing "
        "was loaded from it. If you did not write this folder yourself, do not use it; if you did, delete that file "
        "(or the whole checkpoint) and run again"
    )


class DiskFull(UserError):
    """No space left (ENOSPC) or over quota (EDQUOT) while writing: what was kept and what to do."""


def is_disk_full(error: BaseException) -> OSError | None:
    """The OSError behind `error` (itself, or what caused it: libraries wrap it) that says the disk or the quota is
    full, else None. Torch's shared-memory errors (/dev/shm) say ENOSPC too but are about memory, not the disk."""
    import errno

    seen = set()
    while error is not None and id(error) not in seen and not isinstance(error, UserError):
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f"{error.filename or ''} {error}"
            if "/dev/shm" not in where and "torch_" not in str(error.filename or ""):
                return error
        text = str(error)
        if "No space left on device" in text or "Disk quota exceeded" in text:  # wrapped by safetensors, torch
            if "/dev/shm" not in text:
                return error if isinstance(error, OSError) else OSError(errno.ENOSPC, text)
        error = error.__cause__ or error.__context__
    return None


def utf8_error(data: bytes, e: UnicodeDecodeError) -> tuple[int, str]:
    """The line of the first byte of `data` that is not UTF-8, and what to say about it."""
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - data.rfind(b"\n", 0, e.start)
    return line, (
        f"not UTF-8 text: byte 0x{data[e.start]:02x} at column {column} cannot be decoded ({e.reason}); "
        "save the file as UTF-8"
    )
