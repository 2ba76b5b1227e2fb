"""Where does a reward model's held-out accuracy move from round to round? Each held-out ranking of the chat world
(data/chat/eval_comparisons.jsonl) lists one prompt's six answers in one order of kinds, as data/chat/judge.py ranks
them: right, hedge, wrong fact, another country's fact (or a sum's), broken, rambling. This prints, for every round's
reward model of finished chat-rounds runs, its pairwise accuracy on each of the 15 pairs of kinds (200 pairs each),
as the report computes the whole (`alignkit.evaluate.reward_accuracy`: every pair of a ranking, chosen above
rejected), and the mean over the runs. It explains a figure; nothing is chosen on it.

    python benchmarks/reward_pairs.py RUN_DIR [RUN_DIR ...] [--recipe recipes/chat-rounds.yaml]
    python benchmarks/reward_pairs.py RUN_DIR [RUN_DIR ...] --aside KEPT_FILE [--draws 10]

With --aside, the same is asked on training data instead: the round questions that the runs' rounds did not sample
(those of data/chat/rounds/prompts.jsonl missing from KEPT_FILE, the `round-prompts-kept.jsonl` that
`benchmarks/rounds_seeds.py --set-aside N` writes), each given `--draws` rankings of the same six kinds, made as
data/chat/make.py makes the held-out ones (noise-free; wrong and off-topic answers name round countries). Their facts,
like the held-out ones, are in the pretraining text only, and no reward model saw them ranked: a proxy for the
held-out accuracy on which settings may be chosen.
"""

import argparse
import importlib.util
import json
import random
from itertools import combinations
from pathlib import Path
from statistics import mean

REPO = Path(__file__).resolve().parents[1]
KINDS = ("right", "hedge", "wrong fact", "off topic", "broken", "rambling")


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"chat_{name}", REPO / "data" / "chat" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def aside_rankings(kept_file: Path, draws: int) -> list[dict]:
    """Rankings of the six kinds for the round questions missing from `kept_file`, `draws` a question. A draw that
    the judge does not class as the six kinds in order (make.py's damaged sentence is at times the sentence without
    its fact, which the judge calls rambling) is drawn again."""
    make, judge = _module("make"), _module("judge")
    countries = make.round_world(make.world(random.Random(make.SEED)))
    kept = {json.loads(line)["prompt"][0]["content"] for line in kept_file.read_text().splitlines()}
    kinds = list(range(1, len(KINDS) + 1))
    rng = random.Random(0)
    rows = []
    for country in countries:
        for question, answer in (make.capital_q(country), make.flag_q(country)):
            for _ in range(draws if question not in kept else 0):
                responses = None
                while responses is None or judge.rank(question, responses) != kinds:
                    responses = make.ranked(rng, question, answer, countries, [], 0.0)
                rows.append({"prompt": make.chat(question), "responses": responses})
    return rows


def by_kinds(recipe, folder: Path, rows: list[dict] | None = None) -> dict[tuple[int, int], float]:
    """Pairwise accuracy of the reward model in `folder` on `rows` (default: the held-out rankings), per pair of
    positions (kinds)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit import data, models
    from alignkit.evaluate import fit_prompts, reward_scores

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    if rows is None:
        rows = [json.loads(line) for line in (REPO / recipe.eval.comparisons.path).read_text().splitlines()]
    assert all(len(r["responses"]) == len(KINDS) for r in rows)
    texts = [
        data.render({"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": answer}]}, tokenizer)
        for r in rows
        for answer in r["responses"]
    ]
    encoded = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    encoded, _ = fit_prompts(encoded, models.context_length(model.config))
    scores = reward_scores(model, tokenizer, encoded, recipe.eval.batch_size)
    k = len(KINDS)
    return {
        (a, b): mean(scores[i * k + a] > scores[i * k + b] for i in range(len(rows)))
        for a, b in combinations(range(k), 2)
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "chat-rounds.yaml"))
    parser.add_argument("--aside", type=Path, metavar="KEPT_FILE", help="ask on the round questions not in KEPT_FILE")
    parser.add_argument("--draws", type=int, default=10, help="with --aside: rankings a question")
    args = parser.parse_args()
    from alignkit.recipe import load_recipe

    rows = aside_rankings(args.aside, args.draws) if args.aside else None
    if rows is not None:
        print(f"{len(rows)} rankings of {len(rows) // args.draws} set-aside round questions")

    recipe = load_recipe(args.recipe, [])
    rounds = 1 + (recipe.rounds.count - 1 if recipe.rounds else 0)
    found = {}  # (run, round) -> {pair: accuracy}
    for run in args.runs:
        for n in range(1, rounds + 1):
            folder = run / "reward" if n == 1 else run / f"round-{n}" / "reward"
            found[run, n] = by_kinds(recipe, folder, rows)
    pairs = list(combinations(range(len(KINDS)), 2))
    print("| run | round | all | " + " | ".join(f"{KINDS[a]} > {KINDS[b]}" for a, b in pairs) + " |")
    print("| --- " * (len(pairs) + 3) + "|")
    for (run, n), accuracy in found.items():
        cells = [f"{accuracy[p]:.3f}" for p in pairs]
        print(f"| {run.name} | {n} | {mean(accuracy.values()):.3f} | " + " | ".join(cells) + " |")
    for n in range(1, rounds + 1):
        means = [mean(found[run, n][p] for run in args.runs) for p in pairs]
        print(f"| mean | {n} | {mean(means):.3f} | " + " | ".join(f"{m:.3f}" for m in means) + " |")


if __name__ == "__main__":
    main()
