"""The alignment tax and PPO-ptx on the chat world (a benchmark, not a test).

    python benchmarks/ptx_tax.py [--seeds 42 1 2 3] [--out runs/seeds] [--ptx-coef 1.0] [--questions held-out]

For each seed, OUT/seedN must hold a complete run of recipes/chat.yaml with that seed (benchmarks/ppo_vs_trl.py or
benchmarks/chat_seeds.py make them). Its pretrain, sft and reward folders are copied to OUT/seedN-ptx, where the
ppo stage trains again with `stages.ppo.trainer.ptx_coef` set (PPO-ptx: a language-modelling loss on the pretraining
text in every PPO step), and the run is evaluated as usual. Then sft, ppo and ppo-ptx answer the held-out questions
greedily (data/chat/eval.jsonl; --questions training takes the training questions of data/chat/comparisons.jsonl, to
choose ptx_coef without looking at the held-out ones), and the script prints, per seed and summed, how many
capitals, flags and sums each gets right: what PPO loses of what SFT knew (the tax), and what ptx wins back.
"""

import argparse
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "chat.yaml"
KINDS = (("capital", "capitals"), ("flag", "flags"), ("plus", "sums"))


def kind_of(question: str) -> str:
    return next((name for word, name in KINDS if word in question), "other")


def training_questions() -> list[dict]:
    """The training comparisons' questions, each with the answer its rankings put first most often as the reference
    (the rankings are noisy: a single one may put a wrong answer first)."""
    firsts, prompts = {}, {}
    for line in (REPO / "data" / "chat" / "comparisons.jsonl").read_text().splitlines():
        row = json.loads(line)
        question = row["prompt"][-1]["content"]
        prompts[question] = row["prompt"]
        firsts.setdefault(question, Counter())[row["responses"][0]] += 1
    return [{"prompt": prompts[q], "reference": c.most_common(1)[0][0]} for q, c in firsts.items()]


def counts(folder: Path, rows: list[dict]) -> Counter:
    """How many questions of each kind the policy in `folder` answers exactly right, greedily."""
    from alignkit.evaluate import greedy_answers, is_correct

    answers = greedy_answers(folder, rows, 20)
    right = Counter()
    for row, answer in zip(rows, answers):
        kind = kind_of(row["prompt"][-1]["content"])
        right[kind, "of"] += 1
        right[kind] += is_correct(answer, row["reference"], "exact")
    return right


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3])
    parser.add_argument("--out", default="runs/seeds")
    parser.add_argument("--ptx-coef", type=float, default=1.0)
    parser.add_argument("--questions", choices=("held-out", "training"), default="held-out")
    parser.add_argument("overrides", nargs="*", help="more recipe overrides for the ppo-ptx runs")
    args = parser.parse_args()
    if args.questions == "training":
        rows = training_questions()
    else:
        rows = [json.loads(line) for line in (REPO / "data" / "chat" / "eval.jsonl").read_text().splitlines()]
    table, reports = [], []
    for seed in args.seeds:
        run, ptx = REPO / args.out / f"seed{seed}", REPO / args.out / f"seed{seed}-ptx{args.ptx_coef:g}"
        if not (run / "ppo" / "alignkit_stage.json").is_file():
            sys.exit(f"{run} has no complete ppo stage: run benchmarks/chat_seeds.py --seeds {seed} --out {args.out}")
        for stage in ("pretrain", "sft", "reward"):
            shutil.copytree(run / stage, ptx / stage, dirs_exist_ok=True)
        cmd = [sys.executable, "-m", "alignkit", "run", str(RECIPE), f"seed={seed}", f"output_dir={ptx}"]
        cmd += [f"stages.ppo.trainer.ptx_coef={args.ptx_coef}", *args.overrides]
        if args.questions == "training":  # choosing ptx_coef: the held-out evaluation stays unseen
            cmd.append("~eval")
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        with open(ptx.with_suffix(".log"), "w") as log:
            done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            sys.exit(f"seed {seed}: the ppo-ptx run failed (exit {done.returncode}); see {ptx.with_suffix('.log')}")
        if args.questions == "held-out":
            reports.append((seed, *(json.loads((r / "report.json").read_text()) for r in (run, ptx))))
        table.append(
            (
                seed,
                {
                    name: counts(folder, rows)
                    for name, folder in (("sft", run / "sft"), ("ppo", run / "ppo"), ("ppo-ptx", ptx / "ppo"))
                },
            )
        )

    kinds = [name for _, name in KINDS]
    print(
        f"\n{args.questions} questions answered exactly right, greedily (ptx_coef {args.ptx_coef:g}); "
        "of: how many of each kind\n"
    )
    print(f"{'seed':>5s} {'model':8s} " + " ".join(f"{k:>9s}" for k in kinds))
    total = {name: Counter() for name in ("sft", "ppo", "ppo-ptx")}
    for seed, by_model in table:
        for name, right in by_model.items():
            total[name].update(right)
            print(f"{seed:5d} {name:8s} " + " ".join(f"{right[k]:4d}/{right[k, 'of']:<4d}" for k in kinds))
    for name, right in total.items():
        print(f"{'all':>5s} {name:8s} " + " ".join(f"{right[k]:4d}/{right[k, 'of']:<4d}" for k in kinds))
    if reports:
        print("\nheld-out gold accuracy (the evaluation's, all kinds) and KL to sft, per seed:")
    for seed, ours, theirs in reports:
        print(
            f"  seed {seed}: sft {ours['eval']['sft']['gold_accuracy']:.3f}, "
            f"ppo {ours['eval']['ppo']['gold_accuracy']:.3f} "
            f"(KL {ours['eval']['ppo']['kl_to_sft']:.2f}), ppo-ptx {theirs['eval']['ppo']['gold_accuracy']:.3f} "
            f"(KL {theirs['eval']['ppo']['kl_to_sft']:.2f})"
        )


if __name__ == "__main__":
    main()
