"""Models and tokenizers: load or build them, fix GPT-2's pitfalls up front, LoRA / 4-bit settings, save outputs.

GPT-2 has no pad token and no chat template. Padding with EOS hides EOS from the loss (the model never learns to stop),
and makes a PPO that finds an answer's end by the pad token read the reward before EOS and treat EOS as padding. So
alignkit gives every tokenizer a pad token of its own and a chat template that ends each assistant turn with EOS.
"""

from __future__ import annotations

from pathlib import Path

from .distributed import is_main
from .errors import UserError
from .log import log
from .schema import Recipe, is_template_file

PAD_TOKEN = "<|pad|>"
# Ends every assistant turn with EOS and nothing after it, so a reward model reads its score at EOS both in TRL's
# RewardTrainer (whole chats) and in PPO (responses cut after EOS). Marks answers for TRL's assistant_only_loss.
# A newline (not a space) follows "Assistant:", so the prompt's tokens are a prefix of prompt + answer under
# byte-level BPE.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'User: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'Assistant:\\n' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:\\n' }}{%- endif -%}"
)


def _where(recipe: Recipe, path: str) -> str:
    return str(recipe.resolve(path))


def load_tokenizer(recipe: Recipe, source: str | None = None):
    """The tokenizer of an upstream stage folder, or of the recipe's base model, with pad token and chat template."""
    from transformers import AutoTokenizer

    path = source or recipe.model.tokenizer or recipe.model.name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            _where(recipe, path), revision=None if source else recipe.model.revision
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load the tokenizer {path!r}: {str(e).splitlines()[0]}\n"
            "  fix model.tokenizer / model.name_or_path (a local folder, or a Hub id reachable from here; "
            "HF_HUB_OFFLINE=1 forbids downloads)"
        ) from e
    return prepare_tokenizer(tokenizer, recipe)


