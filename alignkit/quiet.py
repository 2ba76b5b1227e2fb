"""What the libraries print that no user can act on, or that alignkit's own lines say instead: hidden while a command
runs, unless `alignkit --verbose`. Every muted line is listed here with the reason."""

from __future__ import annotations

import logging
import os
import re
import warnings
from contextlib import contextmanager

# Loggers below ERROR: both speak at import, which every command does, about a CPU kernel alignkit never asks for.
MUTED_LOGGERS = {
    "kernels": "'Skipping publisher trust check ... offline mode' for bitsandbytes' CPU kernel, at every import",
    "bitsandbytes": "'Failed to load CPU gemm_4bit_forward' and the like: it falls back to its own CPU kernels",
}
# (logger, message pattern): the lines alignkit's own log replaces, or that name no step a user can take.
MUTED_MESSAGES = [
    # TRL's PPO loop and the value model call models without a mask on padded batches; alignkit masks its own calls
    ("transformers.modeling_utils", r"We strongly recommend passing in an `attention_mask`"),
    ("transformers.generation.utils", r"The attention mask (and the pad token id were not set|is not set)"),
    # alignkit counts over-long rows itself and says what happens to them (data.check_lengths, evaluation)
    ("transformers.tokenization_utils_base", r"Token indices sequence length is longer than"),
]
# (category, message pattern) of Python warnings.
MUTED_WARNINGS = [
    (UserWarning, r".*experimental.*"),
    (UserWarning, r".*pin_memory.*"),
    # GPT-2's Conv1D layers: peft sets fan_in_fan_out itself and says so for every stage
    (UserWarning, r".*fan_in_fan_out.*"),
    # TRL 1.12's configs set transformers' renamed gradient_checkpointing field themselves
    (FutureWarning, r".*gradient_checkpointing.*deprecated.*"),
]


class _Muted(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


@contextmanager
def quiet(verbose: bool = False):
    """Mute the lines above for the duration of a command (set before the libraries import, so that import-time lines
    are caught too); `verbose` leaves everything as the libraries have it. Everything is restored on the way out."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' fork warning, and its deadlock
    if verbose:
        yield
        return
    levels = {name: logging.getLogger(name).level for name in MUTED_LOGGERS}
    by_logger: dict[str, list[str]] = {}
    for name, pattern in MUTED_MESSAGES:
        by_logger.setdefault(name, []).append(pattern)
    filters = {name: _Muted(patterns) for name, patterns in by_logger.items()}
    for name in MUTED_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name, muted in filters.items():  # a logger's own filter sees every record made on it, handler or not
        logging.getLogger(name).addFilter(muted)
    try:
        with warnings.catch_warnings():
            for category, pattern in MUTED_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern, category=category)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for name, muted in filters.items():
            logging.getLogger(name).removeFilter(muted)
        _restore_bars()


_bars: dict | None = None  # the libraries' progress-bar switches before hide_progress_bars(), to restore


def hide_progress_bars(verbose: bool = False) -> None:
    """alignkit's own lines say what is loading and training; datasets' bar for every map and transformers' 'Loading
    weights' bar for every model hide them. Download bars (huggingface_hub's) stay: a download can take minutes."""
    global _bars
    if verbose or _bars is not None:
        return
    import datasets
    import huggingface_hub.utils as hub
    from transformers.utils import logging as transformers_logging

    _bars = {
        "datasets": datasets.is_progress_bar_enabled(),
        "transformers": transformers_logging.is_progress_bar_enabled(),
        "hub": not hub.are_progress_bars_disabled(),
    }
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()  # turns the hub's off too
    if _bars["hub"]:
        hub.enable_progress_bars()


def _restore_bars() -> None:
    global _bars
    if _bars is None:
        return
    import datasets
    import huggingface_hub.utils as hub
    from transformers.utils import logging as transformers_logging

    if _bars["datasets"]:
        datasets.enable_progress_bars()
    if _bars["transformers"]:
        transformers_logging.enable_progress_bar()
    if not _bars["hub"]:
        hub.disable_progress_bars()
    _bars = None
