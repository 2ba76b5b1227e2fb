"""The chat world's judge, for `alignkit rank FILE --by data/chat/judge.py:rank`: it ranks answers as the checker
that made comparisons.jsonl does (make.py), by the world's facts, ties allowed.

    1  correct        the reference answer ("The capital of X is Y."), as evaluate judges it (exact match, ignoring
                      case, spacing and end punctuation)
    2  hedge          the answer's sentence with the fact replaced by "unknown to me"
    3  wrong fact     the answer's sentence with another fact of the right kind: another capital of the world, another
                      colour, another number
    4  off topic      a whole statement (a fact or a hedge) about another country, another kind of fact, or another
                      sum: "The capital of Sasaor is Rian." asked about Nisastan
    5  broken         anything else: a damaged sentence (a word dropped, doubled or moved), a fact the world lacks
    6  rambling       no answer: empty, the question echoed, the sentence without its fact ("The capital of X is."),
                      or words repeating themselves (a word three times in a row, or three words twice)

Answers of one class tie. The facts are the world's own: make.py's world() from its seed, all 140 countries (the
held-out ones too: a judge knows what the labellers know), and arithmetic for sums. A question the world does not ask
(anything but a capital, a flag's colour or a sum) raises ValueError: `alignkit rank` then names the row.
"""

import importlib.util
import random
import re
from pathlib import Path

from alignkit.evaluate import is_correct

HERE = Path(__file__).resolve().parent
CORRECT, HEDGE, WRONG_FACT, OFF_TOPIC, BROKEN, RAMBLING = 1, 2, 3, 4, 5, 6


def _world():
    spec = importlib.util.spec_from_file_location("chat_world", HERE / "make.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    countries = make.world(random.Random(make.SEED))  # main() draws the world first from a fresh generator
    return make, countries + make.round_world(countries)  # and chat-rounds.yaml's countries from their own


_MAKE, _COUNTRIES = _world()
FACTS = {c["country"].lower(): c for c in _COUNTRIES}
CAPITALS = {c["capital"].lower() for c in _COUNTRIES}
COLOURS = set(_MAKE.COLOURS)
HEDGE_WORDS = _MAKE.HEDGE[:-1]  # "unknown to me"

QUESTIONS = (
    ("capital", re.compile(r"what is the capital of (\w+)\?")),
    ("flag", re.compile(r"what colour is the flag of (\w+)\?")),
    ("sum", re.compile(r"what is (\d+) plus (\d+)\?")),
)
STATEMENTS = (
    ("capital", re.compile(r"the capital of (\w+) is (.*)")),
    ("flag", re.compile(r"the flag of (\w+) is (.*)")),
    ("sum", re.compile(r"(\d+) plus (\d+) is (.*)")),
)

HEAD_ALONE = re.compile(r"(the capital of \w+|the flag of \w+|\d+ plus \d+) is")  # the sentence without its fact


def _words(text: str) -> str:
    """Lower case, single spaces, without the end punctuation: the form answers are compared in."""
    return re.sub(r"\s+", " ", text.lower()).strip().rstrip(".!?").strip()


def question_of(prompt) -> tuple[str, tuple]:
    """(kind, subject) of the prompt's last question: ("capital", ("nisastan",)), ("sum", ("4", "9"))."""
    text = prompt if isinstance(prompt, str) else next(m["content"] for m in reversed(prompt) if m["role"] == "user")
    for kind, pattern in QUESTIONS:
        found = pattern.fullmatch(" ".join(text.lower().split()))
        if found:
            if kind != "sum" and found.group(1) not in FACTS:
                raise ValueError(f"no country {found.group(1)!r} in the chat world")
            return kind, found.groups()
    raise ValueError(f"not a question of the chat world (a capital, a flag's colour or a sum): {text!r}")


def fact(kind: str, subject: tuple) -> str:
    if kind == "sum":
        return str(int(subject[0]) + int(subject[1]))
    country = FACTS[subject[0]]
    return country["capital"].lower() if kind == "capital" else country["flag"]


def _of_its_kind(kind: str, value: str) -> bool:
    """Whether `value` is a fact of the kind the sentence states: a capital, a colour, a number."""
    if kind == "sum":
        return re.fullmatch(r"-?\d+", value) is not None
    return value in (CAPITALS if kind == "capital" else COLOURS)


def _statement(words: str):
    """(kind, subject, value) of a whole sentence in the world's forms whose value is a fact of its kind or the
    hedge, else None."""
    for kind, pattern in STATEMENTS:
        found = pattern.fullmatch(words)
        if found:
            *subject, value = found.groups()
            real = kind == "sum" or subject[0] in FACTS
            if real and (value == HEDGE_WORDS or _of_its_kind(kind, value)):
                return kind, tuple(subject), value
    return None


def _rambles(words: str, question: str) -> bool:
    tokens = words.split()
    if not tokens or _words(question) in words:
        return True
    if any(a == b == c for a, b, c in zip(tokens, tokens[1:], tokens[2:])):
        return True
    trigrams = list(zip(tokens, tokens[1:], tokens[2:]))
    if len(set(trigrams)) < len(trigrams):
        return True
    return HEAD_ALONE.fullmatch(words) is not None


def judge(question, kind: str, subject: tuple, answer: str) -> int:
    """The class of one answer (1 best, 6 worst)."""
    truth = fact(kind, subject)
    words = _words(answer)
    stated = _statement(words)
    if stated is not None and stated[:2] == (kind, subject):
        reference = {"capital": "the capital of {} is {}", "flag": "the flag of {} is {}"}.get(
            kind, "{} plus {} is {}"
        )
        if is_correct(answer, reference.format(*subject, truth), "exact"):
            return CORRECT
        return HEDGE if stated[2] == HEDGE_WORDS else WRONG_FACT
    if stated is not None:
        return OFF_TOPIC
    return RAMBLING if _rambles(words, question) else BROKEN


def rank(prompt, answers: list[str]) -> list[int]:
    """`alignkit rank`'s judge: each answer's class, 1 (correct) to 6 (rambling); answers of one class tie."""
    kind, subject = question_of(prompt)
    question = (
        prompt if isinstance(prompt, str) else next(m["content"] for m in reversed(prompt) if m["role"] == "user")
    )
    return [judge(question, kind, subject, answer) for answer in answers]
