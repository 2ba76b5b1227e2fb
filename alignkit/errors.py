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
