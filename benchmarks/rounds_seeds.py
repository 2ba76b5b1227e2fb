"""Do more rounds help? Runs recipes/chat-rounds.yaml with several seeds and prints, per seed and round, what the
round's policy does on the 200 held-out prompts.

    python benchmarks/rounds_seeds.py [--seeds 42 1 2 3] [--out runs/rounds] [--set-aside N] [KEY=VALUE ...]

Each seed is `alignkit run recipes/chat-rounds.yaml seed=N output_dir={out}/seedN` (a finished run is reused: with
{out}/seedN holding a chat.yaml run of that seed, only the later rounds train). Then, for sft and every round's
policy, from the run's report.json: held-out gold accuracy, KL to sft, win rate against the previous round and the
round's reward model's held-out pairwise accuracy; and, greedy on the same prompts as the report, how each answer
is classed by data/chat/judge.py: correct, hedge ("... unknown to me."), wrong fact, off topic (a fact of another
country, kind or sum: the failure issue 24 set out to fix), broken, rambling.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from chat_seeds import spread  # noqa: E402  (the same mean ± sd)

CLASSES = ("correct", "hedge", "wrong fact", "off topic", "broken", "rambling")


def classes(folder: Path, rows: list[dict], max_new_tokens: int) -> list[int]:
    """Greedy answers of the model in `folder` to the eval rows, as alignkit eval draws them, classed by the judge."""
    from alignkit.evaluate import greedy_answers
    from alignkit.rank import load_judge

    judge = load_judge(f"{REPO / 'data' / 'chat' / 'judge.py'}:rank")
    answers = greedy_answers(folder, rows, max_new_tokens)
    return [judge(row["prompt"], [answer.strip()])[0] for row, answer in zip(rows, answers)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3])
    parser.add_argument("--out", default="runs/rounds")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "chat-rounds.yaml"))
    parser.add_argument(
        "--set-aside",
        type=int,
        default=0,
        metavar="N",
        help="leave every Nth round country's questions out of the rounds' prompts and count the policy's right "
        "answers to them: countries no round asked about, as the held-out ones (settings chosen on these)",
    )
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run")
    args = parser.parse_args()
    from alignkit.pipeline import ROUND_POLICY, stage_folder

    rows = [json.loads(line) for line in (REPO / "data" / "chat" / "eval.jsonl").read_text().splitlines()]
    round_rows = [json.loads(line) for line in (REPO / "data/chat/rounds/prompts.jsonl").read_text().splitlines()]
    aside = []
    if args.set_aside:  # two questions a country, in file order: every Nth country's pair is kept out of the rounds
        pairs = [round_rows[i : i + 2] for i in range(0, len(round_rows), 2)]
        aside = [row for i, pair in enumerate(pairs) if i % args.set_aside == args.set_aside - 1 for row in pair]
        round_rows = [row for i, pair in enumerate(pairs) if i % args.set_aside != args.set_aside - 1 for row in pair]
        (REPO / args.out).mkdir(parents=True, exist_ok=True)
        kept = REPO / args.out / "round-prompts-kept.jsonl"
        kept.write_text("".join(json.dumps(row) + "\n" for row in round_rows))
        args.overrides = [f"rounds.prompts.path={kept}", *args.overrides]
    table, by_round = [], {}
    for seed in args.seeds:
        out = REPO / args.out / f"seed{seed}"
        cmd = [sys.executable, "-m", "alignkit", "run", args.recipe, f"seed={seed}", f"output_dir={out}"]
        print("$", " ".join([*cmd, *args.overrides]), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(REPO / args.out / f"seed{seed}.log", "w") as log:
            done = subprocess.run([*cmd, *args.overrides], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            sys.exit(f"seed {seed} failed (exit {done.returncode}); see {args.out}/seed{seed}.log")
        report = json.loads((out / "report.json").read_text())
        rounds = {r["checkpoint"]: r for r in report.get("rounds") or []}
        for name in ["sft", *rounds]:
            folder = out / "sft" if name == "sft" else stage_folder(out, ROUND_POLICY, rounds[name]["round"])
            counted = classes(folder, rows, 20)
            asked = classes(
                folder, round_rows, 20
            )  # the rounds' own (training) questions: settings are chosen on these
            figures = report["eval"][name]
            entry = {
                "seed": seed,
                "checkpoint": name,
                "round": rounds[name]["round"] if name in rounds else 0,
                "gold": figures["gold_accuracy"],
                "kl": figures.get("kl_to_sft"),
                "win_prev": rounds.get(name, {}).get("win_rate_vs_previous"),
                "rm": rounds.get(name, {}).get("reward_accuracy"),
                **{c: counted.count(i + 1) for i, c in enumerate(CLASSES)},
                "training correct": asked.count(1),
                **({"set-aside correct": classes(folder, aside, 20).count(1)} if aside else {}),
            }
            table.append(entry)
            by_round.setdefault(entry["round"], []).append(entry)
            print(json.dumps(entry), flush=True)

    print(
        "\n| seed | policy | gold accuracy | KL to sft | win rate vs previous | reward model acc. | "
        + " | ".join(CLASSES)
        + " |"
    )
    print("|" + " --- |" * (6 + len(CLASSES)))
    for e in table:
        cells = [
            e["seed"],
            e["checkpoint"],
            f"{e['gold']:.3f}",
            "" if e["kl"] is None else f"{e['kl']:.2f}",
            "" if e["win_prev"] is None else f"{e['win_prev']:.3f}",
            "" if e["rm"] is None else f"{e['rm']:.3f}",
            *[e[c] for c in CLASSES],
        ]
        print("| " + " | ".join(map(str, cells)) + " |")
    print("\nmeans over seeds:")
    for n, entries in sorted(by_round.items()):
        print(
            f"  {'sft' if n == 0 else f'round {n}'}: gold {spread([e['gold'] for e in entries])}, "
            f"reward model {spread([e['rm'] for e in entries])}, "
            f"off topic {spread([e['off topic'] for e in entries])}, "
            f"round questions right of {len(round_rows)} (training) {spread([e['training correct'] for e in entries])}"
            + (
                f", set aside right of {len(aside)} {spread([e['set-aside correct'] for e in entries])}"
                if aside
                else ""
            )
        )
    first = {e["seed"]: e["gold"] for e in by_round.get(1, [])}
    for n in sorted(k for k in by_round if k > 1):
        gains = [e["gold"] - first[e["seed"]] for e in by_round[n]]
        print(f"  round {n} - round 1: {spread(gains)} (per seed {', '.join(f'{g:+.3f}' for g in gains)})")


if __name__ == "__main__":
    main()
