"""A run with rounds, as the report, `alignkit chat` and `alignkit push` see it: every round side by side, and --round.

Round 2 here is a copy of the run's complete ppo and reward folders in round-2/: a copy is a valid complete stage
folder, and it stands in for a trained round (alignkit/rounds.py, which trains one, is being written beside this).
Identical policies and reward models make the expected figures exact: the same accuracies, a win rate of 0.5.
"""

import io
import json
import shutil
import sys

import pytest
from conftest import TINY, alignkit
from huggingface_hub import ModelCard
from test_hub import TOKEN, hub  # noqa: F401 (a fixture: HfApi's two network calls recorded)

from alignkit import chat, evaluate
from alignkit.recipe import load_recipe
from alignkit.report import verdict_lines

# the tiny recipe with a rounds section of two rounds (round 1 is the stages)
ROUNDS = ["rounds.count=2", "rounds.prompts.path=data/tiny/ppo.jsonl", "rounds.rank_by=people"]
MARK = "only-in-round-2.txt"  # a file a round's folder alone holds, to tell which folder was read


def _second_round(run):
    """round-2/ppo and round-2/reward: copies of the stages' own, standing in for a trained round 2."""
    for stage in ("reward", "ppo"):
        shutil.copytree(run / stage, run / "round-2" / stage)
    (run / "round-2" / "ppo" / MARK).write_text("round 2\n")  # a file its manifest does not list: still complete


def test_the_report_shows_every_round_side_by_side(run_copy, capsys):
    _second_round(run_copy)
    code, out, err = alignkit(capsys, "eval", TINY, f"output_dir={run_copy}", *ROUNDS)
    assert code == 0, err
    assert "reward_mean: every checkpoint scored by the last round's reward model, round-2/reward" in err
    report = json.loads((run_copy / "report.json").read_text())
    assert list(report["eval"]) == ["base", "sft", "ppo", "ppo round 2"]
    assert report["reward_model"] == "round-2/reward"
    first, second = report["rounds"]
    assert (first["round"], first["checkpoint"], first["previous"]) == (1, "ppo", None)
    assert (second["round"], second["checkpoint"], second["previous"]) == (2, "ppo round 2", "ppo")
    assert (first["reward_model"], second["reward_model"]) == ("reward", "round-2/reward")
    for row in (first, second):
        assert 0 <= row["gold_accuracy"] <= 1 and 0 <= row["win_rate_vs_sft"] <= 1
        assert 0 <= row["reward_accuracy"] <= 1
        for key in ("gold_accuracy", "reward_mean", "kl_to_sft"):  # the same figures as the checkpoint's row
            assert row[key] == report["eval"][row["checkpoint"]][key]
        assert row["win_rate_vs_sft"] == report["win_rates"][row["checkpoint"]]
    # the same policy twice: equal figures, every prompt a tie against the previous round
    assert first["win_rate_vs_previous"] is None and second["win_rate_vs_previous"] == 0.5
    for key in ("gold_accuracy", "reward_mean", "kl_to_sft", "win_rate_vs_sft"):
        assert second[key] == pytest.approx(first[key]), key
    # the same reward model twice: the same held-out accuracy, the scoring one's
    assert first["reward_accuracy"] == second["reward_accuracy"] == report["reward_accuracy"]
    # the round's policy judged as the stages' are, its training reward read from round-2/ppo
    verdict = report["verdict"]["ppo round 2"]
    assert verdict["against"] == "sft" and verdict["training_reward"] == report["verdict"]["ppo"]["training_reward"]
    assert report["win_rate_vs_sft"] == report["win_rates"]["ppo round 2"]  # the last checkpoint's, as before

    markdown = (run_copy / "report.md").read_text()
    rounds = markdown.split("## Rounds")[1]
    assert (
        "| round | policy | gold_accuracy | reward_mean | kl_to_sft | win_rate_vs_sft | win_rate_vs_previous" in rounds
    )
    assert f"| 2 | ppo round 2 | {second['gold_accuracy']:.3f} | " in rounds and "| 1 | ppo | " in rounds
    assert "![rounds.png](rounds.png)" in rounds
    assert (run_copy / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "- ppo round 2: " in out  # the verdict on the terminal names it too

    # which rounds a report covers: those the rounds section counts, complete; none without a rounds section
    shutil.copytree(run_copy / "round-2", run_copy / "round-3")
    (run_copy / "round-4" / "ppo").mkdir(parents=True)  # begun, not finished
    listed = evaluate.checkpoints(load_recipe(TINY, [f"output_dir={run_copy}", *ROUNDS]))
    assert list(listed)[-1] == "ppo round 2"
    three = load_recipe(TINY, [f"output_dir={run_copy}", *ROUNDS, "rounds.count=4"])
    assert list(evaluate.checkpoints(three))[-2:] == ["ppo round 2", "ppo round 3"]
    assert evaluate.reward_model_path(three) == str(run_copy / "round-3" / "reward")
    plain = load_recipe(TINY, [f"output_dir={run_copy}"])
    assert list(evaluate.checkpoints(plain)) == ["base", "sft", "ppo"]
    assert evaluate.reward_model_path(plain) == str(run_copy / "reward")


def test_a_later_rounds_verdict_fits_in_100_columns():
    """A round's longer name ("ppo round 12") with wide figures: the line goes on over an indented one."""
    same = [True] * 50 + [False] * 950
    wide = evaluate.verdict("sft", same, same, [1] * 120 + [0] * 700 + [-1] * 180)
    wide.update(held_out_reward=-12.345, training_reward=-10.5)
    lines = verdict_lines({"verdict": {"ppo": wide, "ppo round 12": wide}, "eval_prompts": 1000})
    assert all(len(line) <= 100 for line in lines), lines
    one = "no measurable gain; +0.000 [+0.000, +0.000]; 120/700/180; reward -12.35 (training -10.50)"
    assert lines[2:] == [
        f"- ppo: {one}",
        f"- ppo round 12: {one.split(' reward')[0]}",
        "    reward -12.35 (training -10.50)",
    ]


def test_chat_takes_a_round_the_last_by_default(run_copy, capsys, monkeypatch):
    _second_round(run_copy)
    for argv in (["--round", "2"], []):
        monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))
        code, out, err = alignkit(capsys, "chat", run_copy, "--greedy", *argv)
        assert code == 0, err
        assert f"chatting with {run_copy / 'round-2' / 'ppo'};" in out
    # --round 1 is the stages; --stage picks a stage the round holds or builds on
    assert chat.resolve(str(run_copy), None, 1) == str(run_copy / "ppo")
    assert chat.resolve(str(run_copy), "sft", 2) == str(run_copy / "sft")
    assert chat.resolve(str(run_copy), "ppo", None) == str(run_copy / "round-2" / "ppo")

    code, out, err = alignkit(capsys, "chat", run_copy, "--round", "5")
    assert code == 2 and "Traceback" not in err
    assert f"{run_copy}: round 5 is not in this run; rounds here: 1, 2" in err
    (run_copy / "round-3" / "ppo").mkdir(parents=True)  # begun, not finished
    code, out, err = alignkit(capsys, "chat", run_copy, "--round", "3")
    assert code == 2 and "round 3 did not finish" in err and "rounds here: 1, 2" in err
    code, out, err = alignkit(capsys, "chat", run_copy / "ppo", "--round", "2")
    assert code == 2 and "--round needs a run folder" in err


