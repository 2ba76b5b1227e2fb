"""Regenerates data/chat/: a small conversational world whose answers a program can check.

    python data/chat/make.py [OUT_DIR]      # deterministic: rewrites the committed files byte for byte

The world: 140 fictional countries, each with a capital and a flag colour, and sums of two numbers below 10.
- pretrain.jsonl  plain text stating every fact many times (the only place the facts of held-out countries appear),
                  and now and then someone who says "that is unknown to me." of a country (HEARSAY): without it the
                  hedge's words never occur in the text and their embeddings stay untrained, and an SFT model
                  that must learn to say them can degenerate ("IIII.");
- sft.jsonl       few, imperfect demonstrations: the demonstrator answers flags and sums, but mostly hedges
                  ("The capital of X is unknown to me.") on capitals, which the pretrained model does know: the
                  systematic flaw that RLHF can fix, as in InstructGPT, where labellers' preferences reach beyond
                  what they demonstrate;
- comparisons.jsonl  K = 6 answers per prompt, best first, ranked by the checker (correct > hedge > wrong fact >
                  off topic > broken > rambling), with 10 % of rankings disturbed by a swap of two neighbours, as
                  labellers are noisy. "Wrong fact" names the wrong capital or colour (judging it takes knowing the
                  fact); "off topic" states a fact about another country or sum (judging it takes reading the
                  question); "broken" is a hedge or an answer with a word dropped, doubled or moved. Wrong and
                  off-topic answers name training countries and sums only: held-out facts appear in no file but
                  pretrain.jsonl, not even as a wrong answer (see main());
- ppo.jsonl       RL prompts (the comparisons' prompts, and some two-turn chats);
- eval.jsonl      held-out prompts with reference answers: other countries and other sums, no prompt shared with any
                  training file; eval_comparisons.jsonl: held-out rankings (noise-free) for the reward model;
- tokenizer/      a byte-level BPE trained on the corpus, with no pad token and no chat template, like GPT-2's.
"""

import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234
N_COUNTRIES, N_TRAIN = 140, 60  # countries 60.. are held out for evaluation
# recipes/chat-rounds.yaml's later rounds ask about countries of their own, drawn from a generator of their own (so
# every file above stays as it was): their facts appear only in rounds/pretrain.jsonl's text, as held-out ones do,
# and their questions in rounds/prompts.jsonl, never in a training or eval file
N_ROUND, ROUND_SEED = 40, 4321
COLOURS = ["red", "blue", "green", "white", "black", "gold", "purple", "orange"]
HEDGE = "unknown to me."  # the demonstrator's hedge ends the answer's sentence: see hedge()
HEDGE_RATE = 0.7  # how often the demonstrator hedges on a capital
HEARSAY = 0.1  # how often the pretraining text has someone hedge about a country
SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ra",
    "zo",
    "ve",
    "tu",
    "ni",
    "sa",
    "pe",
    "do",
    "ri",
    "ba",
    "xu",
    "fe",
    "go",
    "ly",
    "qua",
    "th",
    "or",
    "an",
    "el",
    "is",
    "um",
]


def names(rng, count, lengths, suffixes, taken):
    out = []
    while len(out) < count:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice(lengths))) + rng.choice(suffixes)
        name = name.capitalize()
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def world(rng, count=N_COUNTRIES, taken=None):
    taken = set() if taken is None else taken
    countries = names(rng, count, (2, 3), ("ia", "land", "stan", "or", "esh"), taken)
    capitals = names(rng, count, (2, 3), ("", "ton", "burg", "ville"), taken)
    flags = [rng.choice(COLOURS) for _ in countries]
    return [{"country": c, "capital": k, "flag": f} for c, k, f in zip(countries, capitals, flags)]


def round_world(countries):
    """The later rounds' countries: names none of `countries` has (as country or capital), facts of their own."""
    taken = {c["country"] for c in countries} | {c["capital"] for c in countries}
    return world(random.Random(ROUND_SEED), N_ROUND, taken)


# Answers are stated as the pretraining text states facts, so the knowledge carries over to the answer.
def capital_q(c):
    return f"What is the capital of {c['country']}?", f"The capital of {c['country']} is {c['capital']}."


