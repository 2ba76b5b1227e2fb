"""A later round's reward stage under other settings, judged on training data only: the round questions a set-aside
run never sampled. For each seed of finished `rounds_seeds.py --set-aside N` runs, the last round's reward model is
trained again from the run's sft model on what that round's trained on (comparisons.jsonl and every later round's
rankings), once as the recipe has it and once per variant (recipe overrides), and asked what `reward_pairs.py
--aside` asks: its pairwise accuracy by kind of answer on rankings made for the set-aside questions. Settings for the
rounds' reward models are chosen on this, never on the held-out rankings.

    python benchmarks/reward_rounds_proxy.py --runs runs/sa-rs [--seeds 42 1 2 3] [--out runs/rm-proxy]
        --variant lr3e-4 stages.reward.trainer.learning_rate=3e-4 [--variant NAME KEY=VALUE ...]
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from itertools import combinations
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import reward_pairs  # noqa: E402  (the rankings made for the set-aside questions, the accuracy by kind)
from reward_rounds_aside import ranked  # noqa: E402  (every ranking with explicit ranks, as a mixed file must be)

RECIPE = REPO / "recipes" / "chat-rounds.yaml"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/sa-rs"), help="seedN folders of set-aside runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3])
    parser.add_argument("--out", type=Path, default=Path("runs/rm-proxy"))
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"))
    args = parser.parse_args()
    from alignkit.recipe import load_recipe

    recipe = load_recipe(str(RECIPE), [])
    last = recipe.rounds.count
    runs = (REPO / args.runs).resolve()
    asked = reward_pairs.aside_rankings(runs / "round-prompts-kept.jsonl", 10)
    comparisons = [
        json.loads(line) for line in (REPO / "data" / "chat" / "comparisons.jsonl").read_text().splitlines()
    ]
    out = (REPO / args.out).resolve()
    variants = [("as shipped", [])] + [(v[0], v[1:]) for v in args.variant]
    found = {}
    for seed in args.seeds:
        run = runs / f"seed{seed}"
        rounds = [
            ranked(json.loads(line))
            for n in range(2, last + 1)
            for line in (run / f"round-{n}" / "rankings.jsonl").read_text().splitlines()
        ]
        data = out / f"seed{seed}.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(r) + "\n" for r in [ranked(r) for r in comparisons] + rounds))
        for name, overrides in variants:
            folder = out / name.replace(" ", "-") / f"seed{seed}"
            for stage in ("pretrain", "sft"):
                shutil.copytree(run / stage, folder / stage, dirs_exist_ok=True)
            command = [sys.executable, "-m", "alignkit", "run", str(RECIPE), f"output_dir={folder}", "--only"]
            command += ["reward", "--force", f"seed={seed}", f"stages.reward.dataset.path={data}", "~eval", "~rounds"]
            done = subprocess.run([*command, *overrides], cwd=REPO, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{' '.join(command + overrides)} failed:\n{done.stderr[-3000:]}")
            found[name, seed] = reward_pairs.by_kinds(recipe, folder / "reward", asked)
            accuracy = found[name, seed]
            print(seed, name, f"all {statistics.mean(accuracy.values()):.3f}, right > wrong fact {accuracy[0, 2]:.3f}")
    pairs = list(combinations(range(len(reward_pairs.KINDS)), 2))
    print(f"\n{len(asked)} rankings of {len(asked) // 10} set-aside questions; seeds {args.seeds}")
    print("| settings | all 15 pairs, per seed | mean | right > wrong fact, per seed | mean |")
    print("| --- | --- | --- | --- | --- |")
    for name, _ in variants:
        every = [statistics.mean(found[name, s][p] for p in pairs) for s in args.seeds]
        fact = [found[name, s][0, 2] for s in args.seeds]
        print(
            f"| {name} | {', '.join(f'{a:.3f}' for a in every)} | {statistics.mean(every):.3f} | "
            f"{', '.join(f'{a:.3f}' for a in fact)} | {statistics.mean(fact):.3f} |"
        )


if __name__ == "__main__":
    main()
