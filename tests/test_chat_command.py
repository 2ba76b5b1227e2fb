"""`alignkit chat`, driven as a person drives it: through a pseudo-terminal, two turns, answers checked."""

import json
import os
import pty
import select
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from conftest import REPO

PROMPT = "you> "


class Terminal:
    def __init__(self, *argv):
        self.master, slave = pty.openpty()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-m", "alignkit", "chat", *map(str, argv)], stdin=slave,
                                     stdout=slave, stderr=slave, cwd=REPO, env=env, close_fds=True)
        os.close(slave)
        self.seen = ""

    def read_until(self, marker: str, timeout: float = 180) -> str:
        """Everything printed up to and including the next `marker`."""
        start = len(self.seen)
        deadline = time.time() + timeout
        while marker not in self.seen[start:]:
            assert time.time() < deadline, f"no {marker!r} within {timeout}s; the terminal shows:\n{self.seen}"
            ready, _, _ = select.select([self.master], [], [], 1)
            if ready:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace").replace("\r", "")
                except OSError:  # the program ended
                    assert marker in self.seen[start:], self.seen
        end = self.seen.index(marker, start) + len(marker)
        return self.seen[start:end]

    def say(self, text: str) -> str:
        os.write(self.master, text.encode() + b"\n")
        return self.read_until(PROMPT)

    def close(self) -> int:
        os.write(self.master, b"/exit\n")
        code = self.proc.wait(timeout=60)
        os.close(self.master)
        return code


def _greedy_answers(folder, questions, max_new_tokens, template=None, system=None):
    """What the model answers, turn after turn, computed directly with transformers."""
    tok = AutoTokenizer.from_pretrained(folder)
    if template:
        tok.chat_template = template
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    history, answers = ([{"role": "system", "content": system}] if system else []), []
    for q in questions:
        history.append({"role": "user", "content": q})
        text = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        answers.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
        history.append({"role": "assistant", "content": answers[-1]})
    return answers


def _questions():
    with open(REPO / "data" / "tiny" / "ppo.jsonl") as f:
        return [json.loads(line)["prompt"][-1]["content"] for line in f][:2]


def test_two_turns_with_a_runs_last_stage(run_dir):
    questions = _questions()
    expected = _greedy_answers(run_dir / "ppo", questions, 12, system="Be brief.")
    assert all(expected)
    term = Terminal(run_dir, "--greedy", "--max-new-tokens", "12", "--system", "Be brief.")
    banner = term.read_until(PROMPT)
    assert f"chatting with {run_dir / 'ppo'}" in banner
    for question, answer in zip(questions, expected):
        shown = term.say(question)
        assert question in shown  # the terminal echoes what was typed
        assert answer in shown.split(question, 1)[1], shown  # the answer follows it, before the next prompt
    assert term.close() == 0


def test_a_model_alignkit_did_not_train_without_a_chat_template(tmp_path):
    tok = AutoTokenizer.from_pretrained(REPO / "data" / "tiny" / "tokenizer")
    assert not tok.chat_template and tok.pad_token is None
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=len(tok),
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")

    from alignkit.models import DEFAULT_CHAT_TEMPLATE

    questions = ["hello", "and again"]
    expected = _greedy_answers(tmp_path / "plain", questions, 6, template=DEFAULT_CHAT_TEMPLATE)
    term = Terminal(tmp_path / "plain", "--greedy", "--max-new-tokens", "6")
    assert "no chat template: using alignkit's 'User:/Assistant:' one" in term.read_until(PROMPT)
    for question, answer in zip(questions, expected):
        assert answer in term.say(question).split(question, 1)[1]
    assert "(conversation forgotten)" in term.say("/reset")
    assert term.close() == 0


def test_a_run_without_the_asked_stage_is_a_clear_error(run_dir, capsys):
    from conftest import alignkit

    code, out, err = alignkit(capsys, "chat", run_dir.parent, "--stage", "sft")
    assert code == 2 and "neither a model folder" not in err and "no finished sft stage" in err
    code, out, err = alignkit(capsys, "chat", run_dir / "nonexistent")
    assert code == 2 and "cannot load" in err and "Traceback" not in err