def hedge(answer):
    """The answer's sentence with the fact replaced by a hedge: "The capital of X is unknown to me.". It starts as
    the answer does, so whether to hedge is decided where the fact would come, where the model's knowledge of it
    is. (A hedge with words of its own, "I am not sure.", put the choice on the first word, where the model could
    only learn one bias for all questions: seed by seed its SFT model hedged on every capital or on none.)"""
    return answer[:-1].rpartition(" ")[0] + " " + HEDGE


def flag_q(c):
    return f"What colour is the flag of {c['country']}?", f"The flag of {c['country']} is {c['flag']}."


def sum_q(a, b):
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."


def pretraining_text(rng, countries):
    """Paragraphs that each describe one country, naming it again and again (so the model learns to carry a name
    from earlier in the text, as an answer must carry it from the question), and tables of sums."""
    lines = []
    for _ in range(10):
        for c in countries:
            x, y, f = c["country"], c["capital"], c["flag"]
            sentences = [
                f"The capital of {x} is {y}.",
                f"{y} is the capital of {x}.",
                f"The flag of {x} is {f}.",
                f"{x} has a {f} flag.",
                f"In {x} people live in {y} under a {f} flag.",
                f"{x} is a country.",
            ]
            lines.append(" ".join(rng.sample(sentences, rng.randint(3, 5))))
            if rng.random() < HEARSAY:
                lines.append(f"A traveller asked about {x}. A child said: that is {HEDGE}")
        for a in range(10):
            others = rng.sample(range(10), 10)
            lines.append(
                " ".join(
                    f"{a} plus {b} is {a + b}." if rng.random() < 0.5 else f"{a} and {b} make {a + b}." for b in others
                )
            )
    rng.shuffle(lines)
    return [{"text": line} for line in lines]


def chat(*turns):
    roles = ["user", "assistant"] * len(turns)
    return [{"role": r, "content": t} for r, t in zip(roles, turns)]


def wrong_answer(rng, question, answer, countries):
    """The demonstrator's slip: half the time an answer about another country, else the wrong fact."""
    if "plus" not in question and rng.random() < 0.5:
        other = rng.choice([c for c in countries if c["country"] not in question])
        return (capital_q if "capital" in question else flag_q)(other)[1]
    return wrong_fact(rng, question, answer, countries)


def wrong_fact(rng, question, answer, countries):
    """The answer's sentence with its last word (the fact) replaced: checking it takes knowing the fact."""
    head, _, fact = answer[:-1].rpartition(" ")
    if "plus" in question:
        options = [str(int(fact) + d) for d in (-3, -2, -1, 1, 2, 3)]
    elif "capital" in question:
        options = [c["capital"] for c in countries if c["capital"] != fact]
    else:
        options = [k for k in COLOURS if k != fact]
    return f"{head} {rng.choice(options)}."


def off_topic(rng, question, countries, sums):
    """A true statement about another country (or another sum): checking it takes only reading the question."""
    if "plus" in question:
        a, b = (int(w) for w in question[:-1].split() if w.isdigit())
        x, y = rng.choice([s for s in sums if s != (a, b)])
        return f"{x} plus {y} is {x + y}."
    other = rng.choice([c for c in countries if c["country"] not in question])
    return (capital_q if "capital" in question else flag_q)(other)[1]


def broken(rng, answer):
    """A damaged sentence, hedge or answer (a word dropped, doubled or moved): what a policy that games a reward
    model emits, so labellers rank such outputs too."""
    sound = [hedge(answer), answer]
    words = rng.choice(sound)[:-1].split()
    own_sum = {" ".join(words[:3]) + " is"} if words[1] == "plus" else set()
    while True:
        out = list(words)
        i, j = rng.sample(range(len(out)), 2)
        kind = rng.choice(("drop", "double", "swap"))
        if kind == "drop":
            del out[i]
        elif kind == "double":
            out.insert(i, out[j])
        else:
            out[i], out[j] = out[j], out[i]
        text = " ".join(out) + "."
        if text not in sound and set(re.findall(r"\b\d+ plus \d+ is\b", text)) <= own_sum:
            return text  # (no words that state another sum, which might be a held-out one: "4 9 plus 5 is 9.")


def rambling(rng, question, answer):
    head = answer[:-1].rpartition(" ")[0]
    return rng.choice([question, f"{head} {head} {head}.", "The the the.", f"{head}."])