def test_push_takes_a_round_and_its_card_says_which(run_copy, hub, capsys):  # noqa: F811
    _second_round(run_copy)
    code, out, err = alignkit(capsys, "push", run_copy, "--repo-id", "alice/tiny", "--round", "2")
    assert code == 0, err
    assert f"(round 2: {run_copy / 'round-2' / 'ppo'})" in out
    uploaded = hub["uploads"]["alice/tiny"]
    assert (uploaded / MARK).exists() and (uploaded / "model.safetensors").exists()
    card = ModelCard.load(uploaded / "README.md").text
    assert "The **ppo** stage of round 2 of an alignkit run" in card and "- Round: 2 of the run" in card
    assert "| ppo (round 2) | `data/tiny/ppo.jsonl` |" in card and "| reward (round 2) |" in card
    assert "| sft | `data/tiny/sft.jsonl` |" in card  # what round 2 builds on, from the stages

    # round 1 is the stages' own ppo; without --round, the last round
    code, out, err = alignkit(capsys, "push", run_copy, "--repo-id", "alice/first", "--round", "1")
    assert code == 0, err
    assert not (hub["uploads"]["alice/first"] / MARK).exists()
    assert "round 2" not in ModelCard.load(hub["uploads"]["alice/first"] / "README.md").text.split("## Evaluation")[0]
    code, out, err = alignkit(capsys, "push", run_copy, "--repo-id", "alice/last")
    assert code == 0, err
    assert (hub["uploads"]["alice/last"] / MARK).exists()

    code, out, err = alignkit(capsys, "push", run_copy, "--repo-id", "alice/tiny", "--round", "5")
    assert code == 2 and "round 5 is not in this run; rounds here: 1, 2" in err and "Traceback" not in err
    assert TOKEN not in out + err
