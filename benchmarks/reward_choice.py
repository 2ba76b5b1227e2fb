"""Choosing the reward stage's settings without the held-out prompts: does a reward model generalise to countries
that the reward stage never saw? (A benchmark, not a test.)

    python benchmarks/reward_choice.py --run runs/chat [--seeds 42 1 2] [--out runs/bench-reward-choice]
        [--only NAME ...]

--run is a complete run of recipes/chat.yaml; its sft folder is the upstream. The training rankings
(data/chat/comparisons.jsonl) are split by country: every 4th of the 60 training countries (sorted by name) is set
aside, and each setting below trains the reward stage (`alignkit run recipes/chat.yaml --only reward`, without the
evaluation, which would read the held-out comparisons) on the rankings that name no set-aside country or capital,
in the question or in any answer (the arithmetic rankings included). On the 15 set-aside countries' questions, which
the reward stage never saw (the sft model did see 26 demonstrations about them), it then asks what PPO needs from it
on the held-out prompts: does the right answer (the one the noisy rankings put first most often) score above the
hedge ("... is unknown to me."), and above every other answer seen for that question, and by how much over the
hedge. Each setting trains once per seed (the seed sets the score head's initial weights and the order of the data,
and the answers to these questions vary with it); prints one row per setting and seed and one with the
means. data/chat/eval*.jsonl is never read.
"""

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "chat.yaml"
R = "stages.reward"
SETTINGS = {  # name: overrides of chat.yaml's reward stage
    "pairs 4 ep 1e-4": [f"{R}.all_pairs=true"],
    "pairs 2 ep 2e-4": [f"{R}.all_pairs=true", f"{R}.trainer.num_train_epochs=2", f"{R}.trainer.learning_rate=2e-4"],
    "pairs 1 ep 3e-4": [f"{R}.all_pairs=true", f"{R}.trainer.num_train_epochs=1", f"{R}.trainer.learning_rate=3e-4"],
    "rankings 8 ep 6e-4": [
        f"{R}.all_pairs=false",
        f"{R}.trainer.num_train_epochs=8",
        f"{R}.trainer.learning_rate=6e-4",
    ],
    "rankings 8 ep 1.2e-3": [
        f"{R}.all_pairs=false",
        f"{R}.trainer.num_train_epochs=8",
        f"{R}.trainer.learning_rate=1.2e-3",
    ],
    "rankings 8 ep 6e-4 batch 8": [
        f"{R}.all_pairs=false",
        f"{R}.trainer.num_train_epochs=8",
        f"{R}.trainer.learning_rate=6e-4",
        f"{R}.trainer.per_device_train_batch_size=8",
    ],
    "rankings 16 ep 6e-4": [
        f"{R}.all_pairs=false",
        f"{R}.trainer.num_train_epochs=16",
        f"{R}.trainer.learning_rate=6e-4",
    ],
}


def country(row: dict) -> str | None:
    found = re.search(r"(?:capital|flag) of (\w+)\?", row["prompt"][-1]["content"])
    return found[1] if found else None


def split(rows: list[dict]) -> set[str]:
    names = sorted({c for c in map(country, rows) if c})
    return set(names[::4])


def names_of(aside: set[str]) -> set[str]:
    """The set-aside countries and their capitals (from the pretraining text), as words."""
    capitals = set()
    for line in (REPO / "data" / "chat" / "pretrain.jsonl").read_text().splitlines():
        for m in re.finditer(r"The capital of (\w+) is (\w+)\.", json.loads(line)["text"]):
            if m[1] in aside:
                capitals.add(m[2])
    return aside | capitals


def unseen(row: dict, words: set[str]) -> bool:
    """Whether a ranking names none of `words`, in its question or in any answer (a wrong answer to another
    country's question may name a set-aside country or capital)."""
    return not words & set(re.findall(r"\w+", json.dumps(row)))


def score(folder: Path, rows: list[dict], aside: set[str]) -> dict:
    """On the set-aside countries' questions: right above the hedge, right above every answer, mean margin."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.stages.reward import scored_text

    firsts, answers = {}, {}
    for row in rows:
        if country(row) in aside:
            question = row["prompt"][-1]["content"]
            firsts.setdefault(question, Counter())[row["responses"][0]] += 1
            answers.setdefault(question, (row["prompt"], set()))[1].update(row["responses"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    over_hedge, over_all, margins = 0, 0, []
    for question, counts in firsts.items():
        right = counts.most_common(1)[0][0]
        prompt, seen = answers[question]
        seen = sorted(seen)
        texts = [scored_text({"messages": prompt + [{"role": "assistant", "content": a}]}, tokenizer) for a in seen]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            scores = dict(zip(seen, model(**batch).logits[:, 0].tolist()))
        over_all += all(scores[right] > s for a, s in scores.items() if a != right)
        hedge = next(a for a in seen if "unknown to me" in a)
        over_hedge += scores[right] > scores[hedge]
        margins.append(scores[right] - scores[hedge])
    n = len(firsts)
    return {"questions": n, "over_hedge": over_hedge, "over_all": over_all, "margin": sum(margins) / n}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a complete run of recipes/chat.yaml (pretrain and sft)")
    parser.add_argument("--out", default="runs/bench-reward-choice")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--only", nargs="+", default=list(SETTINGS), help="which settings (names above)")
    args = parser.parse_args()
    run, out = Path(args.run).resolve(), (REPO / args.out).resolve()
    rows = [json.loads(line) for line in (REPO / "data" / "chat" / "comparisons.jsonl").read_text().splitlines()]
    aside = split(rows)
    out.mkdir(parents=True, exist_ok=True)
    fit = out / "fit.jsonl"
    words = names_of(aside)
    kept = [r for r in rows if unseen(r, words)]
    fit.write_text("".join(json.dumps(r) + "\n" for r in kept))
    print(
        f"training on {len(kept)} of {len(rows)} rankings: none names a set-aside country or capital", file=sys.stderr
    )
    results = []
    for name in args.only:
        for seed in args.seeds:
            folder = out / re.sub(r"[^\w.-]+", "_", name) / f"seed{seed}"
            shutil.copytree(run / "sft", folder / "sft", dirs_exist_ok=True)
            cmd = [sys.executable, "-m", "alignkit", "run", str(RECIPE), f"output_dir={folder}", "--only", "reward"]
            cmd += ["--force", f"seed={seed}", f"{R}.dataset.path={fit}", "~eval", *SETTINGS[name]]
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
            seconds = json.loads((folder / "reward" / "alignkit_stage.json").read_text())["seconds"]
            results.append((name, seed, seconds, score(folder / "reward", rows, aside)))
            print(*results[-1], file=sys.stderr, flush=True)
    n = results[0][3]["questions"]
    print(
        f"\nreward models trained on 45 training countries, asked about the other 15 ({n} questions); upstream {run}\n"
    )
    print(
        "| setting | seed | reward stage (s) | right above the hedge | right above every answer "
        "| margin over the hedge |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.only:
        mine = [r for r in results if r[0] == name]
        for _, seed, seconds, r in mine:
            print(
                f"| {name} | {seed} | {seconds:.0f} | {r['over_hedge']}/{n} | {r['over_all']}/{n} "
                f"| {r['margin']:.2f} |"
            )
        mean = {k: statistics.mean(r[3][k] for r in mine) for k in ("over_hedge", "over_all", "margin")}
        print(
            f"| {name} | mean | {statistics.mean(r[2] for r in mine):.0f} | {mean['over_hedge']:.1f}/{n} "
            f"| {mean['over_all']:.1f}/{n} | {mean['margin']:.2f} |"
        )


if __name__ == "__main__":
    main()
