"""LoRA's `target_modules` checked against the model's own module names before any weights load.

The model's skeleton is built on PyTorch's meta device (shapes only, nothing allocated), so `validate` can say that
Llama's `[q_proj, v_proj]` match nothing in GPT-2, and which names would, instead of peft saying so after the stages
before it have trained.
"""

from __future__ import annotations

import difflib
import re

from .errors import Problem
from .schema import Range, above, at_least, between

# What peft's LoraConfig numbers must be (peft declares no ranges).
RANGES: dict[str, Range] = {
    "r": at_least(1, "LoRA's rank"),
    "lora_alpha": above(0),
    "lora_dropout": between(0, 1, right_open=True),
}

# the layer kinds LoRA can wrap (peft's LoRA layers); matching anything else is refused when the adapter is made
ADAPTABLE = {"Linear", "Conv1D", "Conv1d", "Conv2d", "Conv3d", "Embedding", "MultiheadAttention", "Linear4bit"}


def layer_names(config) -> dict[str, str]:
    """{module name: its class name} for a causal LM built from `config` on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: type(module).__name__ for name, module in model.named_modules() if name}


def _matches(target, name: str) -> bool:
    """peft's rule, as its documentation gives it: a string is a regular expression the whole name must match; a list
    names modules by their full name or their last dotted parts."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in target)


def check(targets, layers: dict[str, str], model_type: str, key: str, problems: list[Problem]) -> None:
    """Report `targets` (a LoRA block's target_modules) that match no module, or only modules LoRA cannot wrap, with
    the names the model has that would do."""
    if targets is None or targets == "all-linear":
        if targets is None:
            from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

            if model_type not in DEFAULTS:
                problems.append(
                    Problem(
                        key,
                        f"peft has no default target_modules for {model_type}; name them, e.g. "
                        f"[{', '.join(_suggestions(layers)[:4])}]",
                    )
                )
        return
    adaptable = sorted({n.rsplit(".", 1)[-1] for n, kind in layers.items() if kind in ADAPTABLE})
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            problems.append(Problem(key, f"{targets!r} is not a regular expression ({e}); or give a list of names"))
            return
        matched = [n for n in layers if _matches(targets, n)]
        if not matched:
            problems.append(
                Problem(
                    key,
                    f"the pattern {targets!r} matches no module of this {model_type} model; its layers "
                    f"LoRA can adapt are {', '.join(adaptable)}",
                )
            )
        return
    for target in targets:
        matched = [n for n in layers if _matches([target], n)]
        if not matched:
            hint = difflib.get_close_matches(str(target), adaptable, n=1)
            problems.append(
                Problem(
                    key,
                    f"{target!r} matches no module of this {model_type} model; "
                    + (f"did you mean {hint[0]}? " if hint else "")
                    + f"its layers LoRA can adapt are {', '.join(adaptable)}",
                )
            )
        elif not any(layers[n] in ADAPTABLE for n in matched):
            problems.append(
                Problem(
                    key,
                    f"{target!r} names {layers[matched[0]]} modules, which LoRA cannot adapt; "
                    f"its layers LoRA can adapt are {', '.join(adaptable)}",
                )
            )


def _suggestions(layers: dict[str, str]) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, kind in layers.items() if kind in ADAPTABLE})
