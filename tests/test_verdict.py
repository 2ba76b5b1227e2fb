"""The report's verdict (what each policy trained after SFT bought, with its uncertainty), and figures labelled with
the step they were logged at: the functions on hand-made data, then through the real entry point."""

import json
import re
import shutil

import numpy as np
import pytest
from conftest import FAST, TINY, alignkit, summary

from alignkit.evaluate import RESAMPLES, outcomes, paired_bootstrap, verdict, win_rate
from alignkit.report import verdict_lines

LINE = re.compile(
    r"^- (\w+): (no measurable gain|better|worse); ([+-]\d\.\d{3}) \[([+-]\d\.\d{3}), ([+-]\d\.\d{3})\]; "
    r"(\d+)/(\d+)/(\d+)(?:; reward (-?\d+\.\d\d)(?: \(training (-?\d+\.\d\d)\))?)?$"
)


def _report(verdicts: dict, prompts: int) -> dict:
    return {"verdict": verdicts, "eval_prompts": prompts}


# --- on hand-made data --------------------------------------------------------------------------------------------


def test_identical_answers_are_all_ties_and_no_measurable_gain():
    correct = [True, False, True, True, False, False]
    answers = ["a", "b", "c", "d", "e", "f"]
    references = ["a", "x", "c", "d", "y", "z"]
    judged = outcomes(answers, answers, references, "exact", [], [])
    assert judged == [0] * 6
    v = verdict("sft", correct, correct, judged)
    assert v["gold_accuracy_diff"] == 0.0 and v["interval"] == [0.0, 0.0]
    assert (v["wins"], v["ties"], v["losses"]) == (0, 6, 0)
    assert v["conclusion"] == "no measurable gain"
    assert win_rate(judged) == 0.5  # what the report showed, now with the ties behind it


def test_the_conclusion_follows_the_interval():
    right, wrong = [True] * 20, [False] * 20
    better = verdict("sft", right, wrong, [1] * 20)
    assert better["gold_accuracy_diff"] == 1.0 and better["interval"] == [1.0, 1.0]
    assert better["conclusion"] == "better"
    # 15 of 20 lost, none won: worse, and the interval excludes 0
    worse = verdict("sft", [False] * 15 + [True] * 5, [True] * 20, [-1] * 15 + [0] * 5)
    assert worse["gold_accuracy_diff"] == -0.75 and worse["interval"][1] < 0
    assert worse["conclusion"] == "worse" and (worse["wins"], worse["ties"], worse["losses"]) == (0, 5, 15)
    # one prompt of 18 gained: within the noise
    small = verdict("sft", [True] + [False] * 17, [False] * 18, [1] + [0] * 17)
    lo, hi = small["interval"]
    assert lo <= 0 <= hi and lo <= small["gold_accuracy_diff"] <= hi
    assert small["conclusion"] == "no measurable gain"


def test_the_interval_is_the_paired_bootstrap_and_reproducible():
    rng = np.random.default_rng(1)
    a, b = rng.random(200) < 0.6, rng.random(200) < 0.5
    diff, (lo, hi) = paired_bootstrap(list(a), list(b))
    assert paired_bootstrap(list(a), list(b)) == (diff, (lo, hi))  # a fixed seed
    # resampling the prompts themselves (the pairs kept together) gives the same interval, to sampling noise
    d = a.astype(int) - b.astype(int)
    means = d[rng.integers(0, len(d), (RESAMPLES, len(d)))].mean(axis=1)
    assert diff == pytest.approx(d.mean())
    assert lo == pytest.approx(np.quantile(means, 0.025), abs=0.01)
    assert hi == pytest.approx(np.quantile(means, 0.975), abs=0.01)


def test_ties_are_counted_whoever_judges():
    """By the reference answer where a row has one, else by the reward model; a row neither can judge is left out."""
    policy, reference = ["yes", "no", "a", "b"], ["yes", "yes", "c", "d"]
    references = ["yes", "yes", None, None]
    judged = outcomes(policy, reference, references, "exact", [0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0])
    assert judged == [0, -1, 1, 0]
    assert outcomes(policy, reference, references, "exact", [], []) == [0, -1, None, None]
    v = verdict("sft", [True, False, None, None], [True, True, None, None], judged)
    assert (v["wins"], v["ties"], v["losses"]) == (1, 2, 1)
    assert v["gold_accuracy_diff"] == -0.5  # on the two rows with a reference
    assert win_rate(judged) == (1 + 2 / 2) / 4
    none = verdict("sft", [None] * 4, [None] * 4, judged)
    assert none["interval"] is None and none["conclusion"] == "no gold answers"


def test_verdict_lines_fit_in_100_columns():
    wide = {
        "ppo": {
            **verdict("sft", [True] * 50 + [False] * 950, [False] * 1000, [1] * 120 + [0] * 700 + [-1] * 180),
            "held_out_reward": -12.345,
            "training_reward": -10.5,
        },
        "dpo": verdict("sft", [None] * 1000, [None] * 1000, [1] * 500 + [-1] * 500),
    }
    lines = verdict_lines(_report(wide, 1000))
    assert len(lines) == 4 and all(len(line) <= 100 for line in lines), lines
    assert "Verdict against sft on 1000 held-out prompts" in lines[0] and "95% interval" in lines[0]
    ppo = LINE.match(lines[2])
    assert ppo and ppo.groups()[1:] == (
        "better",
        "+0.050",
        *(f"{x:+.3f}" for x in wide["ppo"]["interval"]),
        "120",
        "700",
        "180",
        "-12.35",
        "-10.50",
    )
    assert lines[3] == "- dpo: no gold answers; 500/0/500"
    assert verdict_lines(_report({}, 18)) == []