def prepare_tokenizer(tokenizer, recipe: Recipe):
    if tokenizer.eos_token is None:
        raise UserError(
            f"the tokenizer of {recipe.model.tokenizer or recipe.model.name_or_path} has no EOS token; "
            "alignkit needs one to end answers"
        )
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if PAD_TOKEN in tokenizer.get_vocab():
            tokenizer.pad_token = PAD_TOKEN
        else:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        log("", f"tokenizer: added pad token {PAD_TOKEN!r} (id {tokenizer.pad_token_id}), distinct from EOS")
    template = recipe.model.chat_template
    if template:  # the recipe's template replaces the tokenizer's own
        if is_template_file(template):
            template = recipe.resolve(template).read_text(encoding="utf-8")
        if tokenizer.chat_template and tokenizer.chat_template != template:
            log("", "tokenizer: its chat template replaced by model.chat_template")
        tokenizer.chat_template = template
    elif not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def free_accelerator_memory() -> None:
    """Give the memory of models no longer referenced back (between a stage's training and what follows it)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def context_length(config) -> int:
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return 1024


def built_config(recipe: Recipe, tokenizer):
    """The config of the untrained model that `model.config` describes, sized to the tokenizer."""
    from transformers import AutoConfig

    settings = dict(recipe.model.config)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def build_model(recipe: Recipe, tokenizer, dropout: bool = True):
    """An untrained causal LM from `model.config`, sized to the tokenizer, initialised from the recipe's seed; with
    `dropout` False every dropout probability in its config is 0 (the initial weights are the same)."""
    from transformers import AutoModelForCausalLM, set_seed

    config = built_config(recipe, tokenizer)
    if not dropout:
        for key in dropout_settings(config):
            setattr(config, key, 0.0)
    set_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(config)
    log("", f"built an untrained {config.model_type} with {sum(p.numel() for p in model.parameters()):,} parameters")
    return fit_to_tokenizer(model, tokenizer, recipe.model.fused_gelu)


def _load_kwargs(recipe: Recipe, path: str, stage: str | None, dropout: bool = True) -> dict:
    kwargs = {"revision": recipe.model.revision} if path == recipe.model.name_or_path else {}
    quantization = recipe.adapters(stage)[1] if stage else None
    if quantization:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(**quantization)
    if not dropout:
        # set before the model is built: some architectures (OPT) apply dropout from their config, functionally,
        # where no later switch on the modules reaches
        kwargs["config"] = config = read_config(recipe, path)
        for key in dropout_settings(config):
            setattr(config, key, 0.0)
    return kwargs


def dropout_settings(config) -> dict[str, float]:
    """The dropout probabilities a model config sets, whatever the architecture names them (GPT-2's resid_pdrop,
    OPT's dropout and attention_dropout, BERT-style hidden_dropout_prob, ...)."""
    return {
        k: v
        for k, v in config.to_dict().items()
        if isinstance(v, float) and not isinstance(v, bool) and ("dropout" in k or k.endswith("pdrop")) and v > 0
    }


def restore_dropout(model, settings: dict[str, float]) -> None:
    """Put back in `model`'s config the dropout probabilities a stage trained without (`dropout_settings` of the
    config it came with), so that the saved model hands them on to the stages after it."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for key, value in settings.items():
        setattr(inner.config, key, value)


def read_config(recipe: Recipe, path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            _where(recipe, path), revision=recipe.model.revision if path == recipe.model.name_or_path else None
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load the model {path!r}: {str(e).splitlines()[0]}\n"
            "  give a folder that holds a whole model (config.json and its weights) or a Hub id reachable "
            "from here"
        ) from e


def load_causal_lm(recipe: Recipe, path: str, tokenizer, stage: str | None = None, dropout: bool = True):
    """A causal LM from a folder or Hub id; quantized as `stage`'s settings say (full precision without a stage);
    with `dropout` False every dropout probability in its config is 0."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, recipe, path, _load_kwargs(recipe, path, stage, dropout))
    return fit_to_tokenizer(model, tokenizer, recipe.model.fused_gelu)


def _from_pretrained(cls, recipe: Recipe, path: str, kwargs: dict):
    """cls.from_pretrained, with a folder or Hub id that holds no loadable model (no weights, an unreachable id)
    reported as bad input that names it."""
    try:
        return cls.from_pretrained(_where(recipe, path), **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load the model {path!r}: {str(e).splitlines()[0]}\n"
            "  give a folder that holds a whole model (config.json and its weights) or a Hub id reachable "
            "from here"
        ) from e


def load_reward_model(recipe: Recipe, path: str, tokenizer, stage: str | None = None, dropout: bool = True):
    """A one-output sequence classifier; from a causal LM folder its score head starts untrained."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "score.weight newly initialized" is expected from an LM
    try:
        kwargs = _load_kwargs(recipe, path, stage, dropout)
        if "config" in kwargs:  # given a config object, from_pretrained takes no config settings beside it
            kwargs["config"].num_labels = 1
        else:
            kwargs["num_labels"] = 1
        model = _from_pretrained(AutoModelForSequenceClassification, recipe, path, kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    return fit_to_tokenizer(model, tokenizer, recipe.model.fused_gelu)


def fit_to_tokenizer(model, tokenizer, gelu: bool = True):
    """Grow the embeddings for an added pad token; tell config and generation which ids are pad and EOS; with
    `gelu` (the recipe's model.fused_gelu), compute GPT-2's activation in one kernel (fused_gelu)."""
    if gelu:
        fused_gelu(model)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def fused_gelu(model) -> int:
    """Replace transformers' `gelu_new` modules (GPT-2's GELU, the tanh approximation written as seven elementwise
    operations, each with its own backward) by `gelu_pytorch_tanh`: the same function in one torch kernel, equal to
    within 5e-7, and 1.20x on the chat recipe's reward stage (docs/benchmarks.md). The config says so,
    so the saved model loads with it. Returns how many were replaced."""
    from transformers.activations import GELUTanh, NewGELUActivation

    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())
                swapped += 1
    if swapped:
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            for key in ("activation_function", "hidden_act"):
                if getattr(config, key, None) == "gelu_new":
                    setattr(config, key, "gelu_pytorch_tanh")
        if not _said_gelu:
            _said_gelu.append(True)
            log(
                "",
                f"{model.config.model_type}: gelu_new computed as gelu_pytorch_tanh (the same function, one kernel)",
            )
    return swapped


_said_gelu: list = []  # said once per process


def lora_config(recipe: Recipe, stage: str, task_type: str):
    lora = recipe.adapters(stage)[0]
    if lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(task_type=task_type, **lora)


def save(trainer, tokenizer, folder: Path, recipe: Recipe, base: str | None = None, reward: bool = False) -> None:
    """Write a stage's trained model so that plain transformers loads it.

    Every process calls this: the trainer's save_model gathers weights that DeepSpeed ZeRO-3 or FSDP shard, and
    writes on the main process only. A LoRA-trained model is written twice: its adapter in {folder}/adapter (for
    peft), and merged into full-precision weights of its `base` in {folder} (merging into 4-bit weights would round
    the update away).
    """
    from peft import PeftModel

    model = trainer.accelerator.unwrap_model(trainer.model)
    ppo = hasattr(model, "policy")  # PPO trains policy and value together; the policy is the output
    model = model.policy if ppo else model
    adapter = isinstance(model, PeftModel)
    target = folder / "adapter" if adapter else folder
    if not ppo:
        trainer.save_model(str(target))
    elif is_main():  # TRL 1.12's PPOTrainer.save_model fails off the main process; under DDP the policy is whole
        model.save_pretrained(target)
    if not is_main():
        return
    (folder / "training_args.bin").unlink(missing_ok=True)
    if adapter:
        (folder / "adapter" / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(folder / "adapter")
        load = load_reward_model if reward else load_causal_lm
        full = load(recipe, base, tokenizer)
        PeftModel.from_pretrained(full, folder / "adapter").merge_and_unload().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
