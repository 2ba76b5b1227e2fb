"""One log line format for every stage: `[alignkit] sft: message`."""

import os
import sys


def log(stage: str, message: str) -> None:
    if os.environ.get("RANK", "0") != "0":  # one process of many speaks for all
        return
    print(f"[alignkit] {stage + ': ' if stage else ''}{message}", file=sys.stderr, flush=True)
