"""One log line format for every stage: `[alignkit] sft: message`."""

import sys


def log(stage: str, message: str) -> None:
    print(f"[alignkit] {stage + ': ' if stage else ''}{message}", file=sys.stderr, flush=True)