def ranked(rng, question, answer, countries, sums, noise):
    """Six answers, best first, as the checker ranks them; with probability `noise` two neighbours swap. Wrong
    and off-topic answers name only `countries` and `sums`."""
    responses = [
        answer,
        hedge(answer),
        wrong_fact(rng, question, answer, countries),
        off_topic(rng, question, countries, sums),
        broken(rng, answer),
        rambling(rng, question, answer),
    ]
    if rng.random() < noise:
        i = rng.randrange(len(responses) - 1)
        responses[i], responses[i + 1] = responses[i + 1], responses[i]
    return responses


def write_jsonl(out, name, rows):
    with open(out / name, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


def main(out=HERE):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    countries = world(rng)
    train, held = countries[:N_TRAIN], countries[N_TRAIN:]
    sums = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(sums)
    train_sums, held_sums = sums[:60], sums[60:]

    write_jsonl(out, "pretrain.jsonl", pretraining_text(rng, countries))

    # Training questions, and the files made from them. No held-out country, capital or sum appears in any of
    # them, not even in a wrong or off-topic answer: where held-out names turned up only in bad answers, the
    # reward model learnt that "The capital of <held-out country> is ..." is off topic and scored every held-out
    # answer low (one seed ranked the right answer to a held-out capital above a wrong one 32% of the time).
    qa = [capital_q(c) for c in train] + [flag_q(c) for c in train] + [sum_q(a, b) for a, b in train_sums]
    rng.shuffle(qa)

    def demonstrate(question, answer):  # the demonstrator: hedges on most capitals, slips now and then
        if "capital" in question and rng.random() < HEDGE_RATE:
            return hedge(answer)
        return wrong_answer(rng, question, answer, train) if rng.random() < 0.05 else answer

    sft = [{"messages": chat(q, demonstrate(q, a))} for q, a in qa[:120]]
    sft += [
        {"messages": chat(q1, demonstrate(q1, a1), q2, demonstrate(q2, a2))}
        for (q1, a1), (q2, a2) in zip(qa[120:160:2], qa[121:160:2])
    ]
    write_jsonl(out, "sft.jsonl", sft)

    comparisons = [
        {"prompt": chat(q), "responses": ranked(rng, q, a, train, train_sums, noise=0.1)} for q, a in qa * 6
    ]
    write_jsonl(out, "comparisons.jsonl", comparisons)
    rl = [{"prompt": chat(q)} for q, _ in qa]
    rl += [{"prompt": chat(q1, a1, q2)} for (q1, a1), (q2, _) in zip(qa[0:40:2], qa[1:40:2])]  # some 2-turn
    write_jsonl(out, "ppo.jsonl", rl)

    held_qa = [capital_q(c) for c in held] + [flag_q(c) for c in held] + [sum_q(a, b) for a, b in held_sums]
    write_jsonl(out, "eval.jsonl", [{"prompt": chat(q), "reference": a} for q, a in held_qa])
    write_jsonl(
        out,
        "eval_comparisons.jsonl",
        [{"prompt": chat(q), "responses": ranked(rng, q, a, held, held_sums, noise=0.0)} for q, a in held_qa],
    )

    # chat-rounds.yaml's files: the pretraining text with the round countries' paragraphs, and their questions
    rounds = round_world(countries)
    extra = random.Random(ROUND_SEED + 1)
    (out / "rounds").mkdir(exist_ok=True)
    text = [r for r in map(json.loads, open(out / "pretrain.jsonl"))]
    text += [r for r in pretraining_text(extra, rounds) if "plus" not in r["text"] and " make " not in r["text"]]
    extra.shuffle(text)
    write_jsonl(out / "rounds", "pretrain.jsonl", text)
    write_jsonl(
        out / "rounds", "prompts.jsonl", [{"prompt": chat(q)} for c in rounds for q in (capital_q(c)[0], flag_q(c)[0])]
    )

    corpus = [r["text"] for r in map(json.loads, open(out / "pretrain.jsonl"))] + [q for q, _ in qa + held_qa]
    # the hedge and the chat roles appear nowhere in the pretraining text: name them often enough to become tokens
    make_tokenizer(out, corpus + [HEDGE, "User: Assistant:"] * 20)


def make_tokenizer(out, texts, vocab_size=1536):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False
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
