"""Malformed recipes and data: every one is refused with exit status 2 and a message that names the file and line or
the key, what was expected and the fix; never a traceback, and nothing is written to the run's folder.

Each case starts from recipes/tiny.yaml as data (its datasets in data/tiny/), written to tmp_path with output_dir
there, and changes one thing: a key set or removed, the YAML text edited, or a dataset file written in tmp_path. Most
go through `alignkit validate`; a share goes through `alignkit run`, which must refuse them before any model loads.
"""

import copy
import json
import pickle
import re

import pytest
import yaml
from conftest import REPO, TINY, alignkit

NAN, INF = float("nan"), float("inf")


class Ctx:
    """What a case changes: the recipe as data, edits to its YAML text, files beside it."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.recipe = yaml.safe_load(TINY.read_text())
        self.recipe["output_dir"] = str(tmp_path / "run")
        self.edits = []

    def file(self, name: str, content) -> str:
        path = self.tmp / name
        content = content(self.tmp) if callable(content) else content
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)


def _node(recipe: dict, key: str):
    *parents, last = key.split(".")
    for part in parents:
        recipe = recipe.setdefault(part, {})
    return recipe, last


def put(key: str, value):
    """Set a dotted key; a callable value gets the Ctx (for paths made in tmp_path)."""

    def mutate(c):
        node, last = _node(c.recipe, key)
        node[last] = value(c) if callable(value) else copy.deepcopy(value)  # cases share their values

    return mutate


def drop(*keys: str):
    def mutate(c):
        for key in keys:
            node, last = _node(c.recipe, key)
            del node[last]

    return mutate


def edit(change):
    """Change the recipe's YAML text (str -> str or bytes)."""
    return lambda c: c.edits.append(change)


def data(key: str, name: str, content, **spec):
    """Write a dataset file into tmp_path and point `key` (a dataset section) at it."""

    def mutate(c):
        node, last = _node(c.recipe, key)
        node[last] = {"path": c.file(name, content), **spec}

    return mutate


def chain(*mutations):
    def mutate(c):
        for m in mutations:
            m(c)

    return mutate


def jsonl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def parquet(tmp, cut: bool = False) -> bytes:
    import pyarrow
    import pyarrow.parquet

    path = tmp / "whole.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"prompt": ["What is two plus two?"] * 20}), path)
    raw = path.read_bytes()
    return raw[: len(raw) // 2] if cut else raw[:4] + b"\x00" * (len(raw) - 8) + raw[-4:]


PICKLE = pickle.dumps([{"prompt": "hi"}])
PROMPT = {"prompt": [{"role": "user", "content": "What is two plus two?"}]}
EVAL = put("eval", {"dataset": {"path": "data/tiny/ppo.jsonl"}, "max_new_tokens": 8})
NO_PRETRAIN = drop("stages.pretrain")
PRETRAINED = chain(drop("model.config", "stages.pretrain"))  # model.name_or_path set by the case


def model_folder(config: dict):
    """A local model folder holding only config.json."""

    def make(c):
        folder = c.tmp / "model"
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config))
        return str(folder)

    return make


def dup_first(text: str, key: str) -> str:
    """Write the first line that sets `key` twice, the second time with another value."""
    match = re.search(rf"^( *){key}: .*$", text, flags=re.M)
    return text[: match.end()] + f"\n{match.group(1)}{key}: 7" + text[match.end() :]


def key(k):
    return ("key", k)


def line():
    return ("line", None)


def cli(k):
    return ("cli", k)


def data_file(name, stage_key):
    return ("data", (name, stage_key))


