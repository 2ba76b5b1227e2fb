"""`alignkit chat`, driven as a person drives it: through a pseudo-terminal, two turns, answers checked."""

import json
import os
import pty
import select
import subprocess
import sys
import time

import torch
from conftest import REPO
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

PROMPT = "you> "


class Terminal:
    def __init__(self, *argv):
        self.master, slave = pty.openpty()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "alignkit", "chat", *map(str, argv)],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=REPO,
            env=env,
            close_fds=True,
        )
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


def _greedy_answers(folder, questions, max_new_tokens, template=None, system=None, context=None):
    """What the model answers, turn after turn, computed directly with transformers. With `context` (the model's
    length), as alignkit chat keeps a conversation within it: the oldest exchanges go when the prompt would leave
    less than min(64, context / 4) tokens for the answer (32 for the tiny model), an answer gets what the context
    leaves, and a message that does not fit even alone is refused (None) and forgotten."""
    tok = AutoTokenizer.from_pretrained(folder)
    if template:
        tok.chat_template = template
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    history, answers = [], []
    system = [{"role": "system", "content": system}] if system else []
    for q in questions:
        history.append({"role": "user", "content": q})

        def prompt():
            text = tok.apply_chat_template(system + history, tokenize=False, add_generation_prompt=True)
            return tok(text, return_tensors="pt", add_special_tokens=False).input_ids

        ids, longest = prompt(), max_new_tokens
        if context:
            room = context - min(max_new_tokens, min(64, context // 4))
            before = list(history)
            while ids.shape[1] > room and len(history) > 1:
                del history[:2]
                ids = prompt()
            if ids.shape[1] > room:  # the conversation stays as it was before this message
                history[:] = before[:-1]
                answers.append(None)
                continue
            longest = min(max_new_tokens, context - ids.shape[1])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=longest,
                do_sample=False,
                pad_token_id=tok.pad_token_id or tok.eos_token_id,
            )
        answers.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
        history.append({"role": "assistant", "content": answers[-1]})
    return answers


def _questions(count=2):
    with open(REPO / "data" / "tiny" / "ppo.jsonl") as f:
        return [json.loads(line)["prompt"][-1]["content"] for line in f][:count]


def test_two_turns_with_a_runs_last_stage(run_dir):
    questions = _questions()
    expected = _greedy_answers(run_dir / "ppo", questions, 12, system="Be brief.")
    assert all(expected)
    term = Terminal(run_dir, "--greedy", "--max-new-tokens", "12", "--system", "Be brief.")
    banner = term.read_until(PROMPT)
    assert f"chatting with {run_dir / 'ppo'}" in banner and "note:" not in banner  # 12 tokens fit the context
    for question, answer in zip(questions, expected):
        shown = term.say(question)
        assert question in shown  # the terminal echoes what was typed
        assert answer in shown.split(question, 1)[1], shown  # the answer follows it, before the next prompt
    assert term.close() == 0


REFUSED = "is longer than the model's context"
FORGOT = "the conversation outgrew the model's context of 128 tokens: forgot its"


def _answer(shown: str, question: str) -> str:
    """The answer printed after a question's echo, before the next prompt."""
    return shown.split(question, 1)[1].removesuffix(PROMPT).strip()


def test_defaults_answer_within_a_small_context(run_dir):
    # README's own command, no options: the tiny model's context is 128 tokens, less than the 256 an answer may
    # take by default, so an answer gets what the context leaves after the prompt
    term = Terminal(run_dir)
    assert "note:" not in term.read_until(PROMPT)
    answers = []
    for question in _questions():
        shown = term.say(question)
        assert REFUSED not in shown, shown
        answers.append(_answer(shown, question))
    # sampled at temperature 0.7: an answer may end at once (the tiny model puts about 1% on EOS first), two cannot
    # both reasonably do so
    assert any(answers), term.seen
    assert term.close() == 0


def test_a_long_conversation_forgets_its_oldest_exchanges(run_dir):
    questions = _questions(6)
    too_long = "What is " + " plus ".join(["two"] * 60) + "?"  # more than 128 tokens alone
    said = questions[:3] + [too_long] + questions[3:]
    expected = _greedy_answers(run_dir / "ppo", said, 256, context=128)
    assert expected[3] is None and all(a is not None for i, a in enumerate(expected) if i != 3)
    term = Terminal(run_dir, "--greedy")
    term.read_until(PROMPT)
    for message, answer in zip(said, expected):
        shown = term.say(message)
        if answer is None:  # refused, with the conversation kept as it was
            assert "(that message alone is longer than the model's context of 128 tokens allows" in shown, shown
        else:
            assert REFUSED not in shown and answer in _answer(shown, message), shown
    # six exchanges of about 25 tokens do not fit 128 - 32: the oldest went, and the answers above are those of
    # the shortened conversation
    assert FORGOT in term.seen
    assert term.close() == 0


def test_max_new_tokens_beyond_the_context_is_capped_with_one_note(run_dir):
    questions = _questions(3)
    expected = _greedy_answers(run_dir / "ppo", questions, 500, context=128)
    term = Terminal(run_dir, "--greedy", "--max-new-tokens", "500")
    assert "note: --max-new-tokens 500 does not fit the model's context of 128 tokens" in term.read_until(PROMPT)
    for question, answer in zip(questions, expected):
        shown = term.say(question)
        assert REFUSED not in shown and answer in _answer(shown, question), shown
    assert term.seen.count("note:") == 1  # said once, not at every answer
    assert term.close() == 0


def test_a_model_alignkit_did_not_train_without_a_chat_template(tmp_path):
    tok = AutoTokenizer.from_pretrained(REPO / "data" / "tiny" / "tokenizer")
    assert not tok.chat_template and tok.pad_token is None
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=32,
        n_positions=64,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
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


def test_sampling_settings_out_of_range_are_clear_errors(run_dir, capsys):
    from conftest import alignkit

    for flags, needle in (
        (["--temperature", "-1"], "--temperature -1.0: give a number above 0"),
        (["--top-p", "0"], "--top-p 0.0: give a share of the probability mass"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0: give a number of tokens"),
    ):
        code, out, err = alignkit(capsys, "chat", run_dir, *flags)
        assert code == 2 and needle in err and "Traceback" not in err, err
    code, out, err = alignkit(capsys, "chat", run_dir / "nonexistent")
    assert code == 2 and "no such folder" in err


def test_ctrl_c_at_the_prompt_and_during_an_answer_keeps_the_chat(run_dir, capsys, monkeypatch):
    # before, Ctrl-C ended the chat with `alignkit run`'s "run the same command again to resume" (exit 130)
    import builtins

    from conftest import alignkit
    from transformers import GenerationMixin

    lines = iter([KeyboardInterrupt, "Hello", "/exit"])
    seen = []

    def typed(prompt=""):
        line = next(lines)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    def generate(self, *args, **kwargs):  # Ctrl-C while the answer is being written
        seen.append(kwargs["input_ids"].shape[1])
        raise KeyboardInterrupt

    monkeypatch.setattr(builtins, "input", typed)
    monkeypatch.setattr(GenerationMixin, "generate", generate)
    code, out, err = alignkit(capsys, "chat", run_dir)
    assert code == 0, err
    assert "(Ctrl-D or /exit quits)" in out and "(answer stopped; your message is forgotten)" in out
    assert len(seen) == 1 and "resume" not in out + err


def test_what_cannot_chat_is_refused_before_the_first_message(run_dir, tmp_path, capsys):
    import shutil

    from conftest import alignkit

    # a reward model loads as a causal LM too (its head dropped) and answers nonsense: refused
    code, out, err = alignkit(capsys, "chat", run_dir / "reward")
    assert code == 2 and "a reward model (GPT2ForSequenceClassification) scores answers" in err, err
    # a stage folder that did not finish
    cut = tmp_path / "cut"
    shutil.copytree(run_dir / "sft", cut)
    (cut / "model.safetensors").unlink()
    code, out, err = alignkit(capsys, "chat", cut)
    assert code == 2 and "a stage output that did not finish (or lost files)" in err, err
    # a chat template that refuses a system prompt (as Gemma's does): named, not a jinja2 traceback
    nosys = tmp_path / "nosys"
    shutil.copytree(run_dir / "sft", nosys)
    (nosys / "alignkit_stage.json").unlink()  # a model folder now: its tokenizer is changed below
    tok = AutoTokenizer.from_pretrained(nosys)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    )
    tok.save_pretrained(nosys)
    code, out, err = alignkit(capsys, "chat", nosys, "--system", "Be terse.")
    assert code == 2 and "--system: this model's chat template refuses a system prompt" in err, err
    assert "System role not supported" in err and "Traceback" not in err
    # a system prompt longer than the context leaves room for
    code, out, err = alignkit(capsys, "chat", run_dir, "--system", "word " * 500)
    assert code == 2 and "--system: the system prompt leaves no room in the model's context" in err, err
    # sampling settings: greedy uses neither; an infinite temperature samples uniformly at random
    code, out, err = alignkit(capsys, "chat", run_dir, "--temperature", "inf")
    assert code == 2 and "--temperature inf: give a number above 0" in err, err


def test_a_run_chats_with_its_last_policy_that_is_up_to_date(run_copy, capsys, monkeypatch):
    import builtins

    from conftest import alignkit, rerun

    from alignkit.chat import resolve

    assert resolve(str(run_copy), None) == str(run_copy / "ppo")
    code, out, err = rerun(capsys, run_copy, "sft")  # ppo is built on the sft before
    assert code == 0, err
    capsys.readouterr()
    assert resolve(str(run_copy), None) == str(run_copy / "sft")
    said = " ".join(capsys.readouterr().err.split())  # the log folds long lines
    assert f"left out: {run_copy / 'ppo'} is out of date (built on sft, which was trained again since)" in said
    assert resolve(str(run_copy), "ppo") == str(run_copy / "ppo")  # asked for by name: used, with a warning
    warned = " ".join(capsys.readouterr().err.split())
    assert f"warning: {run_copy / 'ppo'} is out of date (built on sft, which was trained again since)" in warned
    monkeypatch.setattr(builtins, "input", lambda prompt="": "/exit")
    code, out, err = alignkit(capsys, "chat", run_copy, "--greedy", "--temperature", "0")  # greedy uses neither
    assert code == 0 and f"chatting with {run_copy / 'sft'}" in out, err