# --- through the real entry point ---------------------------------------------------------------------------------


def test_the_run_ends_with_the_verdict_and_labels_figures_logged_before_the_last_step(run_copy, capsys):
    """One run: pretrain again, logging every 7 of its 60 steps (its last figures then date from step 56), and the
    stages built on it, then the evaluation of the run's checkpoints and the verdict on ppo; then the run without its
    sft stage, judged against the earliest checkpoint."""
    logging = "stages.pretrain.trainer.logging_steps=7"
    code, out, err = alignkit(
        capsys, "run", TINY, f"output_dir={run_copy}", *FAST, "--only", "pretrain", "--force", logging
    )  # (--force: logging_steps alone changes no weights, and would leave the stage as it is)
    assert code == 0, err
    # what was built on the old pretrain is out of date now: the report waits for it, saying so
    assert "eval: left out: sft: built on pretrain, which was trained again since" in err
    assert f"eval: skipped: no sft or ppo model in {run_copy} up to date; alignkit run" in err
    pretrained = err
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, logging)
    assert code == 0, err
    assert summary(out) == {"pretrain": "reused", "sft": "trained", "reward": "trained", "ppo": "trained"}
    err = pretrained + err
    history = json.loads((run_copy / "pretrain" / "metrics.json").read_text())["log_history"]
    last, logged = history[-1]["step"], [h["step"] for h in history if "loss" in h][-1]
    assert logged < last
    loss = f"{[h['loss'] for h in history if 'loss' in h][-1]:.4g}"
    assert f"pretrain: step {last}/{last}  loss {loss} (at step {logged})  grad norm " in err
    assert re.search(rf"pretrain: done in [\d.]+s, loss {loss} \(at step {logged}\) -> ", err)
    assert re.search(rf"pretrain: step 7/{last}  loss [\d.]+  grad norm [\d.]+  ", err)  # logged now: no label

    report = json.loads((run_copy / "report.json").read_text())
    assert set(report["verdict"]) == {"ppo"}
    v, n = report["verdict"]["ppo"], report["eval_prompts"]
    assert v["against"] == "sft" and v["wins"] + v["ties"] + v["losses"] == n == 18
    assert report["win_rates"]["ppo"] == pytest.approx((v["wins"] + v["ties"] / 2) / n)
    for name, correct in report["correct"].items():  # per prompt, and the same figure as the table's
        assert len(correct) == n and sum(correct) / n == pytest.approx(report["eval"][name]["gold_accuracy"])
    lo, hi = v["interval"]
    assert v["gold_accuracy_diff"] == pytest.approx(
        report["eval"]["ppo"]["gold_accuracy"] - report["eval"]["sft"]["gold_accuracy"]
    )
    assert lo <= v["gold_accuracy_diff"] <= hi
    assert v["conclusion"] == ("no measurable gain" if lo <= 0 <= hi else "better" if lo > 0 else "worse")
    assert v["held_out_reward"] == report["eval"]["ppo"]["reward_mean"]
    scores = [
        h["objective/scores"]
        for h in json.loads((run_copy / "ppo" / "metrics.json").read_text())["log_history"]
        if "objective/scores" in h
    ]
    assert v["training_reward"] == pytest.approx(sum(scores) / len(scores))

    # the terminal ends with the verdict, as report.md has it
    tail = out.strip().splitlines()[-3:]
    assert tail[0].startswith("Verdict against sft on 18 held-out prompts") and all(len(x) <= 100 for x in tail)
    line = LINE.match(tail[-1])
    assert line and line[1] == "ppo" and line[2] == v["conclusion"]
    assert tuple(map(int, line.groups()[5:8])) == (v["wins"], v["ties"], v["losses"])
    assert float(line[3]) == pytest.approx(v["gold_accuracy_diff"], abs=5e-4)
    assert float(line[10]) == pytest.approx(v["training_reward"], abs=5e-3)
    markdown = (run_copy / "report.md").read_text()
    assert tail[-1] in markdown and f"(wins/ties/losses {v['wins']}/{v['ties']}/{v['losses']})" in markdown
    assert f"- **pretrain**: loss {float(loss):.3f} (at step {logged})" in markdown

    # without sft, against the earliest checkpoint (base), through `alignkit eval`
    shutil.rmtree(run_copy / "sft")
    code, out, err = alignkit(capsys, "eval", TINY, f"output_dir={run_copy}")
    assert code == 0, err
    report = json.loads((run_copy / "report.json").read_text())
    assert list(report["eval"]) == ["base", "ppo"] and report["win_rates"] == {}
    v = report["verdict"]["ppo"]
    assert v["against"] == "base" and v["wins"] + v["ties"] + v["losses"] == 18
    assert out.strip().splitlines()[-3].startswith("Verdict against base on 18 held-out prompts")
    assert out.strip().splitlines()[-1].startswith(f"- ppo: {v['conclusion']}; ")