# (id, change, where the message must point, what it must say: the problem and the fix)
VALIDATE = [
    # --- numeric ranges: alignkit's keys
    ("seed-negative", put("seed", -1), key("seed"), "must be >= 0, got -1", "remove the key to get the default (42)"),
    (
        "eval-max-new-tokens-0",
        chain(EVAL, put("eval.max_new_tokens", 0)),
        key("eval.max_new_tokens"),
        "must be >= 1, got 0",
        "set a value in that range",
    ),
    (
        "eval-batch-size-0",
        chain(EVAL, put("eval.batch_size", 0)),
        key("eval.batch_size"),
        "must be >= 1, got 0",
        "default (64)",
    ),
    (
        "max-rows-0",
        put("stages.sft.dataset.max_rows", 0),
        key("stages.sft.dataset.max_rows"),
        "must be >= 1, got 0",
        "remove the key",
    ),
    (
        "eval-max-rows-negative",
        chain(EVAL, put("eval.dataset.max_rows", -3)),
        key("eval.dataset.max_rows"),
        "must be >= 1, got -3",
        "set a value in that range",
    ),
    # --- numeric ranges: TRL's keys
    (
        "sft-lr-negative",
        put("stages.sft.trainer.learning_rate", -1e-4),
        key("stages.sft.trainer.learning_rate"),
        "must be > 0, got -0.0001",
        "default (2e-05)",
    ),
    (
        "ppo-lr-0",
        put("stages.ppo.trainer.learning_rate", 0),
        key("stages.ppo.trainer.learning_rate"),
        "must be > 0, got 0",
        "set a value in that range",
    ),
    (
        "batch-size-0",
        put("stages.sft.trainer.per_device_train_batch_size", 0),
        key("stages.sft.trainer.per_device_train_batch_size"),
        "must be >= 1, got 0",
        "default (8)",
    ),
    (
        "grad-accum-0",
        put("stages.reward.trainer.gradient_accumulation_steps", 0),
        key("stages.reward.trainer.gradient_accumulation_steps"),
        "must be >= 1, got 0",
        "default (1)",
    ),
    (
        "epochs-negative",
        put("stages.pretrain.trainer.num_train_epochs", -1),
        key("stages.pretrain.trainer.num_train_epochs"),
        "must be > 0 (0 or less trains nothing), got -1",
        "default",
    ),
    (
        "epochs-0",
        put("stages.sft.trainer.num_train_epochs", 0),
        key("stages.sft.trainer.num_train_epochs"),
        "trains nothing",
        "set a value in that range",
    ),
    (
        "max-steps-0",
        put("stages.sft.trainer.max_steps", 0),
        key("stages.sft.trainer.max_steps"),
        "must be -1 (train num_train_epochs) or >= 1, got 0",
        "default (-1)",
    ),
    (
        "max-steps-negative",
        put("stages.reward.trainer.max_steps", -5),
        key("stages.reward.trainer.max_steps"),
        "got -5",
        "default (-1)",
    ),
    (
        "total-episodes-0",
        put("stages.ppo.trainer.total_episodes", 0),
        key("stages.ppo.trainer.total_episodes"),
        "must be >= 1 (0 skips PPO), got 0",
        "remove the key",
    ),
    (
        "response-length-0",
        put("stages.ppo.trainer.response_length", 0),
        key("stages.ppo.trainer.response_length"),
        "must be >= 1, got 0",
        "default (53)",
    ),
    (
        "kl-coef-negative",
        put("stages.ppo.trainer.kl_coef", -0.1),
        key("stages.ppo.trainer.kl_coef"),
        "must be >= 0, got -0.1",
        "default (0.05)",
    ),
    (
        "num-mini-batches-0",
        put("stages.ppo.trainer.num_mini_batches", 0),
        key("stages.ppo.trainer.num_mini_batches"),
        "must be >= 1 (PPO splits each rollout batch into this many), got 0",
        "default (1)",
    ),
    (
        "num-ppo-epochs-0",
        put("stages.ppo.trainer.num_ppo_epochs", 0),
        key("stages.ppo.trainer.num_ppo_epochs"),
        "must be >= 1, got 0",
        "default (4)",
    ),
    (
        "temperature-0",
        put("stages.ppo.trainer.temperature", 0),
        key("stages.ppo.trainer.temperature"),
        "must be > 0, got 0",
        "default (0.7)",
    ),
    (
        "cliprange-0",
        put("stages.ppo.trainer.cliprange", 0.0),
        key("stages.ppo.trainer.cliprange"),
        "must be > 0, got 0.0",
        "default (0.2)",
    ),
    (
        "vf-coef-negative",
        put("stages.ppo.trainer.vf_coef", -1),
        key("stages.ppo.trainer.vf_coef"),
        "must be >= 0, got -1",
        "default (0.1)",
    ),
    (
        "gamma-above-1",
        put("stages.ppo.trainer.gamma", 1.5),
        key("stages.ppo.trainer.gamma"),
        "must be in [0, 1], got 1.5",
        "default (1.0)",
    ),
    (
        "rollout-batch-0",
        put("stages.ppo.trainer.local_rollout_forward_batch_size", 0),
        key("stages.ppo.trainer.local_rollout_forward_batch_size"),
        "must be >= 1, got 0",
        "default (64)",
    ),
    (
        "sft-max-length-0",
        put("stages.sft.trainer.max_length", 0),
        key("stages.sft.trainer.max_length"),
        "must be >= 1, got 0",
        "default (1024)",
    ),
    (
        "reward-max-length-negative",
        put("stages.reward.trainer.max_length", -1),
        key("stages.reward.trainer.max_length"),
        "must be >= 1, got -1",
        "set a value in that range",
    ),
    (
        "logging-steps-0",
        put("stages.sft.trainer.logging_steps", 0),
        key("stages.sft.trainer.logging_steps"),
        "must be > 0, got 0",
        "set a value in that range",
    ),
    (
        "save-steps-negative",
        put("stages.pretrain.trainer.save_steps", -10),
        key("stages.pretrain.trainer.save_steps"),
        "must be > 0, got -10",
        "default (500",
    ),
    (
        "warmup-steps-negative",
        put("stages.sft.trainer.warmup_steps", -1),
        key("stages.sft.trainer.warmup_steps"),
        "must be >= 0 (below 1: a share of the steps), got -1",
        "set a value in that range",
    ),
    (
        "weight-decay-negative",
        put("stages.reward.trainer.weight_decay", -0.01),
        key("stages.reward.trainer.weight_decay"),
        "must be >= 0, got -0.01",
        "default (0.0)",
    ),
    (
        "max-grad-norm-negative",
        put("stages.sft.trainer.max_grad_norm", -1),
        key("stages.sft.trainer.max_grad_norm"),
        "must be >= 0, got -1",
        "default (1.0)",
    ),
    # --- NaN and infinity
    (
        "lr-nan",
        put("stages.sft.trainer.learning_rate", NAN),
        key("stages.sft.trainer.learning_rate"),
        "expected a finite number, got nan",
        "write a number",
    ),
    (
        "kl-coef-inf",
        put("stages.ppo.trainer.kl_coef", INF),
        key("stages.ppo.trainer.kl_coef"),
        "expected a finite number, got inf",
        "write a number",
    ),
    (
        "max-grad-norm-minus-inf",
        put("stages.reward.trainer.max_grad_norm", -INF),
        key("stages.reward.trainer.max_grad_norm"),
        "got -inf",
        "write a number",
    ),
    (
        "epochs-nan",
        put("stages.pretrain.trainer.num_train_epochs", NAN),
        key("stages.pretrain.trainer.num_train_epochs"),
        "finite number",
        "write a number",
    ),
    (
        "lora-dropout-nan",
        put("lora", {"r": 4, "lora_dropout": NAN}),
        key("lora.lora_dropout"),
        "expected a finite number, got nan",
        "write a number",
    ),
    (
        "model-config-inf",
        put("model.config.layer_norm_epsilon", INF),
        key("model.config.layer_norm_epsilon"),
        "expected finite numbers, got inf",
        "write a number",
    ),
    # --- the model's context
    (
        "response-length-fills-context",
        put("stages.ppo.trainer.response_length", 128),
        key("stages.ppo.trainer.response_length"),
        "128 tokens leave no room for a prompt in the model's context of 128",
        "model.config's n_positions",
        "set response_length below 128",
    ),
    (
        "default-response-length-too-long",
        chain(put("model.config.n_positions", 32), drop("stages.ppo.trainer.response_length")),
        key("stages.ppo.trainer.response_length"),
        "TRL's default of 53 tokens leave no room",
        "set response_length below 32",
    ),
    (
        "local-model-context",
        chain(
            PRETRAINED,
            put("model.name_or_path", model_folder({"model_type": "gpt2", "n_positions": 16})),
            put("stages.ppo.trainer.response_length", 20),
        ),
        key("stages.ppo.trainer.response_length"),
        "context of 16 tokens",
        "config.json",
        "below 16",
    ),
    # --- paths of the wrong kind
    (
        "dataset-is-a-folder",
        put("stages.sft.dataset.path", "data/tiny"),
        key("stages.sft.dataset.path"),
        "data/tiny is a folder, but a file is expected here",
        "name a file in it, e.g. data/tiny/",
    ),
    (
        "eval-dataset-is-a-folder",
        chain(EVAL, put("eval.dataset.path", "data/chat")),
        key("eval.dataset.path"),
        "data/chat is a folder",
        "name a file in it",
    ),
    (
        "chat-template-is-a-folder",
        put("model.chat_template", lambda c: str(c.tmp)),
        key("model.chat_template"),
        "is a folder, but a file is expected",
        "name a file",
    ),
    (
        "model-is-a-file",
        chain(PRETRAINED, put("model.name_or_path", "data/tiny/sft.jsonl")),
        key("model.name_or_path"),
        "is a file, but a model folder (with config.json) is expected",
        "give the folder that holds it",
    ),
    (
        "tokenizer-is-a-file",
        put("model.tokenizer", "data/tiny/tokenizer/tokenizer.json"),
        key("model.tokenizer"),
        "is a file, but a tokenizer folder is expected",
        "give the folder",
    ),
    (
        "reward-model-is-a-file",
        chain(drop("stages.reward"), put("stages.ppo.reward_model", "data/tiny/reward.jsonl")),
        key("stages.ppo.reward_model"),
        "is a file, but a reward model folder",
        "give the folder",
    ),
    (
        "dataset-missing",
        put("stages.ppo.dataset.path", "data/tiny/nothing.jsonl"),
        key("stages.ppo.dataset.path"),
        "file not found: data/tiny/nothing.jsonl",
        "fix the path",
    ),
    # --- the model
    (
        "config-without-pretrain",
        NO_PRETRAIN,
        key("model.config"),
        "only a pretrain stage trains",
        "add a pretrain stage",
        "model.name_or_path",
    ),
    (
        "gpt2-heads-do-not-divide",
        put("model.config.n_head", 5),
        key("model.config"),
        "a gpt2 model cannot be built from these settings",
        "divisible by num_heads",
        "fix model.config",
    ),
    ("gpt2-negative-width", put("model.config.n_embd", -64), key("model.config"), "cannot be built", "fix"),
    (
        "llama-heads-do-not-divide",
        put(
            "model.config",
            {
                "model_type": "llama",
                "num_hidden_layers": 2,
                "hidden_size": 64,
                "num_attention_heads": 3,
                "intermediate_size": 128,
                "max_position_embeddings": 128,
            },
        ),
        key("model.config"),
        "llama's config refused these settings",
        "not a multiple of the number of attention heads",
    ),
    (
        "t5-is-encoder-decoder",
        put("model.config", {"model_type": "t5", "num_layers": 2, "d_model": 64}),
        key("model.config.model_type"),
        "'t5' is an encoder-decoder architecture",
        "use one such as gpt2, llama",
    ),
    (
        "bert-is-an-encoder",
        put(
            "model.config",
            {
                "model_type": "bert",
                "num_hidden_layers": 2,
                "hidden_size": 64,
                "num_attention_heads": 2,
                "intermediate_size": 128,
            },
        ),
        key("model.config.model_type"),
        "'bert' is an encoder (a masked LM)",
        "decoder-only causal LMs",
    ),
    (
        "roberta-is-an-encoder",
        put("model.config", {"model_type": "roberta"}),
        key("model.config.model_type"),
        "is an encoder",
        "use one such as gpt2",
    ),
    (
        "bart-is-encoder-decoder",
        put("model.config", {"model_type": "bart"}),
        key("model.config.model_type"),
        "encoder-decoder",
        "use one such as gpt2",
    ),
    (
        "bert-generation-is-an-encoder-head",
        put(
            "model.config",
            {
                "model_type": "bert-generation",
                "num_hidden_layers": 2,
                "hidden_size": 64,
                "num_attention_heads": 2,
                "intermediate_size": 128,
            },
        ),
        key("model.config"),
        "an encoder's head",
        "use one such as gpt2",
    ),
    (
        "unknown-architecture",
        put("model.config.model_type", "gtp2"),
        key("model.config.model_type"),
        "unknown architecture 'gtp2'",
        "e.g. gpt2",
    ),
    (
        "local-t5-folder",
        chain(PRETRAINED, put("model.name_or_path", model_folder({"model_type": "t5"}))),
        key("model.name_or_path"),
        "config.json says model_type 't5'",
        "use one such as gpt2",
    ),
    # --- quantization and precision
    (
        "4-and-8-bit",
        chain(put("lora", {"r": 4}), put("quantization", {"load_in_4bit": True, "load_in_8bit": True})),
        key("quantization"),
        "load_in_4bit and load_in_8bit are both set",
        "remove one",
    ),
    # --- YAML: duplicate keys, encoding, syntax
    (
        "duplicate-top-level-key",
        edit(lambda t: dup_first(t, "seed")),
        key("seed"),
        "written twice, on lines",
        "remove one",
    ),
    (
        "duplicate-trainer-key",
        edit(lambda t: dup_first(t, "learning_rate")),
        key("stages.pretrain.trainer.learning_rate"),
        "written twice",
        "YAML keeps only the last",
    ),
    (
        "duplicate-stage",
        edit(lambda t: t.replace("  reward:\n", "  sft:\n    dataset: {path: x.jsonl}\n  reward:\n")),
        key("stages.sft"),
        "written twice",
        "remove one",
    ),
    (
        "recipe-not-utf8",
        edit(lambda t: t.replace("seed: 42", "seed: 42  # r\xe9glage").encode("latin-1")),
        line(),
        "not UTF-8 text: byte 0xe9",
        "save the file as UTF-8",
    ),
    (
        "recipe-bad-yaml",
        edit(lambda t: t.replace("seed: 42", "seed: [42")),
        line(),
        "not valid YAML",
        "fix the syntax",
    ),
    (
        "recipe-too-deep",
        edit(lambda t: t + f"deep: {nested(2000)}\n"),
        ("file", None),
        "nested too deeply",
        "a few levels",
    ),
    # --- sections given as scalars or lists
    (
        "model-as-string",
        put("model", "openai-community/gpt2"),
        key("model"),
        "expected a mapping, got 'openai-community/gpt2'",
        "model: {name_or_path: openai-community/gpt2}",
    ),
    ("model-as-list", put("model", ["gpt2"]), key("model"), "expected a mapping, got [gpt2]", "give model its keys"),
    (
        "stages-as-list",
        put("stages", ["sft", "ppo"]),
        key("stages"),
        "expected a mapping of stage names",
        "e.g. stages: {sft: {dataset: {path:",
    ),
    (
        "stage-as-string",
        put("stages.sft", "data/tiny/sft.jsonl"),
        key("stages.sft"),
        "expected a mapping",
        "sft: {dataset: {path: data/tiny/sft.jsonl}}",
    ),
    (
        "dataset-as-string",
        put("stages.ppo.dataset", "data/tiny/ppo.jsonl"),
        key("stages.ppo.dataset"),
        "expected a mapping",
        "dataset: {path: data/tiny/ppo.jsonl}",
    ),
    (
        "eval-as-string",
        put("eval", "data/tiny/ppo.jsonl"),
        key("eval"),
        "expected a mapping",
        "eval: {dataset: {path: data/tiny/ppo.jsonl}}",
    ),
    ("hub-as-list", put("hub", ["me/model"]), key("hub"), "expected a mapping", "give hub its keys"),
    (
        "trainer-as-string",
        put("stages.sft.trainer", "fast"),
        key("stages.sft.trainer"),
        "expected a mapping, got 'fast'",
        "write a mapping here (settings for TRL's config class",
    ),
    (
        "lora-as-number",
        put("lora", 8),
        key("lora"),
        "expected a mapping (or null), got 8",
        "write a mapping here (train LoRA adapters",
    ),
    (
        "model-config-as-string",
        put("model.config", "gpt2"),
        key("model.config"),
        "expected a mapping",
        "write a mapping here (build an untrained model instead: {model_type: gpt2",
    ),
    (
        "chat-template-as-number",
        put("model.chat_template", 5),
        key("model.chat_template"),
        "expected a string (or null), got 5",
        "write a string here (Jinja chat template, or a .jinja file",
    ),
    (
        "dataset-path-as-number",
        put("stages.ppo.dataset.path", 3),
        key("stages.ppo.dataset.path"),
        "expected a string, got 3",
        "write a string here (a local .json/.jsonl/.csv/.parquet file",
    ),
    (
        "trainer-key-wrong-type",
        put("stages.ppo.trainer.num_mini_batches", "two"),
        key("stages.ppo.trainer.num_mini_batches"),
        "expected an integer, got 'two'",
        "write an integer here (see PPOConfig)",
    ),
    (
        "recipe-as-list",
        edit(lambda t: "- output_dir: x\n- stages: {}\n"),
        ("file", None),
        "expected a mapping of keys",
        "write the recipe as `key: value` lines",
    ),
    # --- chat templates
    (
        "template-syntax",
        put("model.chat_template", "{% for m in messages %}{{ m.content }"),
        key("model.chat_template"),
        "not a valid Jinja template",
        "line 1 of the template",
        "fix its syntax",
    ),
    (
        "template-dunder",
        put("model.chat_template", "{{ ''.__class__ }}{% for m in messages %}{{ m.content }}{% endfor %}"),
        key("model.chat_template"),
        "reads '__class__'",
        "transformers' sandbox refuses",
        "remove it",
    ),
    (
        "template-attr-filter",
        put("model.chat_template", "{{ messages | attr('__len__') }}"),
        key("model.chat_template"),
        "reads '__len__'",
        "remove it",
    ),
    (
        "template-unsafe-call",
        put("model.chat_template", "{{ messages.pop() }}{% for m in messages %}{{ m.content }}{% endfor %}"),
        key("model.chat_template"),
        "SecurityError",
        "fix the template",
    ),
    (
        "template-raises",
        put("model.chat_template", "{{ raise_exception('only two roles') }}"),
        key("model.chat_template"),
        "fails to render a sample chat",
        "only two roles",
        "fix the template",
    ),
    (
        "template-undefined",
        put("model.chat_template", "{% for m in messages %}{{ m.content + suffix }}{% endfor %}"),
        key("model.chat_template"),
        "UndefinedError: 'suffix' is undefined",
        "fix the template",
    ),
    (
        "template-type-error",
        put("model.chat_template", "{% for m in messages %}\n{{ m.content + 1 }}{% endfor %}"),
        key("model.chat_template"),
        "TypeError",
        "(line 2 of the template)",
        "fix the template",
    ),
    (
        "template-unknown-filter",
        put("model.chat_template", "{{ messages | shout }}"),
        key("model.chat_template"),
        "No filter named 'shout'",
        "fix its syntax",
    ),
    (
        "template-ignores-messages",
        put("model.chat_template", "{% for m in conversation %}{{ m.content }}{% endfor %}"),
        key("model.chat_template"),
        "renders a sample chat without its messages' text",
        "each message's content",
    ),
    (
        "template-file-not-utf8",
        put("model.chat_template", lambda c: c.file("chat.jinja", b"{{ messages }}\n\xff")),
        key("model.chat_template"),
        "chat.jinja:2: not UTF-8 text",
        "save the file as UTF-8",
    ),
    (
        "template-file-syntax",
        put("model.chat_template", lambda c: c.file("bad.jinja", "{{ messages }}\n{% if %}")),
        key("model.chat_template"),
        "bad.jinja:2)",
        "fix its syntax",
    ),
    # --- data files
    (
        "jsonl-not-utf8",
        data("stages.sft.dataset", "sft.jsonl", jsonl(PROMPT).encode() + b'{"text": "caf\xe9"}\n'),
        data_file("sft.jsonl", "stages.sft.dataset"),
        "sft.jsonl:2: not UTF-8 text",
        "save the file as UTF-8",
    ),
    (
        "json-not-utf8",
        data("stages.ppo.dataset", "ppo.json", b'[\n {"prompt": "\xff"}\n]'),
        data_file("ppo.json", "stages.ppo.dataset"),
        "ppo.json:2: not UTF-8",
        "save the file as UTF-8",
    ),
    (
        "csv-not-utf8",
        data("stages.ppo.dataset", "ppo.csv", b"prompt\nhello\n\xe9t\xe9\n"),
        data_file("ppo.csv", "stages.ppo.dataset"),
        "ppo.csv:3: not UTF-8",
        "save the file as UTF-8",
    ),
    (
        "csv-unclosed-quote",
        data("stages.ppo.dataset", "ppo.csv", 'prompt\nhello\n"never closed\n'),
        data_file("ppo.csv", "stages.ppo.dataset"),
        "ppo.csv:3: not valid CSV",
        "check its quotes",
    ),
    (
        "csv-extra-field",
        data("stages.ppo.dataset", "ppo.csv", "prompt\nhello\nhello,again\n"),
        data_file("ppo.csv", "stages.ppo.dataset"),
        "ppo.csv:3: not valid CSV",
        "as many fields as the header",
    ),
    (
        "csv-empty",
        data("stages.ppo.dataset", "ppo.csv", ""),
        data_file("ppo.csv", "stages.ppo.dataset"),
        "empty: no header line and no rows",
        "starts with a header",
    ),
    (
        "csv-header-only",
        data("stages.ppo.dataset", "ppo.csv", "prompt\n"),
        data_file("ppo.csv", "stages.ppo.dataset"),
        "no rows",
        "add rows to it",
    ),
    (
        "parquet-corrupt",
        data("stages.ppo.dataset", "ppo.parquet", parquet),
        data_file("ppo.parquet", "stages.ppo.dataset"),
        "not a readable Parquet file",
        "write it again",
    ),
    (
        "parquet-cut-short",
        data("stages.ppo.dataset", "ppo.parquet", lambda t: parquet(t, cut=True)),
        data_file("ppo.parquet", "stages.ppo.dataset"),
        "not a readable Parquet file",
        "or use JSON Lines",
    ),
    (
        "jsonl-nested-deep",
        data("stages.ppo.dataset", "ppo.jsonl", jsonl(PROMPT) + '{"prompt": ' + nested(50000) + "}"),
        data_file("ppo.jsonl", "stages.ppo.dataset"),
        "ppo.jsonl:2: nested too deeply",
        "flatten it",
    ),
    (
        "jsonl-nested-30",
        data("stages.ppo.dataset", "ppo.jsonl", jsonl(PROMPT) + '{"prompt": ' + nested(30) + "}"),
        data_file("ppo.jsonl", "stages.ppo.dataset"),
        "ppo.jsonl:2: nested too deeply",
        "flatten it",
    ),
    (
        "json-array-nested-deep",
        data("stages.ppo.dataset", "ppo.json", "[" + nested(50000) + "]"),
        data_file("ppo.json", "stages.ppo.dataset"),
        "nested too deeply",
        "flatten it",
    ),
    (
        "pickle-file",
        data("stages.ppo.dataset", "data.pkl", PICKLE),
        data_file("data.pkl", "stages.ppo.dataset"),
        "a Python pickle",
        "never unpickles",
        "save the rows as .json",
    ),
    (
        "pickle-in-json",
        data("stages.sft.dataset", "sft.json", PICKLE),
        data_file("sft.json", "stages.sft.dataset"),
        "a Python pickle, not a .json file",
        "save the rows",
    ),
    (
        "pickle-in-jsonl",
        data("stages.reward.dataset", "reward.jsonl", PICKLE),
        data_file("reward.jsonl", "stages.reward.dataset"),
        "a Python pickle, not a .jsonl file",
        "save the rows",
    ),
    (
        "pickle-in-parquet",
        data("stages.ppo.dataset", "ppo.parquet", PICKLE),
        data_file("ppo.parquet", "stages.ppo.dataset"),
        "a Python pickle, not a .parquet file",
        "save the rows",
    ),
    (
        "jsonl-empty",
        data("stages.sft.dataset", "sft.jsonl", ""),
        data_file("sft.jsonl", "stages.sft.dataset"),
        "no rows",
        "add rows",
    ),
    (
        "jsonl-bad-line",
        data("stages.sft.dataset", "sft.jsonl", jsonl(PROMPT) + '{"prompt": \n'),
        data_file("sft.jsonl", "stages.sft.dataset"),
        "sft.jsonl:2: not valid JSON",
        "each line must be one JSON object",
    ),
    (
        "eval-not-utf8",
        chain(EVAL, data("eval.dataset", "eval.jsonl", b'{"prompt": "\xff"}\n')),
        data_file("eval.jsonl", "eval.dataset"),
        "eval.jsonl:1: not UTF-8",
        "save the file as UTF-8",
    ),
    (
        "messages-as-text",  # passed validate, then failed after pretraining on assistant_only_loss
        data("stages.sft.dataset", "sft.jsonl", jsonl({"messages": "User: hi. Assistant: hello"})),
        data_file("sft.jsonl", "stages.sft.dataset"),
        "sft.jsonl:1: column 'messages' holds text",
        "a list of {role, content} messages, e.g. [{",
        "plain text goes in a 'text' column",
    ),
    (
        "messages-text-after-lists",
        data(
            "stages.sft.dataset",
            "sft.jsonl",
            jsonl({"messages": [{"role": "user", "content": "hi"}]}, {"messages": "hi"}),
        ),
        data_file("sft.jsonl", "stages.sft.dataset"),
        "sft.jsonl:2: column 'messages' is text here but a list on line 1",
        "'messages' is always a list of {role, content} messages",
    ),
    (
        "column-of-mixed-types",  # pyarrow refused the file, naming no line
        data(
            "stages.ppo.dataset",
            "ppo.jsonl",
            jsonl({"prompt": "a"}, {"prompt": "b"}) + "\n" + jsonl({"prompt": 3}, {"prompt": ["x"]}),
        ),
        data_file("ppo.jsonl", "stages.ppo.dataset"),
        "ppo.jsonl:4: column 'prompt' is a number here but text on line 1",
        "a column holds the same kind of value in every row",
    ),
    (
        "columns-the-first-row-lacks",  # datasets kept the first row's keys only: "this row has nothing"
        data("stages.sft.dataset", "sft.jsonl", jsonl({"text": "hi"}, {"prompt": "hi", "completion": "there"})),
        data_file("sft.jsonl", "stages.sft.dataset"),
        "sft.jsonl:2: this row gives prompt, completion but earlier rows gave text",
        "use one shape for every row",
    ),
    (
        "completion-null",
        data(
            "stages.sft.dataset",
            "sft.jsonl",
            jsonl({"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}),
        ),
        data_file("sft.jsonl", "stages.sft.dataset"),
        "sft.jsonl:2: the sft stage needs",
        "this row has prompt (completion: null or missing)",
    ),
    # --- found by a held-out probe after the corpus above was written
    (
        "output-dir-is-a-file",
        put("output_dir", lambda c: c.file("afile", "x")),
        key("output_dir"),
        "is a file, but the run's folder",
        "choose another output_dir",
    ),
    (
        "output-dir-under-a-file",
        put("output_dir", lambda c: c.file("afile", "x") + "/run"),
        key("output_dir"),
        "is a file, but the run's folder",
        "choose another output_dir",
    ),
    (
        "reward-model-not-a-model",
        put("stages.ppo.reward_model", lambda c: (c.tmp / "empty").mkdir() or str(c.tmp / "empty")),
        key("stages.ppo.reward_model"),
        "holds no config.json",
        "give a reward stage's output folder",
    ),
    (
        "lora-rank-0",
        put("lora", {"r": 0}),
        key("lora.r"),
        "must be >= 1 (LoRA's rank), got 0",
        "set a value in that range",
    ),
    (
        "lora-dropout-1",
        put("stages.sft.lora", {"r": 4, "lora_dropout": 1.0}),
        key("stages.sft.lora.lora_dropout"),
        "must be in [0, 1)",
        "set a value in that range",
    ),
    (
        "alias-bomb",
        edit(
            lambda t: (
                t
                + "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else '"x"'] * 9) + "]\n" for i in range(10))
            )
        ),
        key("l0"),
        "unknown key for a recipe",
    ),
]

# Through `alignkit run`: data errors and range errors, refused before any model loads.
RUN = [
    "num-mini-batches-0",
    "epochs-negative",
    "total-episodes-0",
    "lr-nan",
    "response-length-fills-context",
    "gpt2-heads-do-not-divide",
    "config-without-pretrain",
    "template-dunder",
    "duplicate-trainer-key",
    "model-as-string",
    "csv-unclosed-quote",
    "csv-empty",
    "jsonl-not-utf8",
    "parquet-corrupt",
    "pickle-in-json",
    "jsonl-nested-deep",
    "eval-not-utf8",
    "messages-as-text",
    "column-of-mixed-types",
]
CASES = {case[0]: case[1:] for case in VALIDATE}
assert len(CASES) == len(VALIDATE) and set(RUN) <= set(CASES)


def _write(tmp_path, change):
    c = Ctx(tmp_path)
    change(c)
    text = yaml.safe_dump(c.recipe, sort_keys=False)
    for e in c.edits:
        text = e(text)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text.encode() if isinstance(text, str) else text)
    return recipe, tmp_path / "run"


