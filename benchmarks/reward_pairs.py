"""Where does a reward model's held-out accuracy move from round to round? Each held-out ranking of the chat world
(data/chat/eval_comparisons.jsonl) lists one prompt's six answers in one order of kinds, as data/chat/judge.py ranks
them: right, hedge, wrong fact, another country's fact (or a sum's), broken, rambling. This prints, for every round's
reward model of finished chat-rounds runs, its pairwise accuracy on each of the 15 pairs of kinds (200 pairs each),
as the report computes the whole (`alignkit.evaluate.reward_accuracy`: every pair of a ranking, chosen above
rejected), and the mean over the runs. It explains a figure; nothing is chosen on it.

    python benchmarks/reward_pairs.py RUN_DIR [RUN_DIR ...] [--recipe recipes/chat-rounds.yaml]
"""

import argparse
import json
from itertools import combinations
from pathlib import Path
from statistics import mean

REPO = Path(__file__).resolve().parents[1]
KINDS = ("right", "hedge", "wrong fact", "off topic", "broken", "rambling")


def by_kinds(recipe, folder: Path) -> dict[tuple[int, int], float]:
    """Pairwise accuracy of the reward model in `folder` on the held-out rankings, per pair of positions (kinds)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit import data, models
    from alignkit.evaluate import fit_prompts, reward_scores

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
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
    args = parser.parse_args()
    from alignkit.recipe import load_recipe

    recipe = load_recipe(args.recipe, [])
    rounds = 1 + (recipe.rounds.count - 1 if recipe.rounds else 0)
    found = {}  # (run, round) -> {pair: accuracy}
    for run in args.runs:
        for n in range(1, rounds + 1):
            folder = run / "reward" if n == 1 else run / f"round-{n}" / "reward"
            found[run, n] = by_kinds(recipe, folder)
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
