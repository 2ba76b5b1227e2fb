"""Everything checked before any weights load: local paths, the model's config (built on the meta device), its chat
template (rendered on a sample conversation), quantization settings, the machine."""

from __future__ import annotations

from pathlib import Path

from .errors import Problem, utf8_error
from .schema import CONTEXT_KEYS, DATA_SUFFIXES, is_template_file, resolve_path
from .typecheck import non_finite, show, unknown_keys


def check_local(
    value,
    key,
    base: Path,
    problems,
    folder: str | None = None,
    always_local: bool = False,
    suffixes=tuple(DATA_SUFFIXES),
) -> None:
    """Report a local path that does not exist, or is a file where `folder` (what the folder holds) is expected, or a
    folder where a file (one of `suffixes`) is. Hub ids (`name` or `owner/name`) are left for load time."""
    if not isinstance(value, str):
        return  # None, or a wrong type that is reported already
    found = resolve_path(value, base)
    if found is None:
        if always_local or not is_hub_id(value, base):
            what = "folder" if folder else "file"
            problems.append(
                Problem(
                    key,
                    f"{what} not found: {value} (looked in {Path.cwd()} and {base.resolve()}); "
                    "fix the path, or give a Hub id as owner/name",
                )
            )
    elif folder and not found.is_dir():
        problems.append(
            Problem(key, f"{value} is a file, but {folder} is expected here; give the folder that holds it")
        )
    elif not folder and not found.is_file():
        inside = (
            sorted(p.name for p in found.iterdir() if p.is_file() and p.suffix in suffixes) if found.is_dir() else []
        )
        problems.append(
            Problem(
                key,
                f"{value} is {'a folder' if found.is_dir() else 'not a regular file'}, but a "
                f"file is expected here; name a file" + (f" in it, e.g. {Path(value) / inside[0]}" if inside else ""),
            )
        )


def is_hub_id(value: str, base: Path = Path(".")) -> bool:
    """`name` or `owner/name` that names nothing on this machine: a Hub model or dataset."""
    return (
        resolve_path(value, base) is None
        and not value.startswith((".", "/", "~"))
        and value.count("/") <= 1
        and Path(value).suffix not in DATA_SUFFIXES
    )


def is_repo_id(value: str) -> bool:
    """`owner/name`, as a Hub repo to create must be named."""
    return value.count("/") == 1 and all(value.split("/"))


def _not_a_causal_lm(model_type: str) -> str | None:
    """Why transformers' `model_type` is no decoder-only causal LM, or None when it is one.

    AutoModelForCausalLM's mapping alone is not enough: it also maps encoders (bert, roberta: a head that sees the
    tokens after each position unless the model is rebuilt as a decoder) and the decoder halves of encoder-decoder
    models (bart, marian). So a type must be in the causal-LM mapping and in neither the masked-LM nor the
    seq2seq mapping."""
    from transformers.models.auto import modeling_auto as auto

    if model_type in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "is an encoder-decoder architecture"
    if model_type not in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "has no causal language model in transformers"
    if model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "is an encoder (a masked LM): its causal-LM head would see the tokens it is to predict"
    return None


CAUSAL_FIX = "alignkit trains decoder-only causal LMs: use one such as gpt2, llama, opt or gpt_neox"


def _context_length(values: dict) -> int | None:
    return next((values[k] for k in CONTEXT_KEYS if isinstance(values.get(k), int) and values[k] > 0), None)


