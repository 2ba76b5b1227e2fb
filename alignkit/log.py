"""One log line format for every stage: `[alignkit] sft: message`."""

import sys

from .distributed import is_main


def log(stage: str, message: str) -> None:
    if not is_main():  # one process of many speaks for all
        return
    print(f"[alignkit] {stage + ': ' if stage else ''}{message}", file=sys.stderr, flush=True)