def _check(err: str, recipe, tmp_path, where, expected):
    assert "Traceback" not in err, err
    assert err.startswith("alignkit: error: "), err
    kind, what = where
    if kind == "key":  # file:line: key: ...
        assert re.search(rf"{re.escape(str(recipe))}:\d+: {re.escape(what)}: ", err), err
    elif kind == "cli":
        assert f"command line: {what}: " in err, err
    elif kind == "line":
        assert re.search(rf"{re.escape(str(recipe))}:\d+: ", err), err
    elif kind == "file":
        assert f"{recipe}: " in err, err
    else:  # data: the stage's dataset key, then the data file (and its line where the case expects one)
        name, stage_key = what
        assert f"{stage_key}: {tmp_path / name}" in err, err
    for text in expected:
        assert text in err, f"{text!r} not in:\n{err}"


@pytest.mark.parametrize("change, where, expected", [pytest.param(c[1], c[2], c[3:], id=c[0]) for c in VALIDATE])
def test_validate_refuses(change, where, expected, tmp_path, capsys):
    recipe, out = _write(tmp_path, change)
    code, _, err = alignkit(capsys, "validate", recipe)
    assert code == 2, err
    _check(err, recipe, tmp_path, where, expected)
    assert not out.exists()


@pytest.fixture
def no_models(monkeypatch):
    """Any model or tokenizer load fails the test: `run` must refuse bad input before it gets that far."""
    from alignkit import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded")

    for name in ("build_model", "load_causal_lm", "load_reward_model", "load_tokenizer"):
        monkeypatch.setattr(models, name, refuse)


