"""One log line format for every stage, `[alignkit] sft: message`, in lines that fit a terminal 100 columns wide."""

import sys
import textwrap

from .distributed import is_main

WIDTH = 100  # columns; a longer message goes on over indented lines
INDENT = "    "
_KEEP = "\xa0"  # a space that wrap() never breaks a line at, printed as a space


def log(stage: str, message: str) -> None:
    if not is_main():  # one process of many speaks for all
        return
    print(wrap(f"[alignkit] {stage + ': ' if stage else ''}{message}"), file=sys.stderr, flush=True)


def keep(text: str) -> str:
    """`text` kept on one line by wrap(), e.g. a figure and its value: "kl 0.27"."""
    return text.replace(" ", _KEEP)


def wrap(text: str, width: int = WIDTH) -> str:
    """`text` broken at spaces into lines of at most `width` columns, each line after the first of a paragraph
    indented; a word longer than a line (a long path) stays whole, so that it can be copied."""
    lines = []
    for paragraph in text.split("\n"):
        lead = paragraph[: len(paragraph) - len(paragraph.lstrip(" "))]
        lines += textwrap.wrap(
            paragraph, width, subsequent_indent=lead + INDENT, break_long_words=False, break_on_hyphens=False
        ) or [paragraph]
    return "\n".join(lines).replace(_KEEP, " ")