def check_local_model(folder: Path, problems) -> tuple[int, str] | None:
    """A local model folder's architecture (a causal LM) and context length, from its config.json."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # no readable config.json (an adapter folder, say): loading the model tells
    if not isinstance(config, dict):
        return None
    model_type = config.get("model_type")
    if isinstance(model_type, str) and (why := _not_a_causal_lm(model_type)):
        problems.append(
            Problem("model.name_or_path", f"its config.json says model_type {model_type!r}, which {why}; {CAUSAL_FIX}")
        )
    context = _context_length(config)
    return (context, f"{folder / 'config.json'}") if context else None


def check_model_config(config: dict, problems) -> tuple[int, str] | None:
    """Check model.config as far as possible without weights: known keys, a causal LM, and that the model builds (on
    PyTorch's meta device, which allocates nothing). Returns its context length and where it comes from."""
    from transformers import AutoConfig

    model_type = config.get("model_type")
    if not model_type:
        problems.append(Problem("model.config.model_type", "required: the architecture, e.g. gpt2"))
        return None
    try:
        defaults = AutoConfig.for_model(model_type).to_dict()
    except (ValueError, TypeError):  # an unknown (or unhashable) name
        problems.append(Problem("model.config.model_type", f"unknown architecture {model_type!r}; e.g. gpt2"))
        return None
    start = len(problems)
    unknown_keys({k: v for k, v in config.items()}, defaults, "model.config", f"{model_type}'s config", problems)
    for name, value in config.items():
        if non_finite(value):
            problems.append(
                Problem(
                    f"model.config.{name}",
                    f"expected finite numbers, got {show(value)}; write a "
                    "number (YAML reads .nan and .inf as not-a-number and "
                    "infinity)",
                )
            )
    why = _not_a_causal_lm(model_type)
    if why:
        problems.append(Problem("model.config.model_type", f"{model_type!r} {why}; {CAUSAL_FIX}"))
    if len(problems) > start:
        return None
    settings = {k: v for k, v in config.items() if k != "model_type"}
    try:
        built = AutoConfig.for_model(model_type, **settings)
    except (ValueError, TypeError, AttributeError, ArithmeticError, *_strict_dataclass_errors()) as e:
        # the config class's own validation of the settings
        problems.append(
            Problem(
                "model.config",
                f"{model_type}'s config refused these settings: {_one_line(e)}; fix them as it says",
                cause=e,
            )
        )
        return None
    refusal, cause = _build_on_meta(built)
    if refusal:
        problems.append(
            Problem(
                "model.config", f"a {model_type} model cannot be built from these settings: {refusal}", cause=cause
            )
        )
        return None
    context = _context_length(built.to_dict())
    return (context, f"model.config's {next(k for k in CONTEXT_KEYS if k in built.to_dict())}") if context else None


def _strict_dataclass_errors() -> tuple[type, ...]:
    """huggingface_hub's validation errors, which some config classes raise (and which are not ValueErrors)."""
    try:
        from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
    except ImportError:  # an older huggingface_hub: its config classes raise ValueError
        return ()
    return StrictDataclassClassValidationError, StrictDataclassFieldValidationError


def _build_on_meta(config) -> tuple[str | None, BaseException | None]:
    """Instantiate the causal LM on the meta device (shapes only, no memory); what goes wrong (and the error behind
    it), or (None, None)."""
    import logging

    import torch
    from transformers import AutoModelForCausalLM

    class Notes(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    # Encoder LM heads say "add `is_decoder=True`" and build anyway; they would see the tokens they are to predict.
    # Their warnings are collected here instead of printed: the verdict below says what matters.
    logger, notes = logging.getLogger("transformers"), Notes()
    level, handlers = logger.level, logger.handlers
    logger.handlers = [notes]
    logger.setLevel(logging.WARNING)
    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config)
    except (RuntimeError, NotImplementedError) as e:
        if "meta" not in str(e):  # e.g. a negative size; what the meta device cannot do is left to the real build
            return f"{_one_line(e)}; fix the sizes in model.config", e
    except (ValueError, AssertionError, ArithmeticError, TypeError) as e:  # the layers' checks of their shapes
        return f"{_one_line(e)}; fix model.config as the message says (e.g. n_embd divisible by n_head)", e
    finally:
        logger.handlers = handlers
        logger.setLevel(level)
    if any("is_decoder" in m for m in notes.messages):
        return (
            f"its causal-LM class is an encoder's head, which would see the tokens it is to predict; {CAUSAL_FIX}"
        ), None
    return None, None


def _one_line(e: BaseException) -> str:
    """An error's message on one line, without a closing period (the fix follows it)."""
    return " ".join(str(e).split()).rstrip(".") or type(e).__name__


# A small conversation for checking a chat template, in the shapes alignkit renders: a whole chat (training) and a
# prompt that asks for the answer (PPO, evaluation). Placeholder special tokens, as a tokenizer would pass its own.
SAMPLE_CHAT = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
]

SAMPLE_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def check_chat_template(value: str, base: Path, problems: list[Problem]) -> None:
    """Compile model.chat_template (inline, or a file) and render the sample chat in transformers' own sandbox (the
    environment apply_chat_template uses), so that a template that breaks is named here, not in a stage's traceback."""
    import jinja2
    from transformers.utils import chat_template_utils

    read = _template_text(value, base, problems)
    if read is None:
        return
    template, where = read
    try:
        compiled = chat_template_utils._compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as e:
        problems.append(
            Problem(
                "model.chat_template",
                f"not a valid Jinja template: {(e.message or '').rstrip('.')}{_at(where, e.lineno)}; fix its syntax",
            )
        )
        return
    if not _reaches_internals(template, compiled.environment, where, problems):
        _check_rendering(template, where, problems)