@pytest.mark.parametrize("name", RUN)
def test_run_refuses_before_any_model_loads(name, tmp_path, capsys, no_models):
    change, where, *expected = CASES[name]
    recipe, out = _write(tmp_path, change)
    code, _, err = alignkit(capsys, "run", recipe)
    assert code == 2, err
    _check(err, recipe, tmp_path, where, expected)
    assert not out.exists()


@pytest.mark.skipif(__import__("alignkit.preflight").preflight.has_accelerator(), reason="fp16 is fine with a GPU")
@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_fp16_without_a_gpu(stage, tmp_path, capsys):
    recipe, out = _write(tmp_path, put(f"stages.{stage}.trainer.fp16", True))
    code, _, err = alignkit(capsys, "validate", recipe)
    assert code == 2
    _check(
        err,
        recipe,
        tmp_path,
        key(f"stages.{stage}.trainer.fp16"),
        ("fp16 needs a GPU, and this machine has none", "use bf16: true, or remove fp16"),
    )


@pytest.mark.parametrize(
    "override, where, expected",
    [
        ("stages.ppo.trainer.num_mini_batches=0", cli("stages.ppo.trainer.num_mini_batches"), "must be >= 1"),
        ("stages.sft.trainer.learning_rate=nan", cli("stages.sft.trainer.learning_rate"), "expected a finite number"),
        ("seed=-3", cli("seed"), "must be >= 0, got -3"),
        ("model=gpt2", cli("model"), "write it as model: {name_or_path: gpt2}"),
    ],
)
def test_bad_overrides_are_named_as_command_line(override, where, expected, tmp_path, capsys):
    recipe, out = _write(tmp_path, lambda c: None)
    code, _, err = alignkit(capsys, "validate", recipe, override)
    assert code == 2
    _check(err, recipe, tmp_path, where, (expected,))


