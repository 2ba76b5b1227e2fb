"""A quiet terminal: every command, run as a real process (so that lines printed while libraries import are seen),
prints alignkit's own lines, each at most 100 columns wide, and no library line that alignkit's lines replace or that
names nothing a user can do; `--verbose` lets the libraries speak again."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import FAST, REPO, TINY, unwrap

WIDTH = 100  # columns: every line alignkit prints fits a terminal this wide
# What the libraries print on their own in a tiny run, evaluation or chat.
LIBRARY_LINES = (
    "Skipping publisher trust check",  # kernels, as bitsandbytes imports
    "Failed to load CPU gemm_4bit_forward",  # bitsandbytes on a CPU
    "attention_mask",  # transformers: TRL's PPO calls the model on padded batches without one
    "The attention mask",  # transformers' generate()
    "Token indices sequence length is longer",  # a tokenizer, on a row longer than the model's context
    "Loading weights",  # transformers 5's bar for every model loaded
    "%|",  # any other tqdm bar
)
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def alignkit(*argv, stdin: str | None = None) -> str:
    """Run `python -m alignkit ARGV`; its stdout and stderr together, after checking that it succeeded."""
    done = subprocess.run(
        [sys.executable, "-m", "alignkit", *map(str, argv)],
        cwd=REPO,
        env=ENV,
        input=stdin or "",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def assert_quiet(output: str) -> None:
    lines = output.replace("\r", "\n").splitlines()
    for needle in LIBRARY_LINES:
        assert needle not in output, next(line for line in lines if needle in line)
    wide = [line for line in lines if len(line) > WIDTH]
    assert not wide, "\n".join(wide)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """recipes/tiny.yaml, a little shorter, with one demonstration longer than the model's context (the tokenizer
    warns about it; alignkit says so itself), run once: (recipe, output folder, what the run printed)."""
    tmp = tmp_path_factory.mktemp("quiet")
    story = [{"role": "user", "content": "Tell me a long story."}]
    story.append({"role": "assistant", "content": " ".join(["Once upon a time"] * 80)})
    rows = (REPO / "data" / "tiny" / "sft.jsonl").read_text() + json.dumps({"messages": story}) + "\n"
    (tmp / "sft.jsonl").write_text(rows)
    recipe = yaml.safe_load(TINY.read_text())
    recipe["stages"]["sft"]["dataset"]["path"] = str(tmp / "sft.jsonl")
    for stage, epochs in (("pretrain", 2), ("sft", 4), ("reward", 2)):
        recipe["stages"][stage]["trainer"]["num_train_epochs"] = epochs
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp / "run"
    return path, out, alignkit("run", path, f"output_dir={out}", *FAST)


def test_a_run_prints_only_alignkit_lines_within_100_columns(tiny):
    _, _, output = tiny
    assert_quiet(output)
    assert "[alignkit] ppo: done in" in output and "[alignkit] eval: report:" in output
    assert "1 of 51 rows are longer than 128 tokens" in output  # alignkit's own line for the tokenizer's


def test_validate_prints_one_line(tiny):
    recipe, _, _ = tiny
    output = alignkit("validate", recipe)
    assert_quiet(output)
    assert unwrap(output).splitlines() == [f"{recipe}: ok (pretrain -> sft -> reward -> ppo; output in runs/tiny)"]


def test_eval_loads_models_without_bars(tiny):
    recipe, out, _ = tiny
    output = alignkit("eval", recipe, f"output_dir={out}")
    assert_quiet(output)
    assert "[alignkit] eval: ppo:" in output


def test_chat_loads_its_model_without_a_bar(tiny):
    _, out, _ = tiny
    output = alignkit("chat", out, stdin="/exit\n")
    assert_quiet(output)
    assert f"chatting with {out / 'ppo'}" in unwrap(output)


def test_verbose_lets_the_libraries_speak(tiny):
    _, out, _ = tiny
    output = alignkit("--verbose", "chat", out, stdin="/exit\n")
    assert "Loading weights" in output and "chatting with" in output


def test_verbose_goes_before_or_after_the_command():
    from alignkit.cli import _parser

    parser = _parser()
    assert parser.parse_args(["--verbose", "run", "r.yaml"]).verbose
    assert parser.parse_args(["run", "r.yaml", "--verbose"]).verbose
    assert parser.parse_args(["chat", "m", "--verbose"]).verbose
    assert not parser.parse_args(["validate", "r.yaml"]).verbose
