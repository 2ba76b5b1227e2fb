"""How much does a reward model's held-out accuracy move with the order of the same data alone? Trains a recipe's
reward stage again with several `data_seed`s on one finished run's sft model, and prints each one's pairwise accuracy
on the recipe's held-out comparisons (as the report computes it), beside the run's own reward model.

    python benchmarks/reward_noise.py RUN_DIR [--recipe recipes/chat-rounds.yaml] [--data-seeds 1 2 3]
        [--out runs/reward-noise] [KEY=VALUE ...]

RUN_DIR holds a finished run of the recipe (its sft and reward folders); each data seed trains in
{out}/data-seedN/ on a copy of RUN_DIR's pretrain and sft, with the recipe's settings and the overrides given (pass the
run's seed=N). It measures the noise the rounds' "the reward model's held-out accuracy does not fall" sits in.
"""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from statistics import mean, stdev

REPO = Path(__file__).resolve().parents[1]


def accuracy(recipe, folder: Path) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.evaluate import reward_accuracy

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    return reward_accuracy(recipe, model, AutoTokenizer.from_pretrained(folder))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "chat-rounds.yaml"))
    parser.add_argument("--data-seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=Path("runs/reward-noise"))
    parser.add_argument("overrides", nargs="*", help="recipe overrides (the run's seed=N among them)")
    args = parser.parse_args()
    from alignkit.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    found = {"the run's own": accuracy(recipe, args.run / "reward")}
    for seed in args.data_seeds:
        out = args.out / f"data-seed{seed}"
        for stage in ("pretrain", "sft"):
            if (args.run / stage).is_dir() and not (out / stage).exists():
                shutil.copytree(args.run / stage, out / stage)
        command = [sys.executable, "-m", "alignkit", "run", args.recipe, *args.overrides, f"output_dir={out}"]
        command += [f"stages.reward.trainer.data_seed={seed}", "--only", "reward"]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)
        found[f"data_seed {seed}"] = accuracy(recipe, out / "reward")
    for name, value in found.items():
        print(f"{name}: held-out pairwise accuracy {value:.4f}")
    values = list(found.values())
    print(f"mean {mean(values):.4f} ± {stdev(values):.4f}, range {max(values) - min(values):.4f}")


if __name__ == "__main__":
    main()