def test_all_problems_at_once(tmp_path, capsys):
    recipe, out = _write(
        tmp_path,
        chain(
            put("seed", -1),
            put("stages.sft.trainer.learning_rate", NAN),
            put("stages.ppo.trainer.num_mini_batches", 0),
            put("model.config.n_head", 5),
            put("model.chat_template", "{{ ''.__class__ }}"),
            edit(lambda t: dup_first(t, "logging_steps")),
        ),
    )
    code, _, err = alignkit(capsys, "validate", recipe)
    assert code == 2 and "6 problems" in err, err
    for k in (
        "seed",
        "stages.sft.trainer.learning_rate",
        "stages.ppo.trainer.num_mini_batches",
        "model.config",
        "model.chat_template",
        "stages.pretrain.trainer.logging_steps",
    ):
        assert re.search(rf"{re.escape(str(recipe))}:\d+: {re.escape(k)}: ", err), k


def test_good_models_pass(tmp_path, capsys):
    """The causal-LM rule keeps the decoder-only families; each builds on the meta device."""
    small = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "max_position_embeddings": 128}
    configs = [
        {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128},
        {"model_type": "llama", "intermediate_size": 128, **small},
        {"model_type": "opt", "ffn_dim": 128, "word_embed_proj_dim": 64, **small},
        {"model_type": "gpt_neox", "intermediate_size": 128, **small},
    ]
    for config in configs:
        recipe, _ = _write(tmp_path, put("model.config", config))
        code, out, err = alignkit(capsys, "validate", recipe)
        assert code == 0, err


