"""Do the rounds' rankings cost a reward model on countries it never saw ranked, among the training ones? The check
benchmarks/reward_pairs.py cannot make without the held-out rankings: the same split as benchmarks/reward_choice.py
(every 4th of the 60 training countries set aside; the reward stage trains on the rankings of comparisons.jsonl that
name none of them), once on those rankings alone and once with a finished chat-rounds run's round 2 and 3 rankings
added (those that name no set-aside country or capital either), from that run's sft model with its seed. Each
reward model is then asked, on the set-aside countries' questions, what reward_choice.py asks: the right answer above
the hedge, above every answer seen for the question, and by how much over the hedge. data/chat/eval*.jsonl is never
read.

    python benchmarks/reward_rounds_aside.py [--runs runs/rounds-rs] [--seeds 42 1 2 3] [--out runs/rm-rounds]

Both variants give every ranking explicit ranks (a ranking's repeated answers kept once, in its order), as a file
that mixes rankings with and without `ranks` must.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import reward_choice  # noqa: E402  (the split, the words to keep out, the questions asked)

RECIPE = REPO / "recipes" / "chat-rounds.yaml"
ASKED = ("over_hedge", "over_all", "margin")


def ranked(row: dict) -> dict:
    """A ranking with its `ranks` (the rounds'), or a comparisons.jsonl one given them: best first, repeats once."""
    if row.get("ranks"):
        return {"prompt": row["prompt"], "responses": row["responses"], "ranks": row["ranks"]}
    answers = list(dict.fromkeys(row["responses"]))
    return {"prompt": row["prompt"], "responses": answers, "ranks": list(range(1, len(answers) + 1))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/rounds-rs"), help="seedN folders of chat-rounds runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3])
    parser.add_argument("--out", type=Path, default=Path("runs/rm-rounds"))
    args = parser.parse_args()
    rows = [json.loads(line) for line in (REPO / "data" / "chat" / "comparisons.jsonl").read_text().splitlines()]
    aside = reward_choice.split(rows)
    words = reward_choice.names_of(aside)
    base = [ranked(r) for r in rows if reward_choice.unseen(r, words)]
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    found = {}
    for seed in args.seeds:
        run = (REPO / args.runs / f"seed{seed}").resolve()
        rounds = [
            ranked(json.loads(line))
            for n in (2, 3)
            for line in (run / f"round-{n}" / "rankings.jsonl").read_text().splitlines()
        ]
        added = [r for r in rounds if reward_choice.unseen(r, words)]
        for name, slug, data in (
            ("comparisons", "alone", base),
            ("comparisons + rounds", "with-rounds", base + added),
        ):
            path = out / f"{slug}-seed{seed}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in data))
            folder = out / slug / f"seed{seed}"
            for stage in ("pretrain", "sft"):
                shutil.copytree(run / stage, folder / stage, dirs_exist_ok=True)
            command = [sys.executable, "-m", "alignkit", "run", str(RECIPE), f"output_dir={folder}", "--only"]
            command += ["reward", "--force", f"seed={seed}", f"stages.reward.dataset.path={path}", "~eval", "~rounds"]
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
            found[name, seed] = reward_choice.score(folder / "reward", rows, aside)
            print(
                seed, name, f"{len(data)} rankings ({len(added)} of {len(rounds)} from the rounds)", found[name, seed]
            )
    n = next(iter(found.values()))["questions"]
    print("\n| trained on | seed | right above the hedge | right above every answer | margin over the hedge |")
    print("| --- | --- | --- | --- | --- |")
    for name in ("comparisons", "comparisons + rounds"):
        for seed in args.seeds:
            r = found[name, seed]
            print(f"| {name} | {seed} | {r['over_hedge']}/{n} | {r['over_all']}/{n} | {r['margin']:.2f} |")
        mean = {k: statistics.mean(found[name, s][k] for s in args.seeds) for k in ASKED}
        print(f"| {name} | mean | {mean['over_hedge']:.2f}/{n} | {mean['over_all']:.2f}/{n} | {mean['margin']:.2f} |")


if __name__ == "__main__":
    main()
