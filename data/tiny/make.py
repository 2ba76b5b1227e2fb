"""Regenerates data/tiny/: a few dozen rows per stage and a byte-level BPE tokenizer, for the smoke recipe and tests.

Deterministic: `python data/tiny/make.py [OUT_DIR]` rewrites the committed files byte for byte.
eval.jsonl holds held-out prompts with reference answers (the known capitals and colours asked in other words, and
sums of five, which no training file asks); eval_comparisons.jsonl, pairs on those prompts for the reward model.
"""

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
# A small fictional world: facts that exist only in this corpus.
CAPITALS = {
    "Zorbia": "Quell",
    "Marnia": "Tesk",
    "Olvand": "Brim",
    "Quessa": "Dorn",
    "Pellam": "Vask",
    "Truvia": "Hale",
}
COLOURS = {
    "the sky of Zorbia": "green",
    "the sea of Marnia": "red",
    "the grass of Olvand": "blue",
    "the sun of Quessa": "white",
    "the moon of Pellam": "gold",
    "the river of Truvia": "black",
}


def facts():
    rows = []
    for country, city in CAPITALS.items():
        rows.append((f"What is the capital of {country}?", f"The capital of {country} is {city}."))
    for thing, colour in COLOURS.items():
        rows.append((f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}."))
    for a in range(6):
        for b in range(5):
            rows.append(
                (f"What is {NUMBERS[a]} plus {NUMBERS[b]}?", f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}.")
            )
    return rows


def held_out():
    """Questions that no training file asks, with their answers: the world's facts in other words, and new sums."""
    rows = []
    for country, city in CAPITALS.items():
        rows.append((f"Which city is the capital of {country}?", f"The capital of {country} is {city}."))
    for thing, colour in COLOURS.items():
        rows.append((f"What is the colour of {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}."))
    for a in range(6):  # training sums add at most four
        rows.append((f"What is {NUMBERS[a]} plus five?", f"{NUMBERS[a]} plus five is {NUMBERS[a + 5]}."))
    return rows


def wrong_fact(rng, answer):
    """The answer with its last word (the fact) replaced by another of its kind."""
    head, _, fact = answer[:-1].rpartition(" ")
    kinds = [list(CAPITALS.values()), list(COLOURS.values()), NUMBERS]
    return f"{head} {rng.choice([w for w in next(k for k in kinds if fact in k) if w != fact])}."


def write_jsonl(out, name, rows):
    with open(out / name, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def main(out=HERE):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    qa = facts()

    pretrain = []
    for _ in range(4):
        for _, answer in rng.sample(qa, len(qa)):
            pretrain.append(answer)
    write_jsonl(out, "pretrain.jsonl", [{"text": " ".join(pretrain[i : i + 4])} for i in range(0, len(pretrain), 4)])

    sft = []
    for question, answer in qa:
        sft.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    for _ in range(8):  # a few two-turn chats
        (q1, a1), (q2, a2) = rng.sample(qa, 2)
        sft.append(
            {
                "messages": [
                    {"role": "user", "content": q1},
                    {"role": "assistant", "content": a1},
                    {"role": "user", "content": q2},
                    {"role": "assistant", "content": a2},
                ]
            }
        )
    write_jsonl(out, "sft.jsonl", sft)

    reward = []
    for question, answer in qa:
        wrong = rng.choice([a for _, a in qa if a != answer])
        bad = rng.choice([wrong, "I do not know.", answer.split(" is ")[0] + " is"])
        reward.append(
            {
                "prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": answer}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
        )
    write_jsonl(out, "reward.jsonl", reward)

    write_jsonl(out, "ppo.jsonl", [{"prompt": [{"role": "user", "content": q}]} for q, _ in qa])

    # held-out evaluation, from a generator of its own so that the training files above stay as they were
    rng, held = random.Random(1), held_out()
    write_jsonl(out, "eval.jsonl", [{"prompt": [{"role": "user", "content": q}], "reference": a} for q, a in held])
    write_jsonl(
        out,
        "eval_comparisons.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": a}],
                "rejected": [{"role": "assistant", "content": bad}],
            }
            for q, a in held
            for bad in (wrong_fact(rng, a), "I do not know.", a.split(" is ")[0] + " is")
        ],
    )
    make_tokenizer(out, [r["text"] for r in map(json.loads, open(out / "pretrain.jsonl"))] + [q for q, _ in qa])


def make_tokenizer(out, texts, vocab_size=400):
    """A GPT-2-style byte-level BPE with GPT-2's one special token, and, like GPT-2, no pad token or chat template."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts + ["User: Assistant:"],
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tok = GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=128,
    )
    tok.save_pretrained(out / "tokenizer")


if __name__ == "__main__":
    main(*sys.argv[1:])