def test_sound_templates_and_paths_pass(tmp_path, capsys):
    """A template that refuses a system turn (as some do) and one with answer markers both render; a template file
    and a local model folder of the right kinds pass."""
    no_system = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    markers = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content + eos_token }}"
        "{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}"
    )
    for template in (no_system, markers):
        recipe, _ = _write(tmp_path, put("model.chat_template", template))
        code, out, err = alignkit(capsys, "validate", recipe)
        assert code == 0, err
    recipe, _ = _write(tmp_path, put("model.chat_template", lambda c: c.file("chat.jinja", markers)))
    code, out, err = alignkit(capsys, "validate", recipe)
    assert code == 0, err


def test_validate_takes_several_recipes(tmp_path, capsys):
    bad, _ = _write(tmp_path, put("seed", -1))
    code, out, err = alignkit(capsys, "validate", TINY, bad, REPO / "recipes" / "chat.yaml", "output_dir=/tmp/x")
    assert code == 2
    assert f"{TINY}: ok (" in out and "recipes/chat.yaml: ok (" in out and "output in /tmp/x" in out
    assert f"{bad}:" in err and "seed: must be >= 0" in err and "1 of 3 recipes have problems" in err
    assert "Traceback" not in err


def test_every_shipped_recipe_validates_at_once(capsys):
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    code, out, err = alignkit(capsys, "validate", *recipes)
    assert code == 0, err
    assert out.count(": ok (") == len(recipes) >= 5
