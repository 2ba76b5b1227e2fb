"""What report.json holds, in words and tables: shared by the report (evaluate.py) and the Hub's model card (hub.py),
which read the same figures."""

from __future__ import annotations

from .log import INDENT, WIDTH
from .stages import ORDER

BASE = "base"  # the checkpoint name of the model a run starts from, or pretrains from scratch
REFERENCE = next(s.name for s in ORDER if s.eval_reference)  # what KL and win rates are measured against
KL, WIN_RATE = f"kl_to_{REFERENCE}", f"win_rate_vs_{REFERENCE}"
LEVEL = 0.95  # of the verdict's interval on the change in gold accuracy
KL_NOTE = (
    f"{KL} is a sampled estimate, the mean of log p_checkpoint - log p_{REFERENCE} over the checkpoint's "
    f"sampled answers, so for a model close to {REFERENCE} it can come out slightly below zero: sampling noise, "
    "not a negative divergence (the true KL is never negative)."
)


def round_checkpoint(stage: str, n: int) -> str:
    """A checkpoint's name: a stage's own in round 1 (the stages), "ppo round 2" for a later round's output."""
    return stage if n == 1 else f"{stage} round {n}"


def checkpoint_round(name: str) -> tuple[str, int]:
    """The stage and round of a checkpoint name, round_checkpoint() undone (base: round 1)."""
    stage, _, n = name.partition(" round ")
    return (stage, int(n)) if n.isdigit() else (name, 1)


ROUND_COLUMNS = ("gold_accuracy", "reward_mean", KL, WIN_RATE, "win_rate_vs_previous", "reward_accuracy")


def fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def eval_table(results: dict) -> list[str]:
    """The checkpoints' metrics as a Markdown table."""
    columns = ["gold_accuracy", "reward_mean", KL, "length_mean", "eos_rate", "repetition"]
    return ["| checkpoint | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"] + [
        f"| {name} | " + " | ".join(fmt(values.get(c)) for c in columns) + " |" for name, values in results.items()
    ]


def rounds_table(rounds: list[dict]) -> list[str]:
    """The rounds block of report.json as a Markdown table: a row per round, its policy then its reward model."""
    return ["| round | policy | " + " | ".join(ROUND_COLUMNS) + " |", "|---" * (len(ROUND_COLUMNS) + 2) + "|"] + [
        f"| {r['round']} | {r['checkpoint']} | " + " | ".join(fmt(r.get(c)) for c in ROUND_COLUMNS) + " |"
        for r in rounds
    ]


def rounds_lines(report: dict) -> list[str]:
    """The report's Rounds section (report.md and the Hub's card): what the columns mean, then the table; none for a
    run without rounds."""
    rounds = report.get("rounds")
    if not rounds:
        return []
    return [
        "## Rounds",
        "",
        "Each round's policy on the held-out prompts and its reward model on the held-out comparisons "
        f"(reward_accuracy). reward_mean: every round scored by one reward model, {report.get('reward_model')}, "
        f"so the rounds compare. {WIN_RATE} and win_rate_vs_previous (against the previous round's policy): ties "
        "count half.",
        "",
        *rounds_table(rounds),
        "",
    ]


def shows_kl(results: dict) -> bool:
    """Whether the table holds a sampled KL (the reference's own is 0 by definition, not an estimate)."""
    return any(v.get(KL) is not None for name, v in results.items() if name != REFERENCE)


def win_rate_lines(report: dict) -> list[str]:
    """One line per policy trained after the reference: its win rate against it, and of what."""
    verdicts = report.get("verdict") or {}
    return [
        f"- Win rate of {name} against {REFERENCE} (ties count half): {fmt(rate)}"
        + (f" (wins/ties/losses {v['wins']}/{v['ties']}/{v['losses']})" if (v := verdicts.get(name)) else "")
        for name, rate in (report.get("win_rates") or {}).items()
    ]


def _signed(value: float) -> str:
    return f"{value + 0.0:+.3f}"  # + 0.0: no "-0.000"


def verdict_lines(report: dict) -> list[str]:
    """The verdict on each policy trained after the reference: a two-line key, then one line each, e.g.
    `- ppo: no measurable gain; +0.000 [-0.056, +0.056]; 0/18/0; reward -2.21 (training -0.45)`; a line wider than
    100 columns (a later round's longer name, "ppo round 2") goes on over an indented one."""
    verdicts = report.get("verdict") or {}
    if not verdicts:
        return []
    against = next(iter(verdicts.values()))["against"]
    lines = [
        f"Verdict against {against} on {report['eval_prompts']} held-out prompts: gold accuracy change "
        f"[{LEVEL:.0%} interval];",
        "wins/ties/losses; the reward model's mean score of the answers (of the training samples):",
    ]
    for name, v in verdicts.items():
        parts = [f"- {name}: {v['conclusion']}"]
        if v["interval"] is not None:
            lo, hi = v["interval"]
            parts.append(f"{_signed(v['gold_accuracy_diff'])} [{_signed(lo)}, {_signed(hi)}]")
        parts.append(f"{v['wins']}/{v['ties']}/{v['losses']}")
        if v["held_out_reward"] is not None:
            training = v["training_reward"]
            parts.append(
                f"reward {v['held_out_reward']:.2f}" + (f" (training {training:.2f})" if training is not None else "")
            )
        line = "; ".join(parts)
        if len(line) > WIDTH:
            cut = line.rindex("; ", 0, WIDTH)
            lines += [line[: cut + 1], INDENT + line[cut + 2 :]]
        else:
            lines.append(line)
    return lines
