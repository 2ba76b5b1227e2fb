"""Does RLHF help, reliably? Runs recipes/chat.yaml with several seeds and prints held-out results per checkpoint.

    python benchmarks/chat_seeds.py [--seeds 1 2 3] [--out runs/bench] [--recipe recipes/chat.yaml] [KEY=VALUE ...]

With --recipe recipes/chat-dpo.yaml the runs add a DPO stage, and the table shows ppo and dpo side by side (with the
same --out, the stages the two recipes share are reused).

Each seed is a whole run (pretraining included: the seed sets the initial weights), about 8-9 minutes on 2 CPU cores.
To run seeds side by side, start one benchmark per seed with OMP_NUM_THREADS=1 each: two runs that each take
every core slow each other down about tenfold.
Prints, per checkpoint, the mean and spread (sample standard deviation) over seeds of the held-out gold accuracy,
KL to SFT and the reward model's score, then the gain of each policy after sft (ppo, dpo) over sft, the reward
model's held-out pairwise accuracy, the win rates against SFT and the training time. Runs already complete are reused,
so an interrupted benchmark resumes; a run's own output (progress bars included) goes to {out}/seed{N}.log.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "chat.yaml"))
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run")
    args = parser.parse_args()

    reports = []
    for seed in args.seeds:
        out = Path(args.out) / f"seed{seed}"
        cmd = [
            sys.executable,
            "-m",
            "alignkit",
            "run",
            args.recipe,
            f"seed={seed}",
            f"output_dir={out}",
            *args.overrides,
        ]
        print("$", " ".join(cmd), flush=True)
        log = REPO / args.out / f"seed{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            done = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode:
            sys.exit(f"seed {seed} failed (exit {done.returncode}); its output is in {log}")
        reports.append(json.loads((REPO / out / "report.json").read_text()))

    print(f"\n{args.recipe} over seeds {args.seeds} ({reports[0]['eval_prompts']} held-out prompts)\n")
    print(f"{'checkpoint':10s} {'gold_accuracy':>16s} {'kl_to_sft':>16s} {'reward_mean':>16s}")
    names = list(reports[0]["eval"])
    for name in names:
        rows = [r["eval"].get(name, {}) for r in reports]
        print(
            f"{name:10s} "
            + " ".join(
                f"{spread([x.get(k) for x in rows]):>16s}" for k in ("gold_accuracy", "kl_to_sft", "reward_mean")
            )
        )
    for name in names[names.index("sft") + 1 :]:
        gains = [r["eval"][name]["gold_accuracy"] - r["eval"]["sft"]["gold_accuracy"] for r in reports]
        print(f"\n{name} - sft gold accuracy: {spread(gains)}   (per seed: {', '.join(f'{g:+.3f}' for g in gains)})")
        print(f"win rate of {name} against sft: {spread([r.get('win_rates', {}).get(name) for r in reports])}")
    print(f"reward model held-out pairwise accuracy: {spread([r['reward_accuracy'] for r in reports])}")
    # A reused stage reports the seconds it took when it was trained, so this is the training time even on a rerun.
    trained = [sum(s["seconds"] for s in r["stages"].values()) for r in reports]
    print(f"seconds of training per run (stages, as trained): {spread(trained)}")
    for stage in reports[0]["stages"]:
        print(f"  {stage}: {spread([r['stages'].get(stage, {}).get('seconds') for r in reports])}")
    print(f"wall seconds of this invocation per run: {spread([r['wall_seconds'] for r in reports])}")


if __name__ == "__main__":
    main()