def _template_text(value: str, base: Path, problems: list[Problem]) -> tuple[str, str] | None:
    """The template's text and how to name a line of it; None where the file is missing or not UTF-8."""
    if not is_template_file(value):
        return value, "line {} of the template"
    local = resolve_path(value, base)
    if local is None or not local.is_file():
        return None  # reported by check_local
    data = local.read_bytes()
    try:
        return data.decode("utf-8"), f"{value}:{{}}"
    except UnicodeDecodeError as e:
        line, what = utf8_error(data, e)
        problems.append(Problem("model.chat_template", f"{value}:{line}: {what}"))
        return None


def _at(where: str, n: int | None) -> str:
    return f" ({where.format(n)})" if n else ""


def _reaches_internals(template: str, environment, where: str, problems: list[Problem]) -> bool:
    """The sandbox turns a dunder attribute (''.__class__) into an empty value instead of failing: name it here."""
    import jinja2

    nodes = jinja2.nodes
    for node in environment.parse(template).find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        if isinstance(node, nodes.Getattr):
            name = node.attr
        elif isinstance(node, nodes.Getitem):
            name = node.arg.value if isinstance(node.arg, nodes.Const) else None
        else:
            name = (
                node.args[0].value
                if node.name == "attr" and node.args and isinstance(node.args[0], nodes.Const)
                else None
            )
        if isinstance(name, str) and name.startswith("__"):
            problems.append(
                Problem(
                    "model.chat_template",
                    f"reads {name!r}{_at(where, node.lineno)}, which transformers' sandbox refuses (a "
                    "template may not reach Python internals); remove it: a chat template reads "
                    "messages, add_generation_prompt and the special tokens",
                )
            )
            return True
    return False


def _check_rendering(template: str, where: str, problems: list[Problem]) -> None:
    """Render the sample chat, whole and as a prompt, with and (if the template refuses one) without a system turn."""
    import traceback

    import jinja2
    from transformers.utils import chat_template_utils

    def render(chat: list[dict], generation_prompt: bool) -> str:
        rendered, _ = chat_template_utils.render_jinja_template(
            conversations=[chat], chat_template=template, add_generation_prompt=generation_prompt, **SAMPLE_TOKENS
        )
        return rendered[0]

    try:
        try:
            whole = render(SAMPLE_CHAT, False)
            render(SAMPLE_CHAT[:2], True)
        except jinja2.TemplateError as e:
            if type(e) is not jinja2.TemplateError:  # only raise_exception() raises the base class
                raise
            whole = render(SAMPLE_CHAT[1:], False)  # the template refuses a system turn, as some do: try without
            render(SAMPLE_CHAT[1:2], True)
    except (
        jinja2.TemplateError,
        TypeError,
        ValueError,
        ArithmeticError,
        LookupError,
        AttributeError,
        RecursionError,
    ) as e:
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == "<template>"]
        line = getattr(e, "lineno", None) or (lines[-1] if lines else None)
        problems.append(
            Problem(
                "model.chat_template",
                f"fails to render a sample chat (system, user, assistant) in transformers' "
                f"sandbox: {type(e).__name__}: {_one_line(e)}{_at(where, line)}; fix the template",
            )
        )
        return
    if not all(m["content"] in whole for m in SAMPLE_CHAT[1:]):
        problems.append(
            Problem(
                "model.chat_template",
                "renders a sample chat without its messages' text; a chat template must write "
                "each message's content (it gets them as `messages`, each {role, content})",
            )
        )


def check_quantization(settings: dict, problems, key: str = "quantization") -> None:
    import inspect

    from transformers import BitsAndBytesConfig

    known = [p for p in inspect.signature(BitsAndBytesConfig.__init__).parameters if p not in ("self", "kwargs")]
    unknown_keys(settings, known, key, "BitsAndBytesConfig", problems)
    if not (settings.get("load_in_4bit") or settings.get("load_in_8bit")):
        problems.append(Problem(key, "set load_in_4bit: true or load_in_8bit: true"))
    elif settings.get("load_in_4bit") and settings.get("load_in_8bit"):
        problems.append(
            Problem(
                key,
                "load_in_4bit and load_in_8bit are both set; a model loads in one of them: "
                "remove one (4-bit for QLoRA)",
            )
        )
    for name, value in settings.items():
        if non_finite(value):
            problems.append(Problem(f"{key}.{name}", f"expected a finite number, got {show(value)}; write a number"))


def has_accelerator() -> bool:
    """A GPU (CUDA or ROCm), an Intel XPU or Apple's MPS."""
    import torch

    return (
        torch.cuda.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
        or torch.backends.mps.is_available()
    )


def machine_settings(settings: dict) -> dict:
    """Settings this machine needs. TRL turns bf16 on by default, which transformers refuses on a machine with no
    accelerator unless use_cpu is set; there it means bf16 autocast on the CPU."""
    if "use_cpu" in settings:
        return {}
    return {} if has_accelerator() else {"use_cpu": True}
