"""A round ranked by people, end to end: `alignkit run` stops waiting for them, people rank on the page (a browser
ranking as the chat world's judge would), and the same `alignkit run` goes on, round 2's reward model training on
the page's rankings. The chat world's round questions on the tiny recipe's finished run."""

import json

import pytest
from conftest import FAST, TINY, alignkit, summary
from labelling import REPO, chromium, server

from alignkit.label.store import db_path_for
from alignkit.rank import load_judge

playwright = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' installs playwright")


def rank_on_the_page(page, samples: dict, judge) -> list[int]:
    """Order the answers shown as `judge` ranks them, by keys alone (number, arrows, t for ties), and submit."""
    question = page.locator("#conversation .message").evaluate("m => m.lastChild.textContent")
    row = samples[question]
    answers = [a for a in row["responses"]]
    ranks = judge(row["prompt"], answers)
    wanted = sorted(answers, key=lambda a: ranks[answers.index(a)])  # best first, ties in the sampled order
    for pos, answer in enumerate(wanted):
        shown = page.locator("#answers .text").all_inner_texts()
        page.keyboard.press(page.locator("#answers li").nth(shown.index(answer)).get_attribute("data-key"))
        for _ in range(shown.index(answer) - pos):
            page.keyboard.press("ArrowUp")
    for pos in range(1, len(wanted)):
        if ranks[answers.index(wanted[pos])] == ranks[answers.index(wanted[pos - 1])]:
            page.keyboard.press(page.locator("#answers li").nth(pos).get_attribute("data-key"))
            page.keyboard.press("t")
    assert page.locator("#answers .text").all_inner_texts() == wanted
    page.keyboard.press("Enter")
    page.wait_for_function(
        "q => !document.querySelector('#conversation').innerText.includes(q) || "
        "!document.querySelector('#finished').hidden",
        arg=question,
    )
    return ranks


def test_people_rank_a_round_on_the_page_and_the_run_goes_on(run_copy, tmp_path, capsys):
    guide = tmp_path / "guide.md"
    guide.write_text("## Rank by the facts\n- A **right** capital first\n- <b>never</b> markup\n")
    settings = [
        f"rounds.guidelines={guide}",
        "rounds.count=2",
        "rounds.prompts.path=data/chat/rounds/prompts.jsonl",
        "rounds.rank_by=people",
        "rounds.min_ranked=3",
        "rounds.stages.reward.num_train_epochs=2",
        "rounds.stages.ppo.total_episodes=16",
    ]
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings)
    here = run_copy / "round-2"
    assert code == 3, err
    assert f"Open the page with `alignkit label {here}`" in err and "0 of 80 prompts are ranked" in err

    samples = {}
    for line in (here / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        samples.setdefault(row["prompt"][0]["content"], row)  # a question asked twice: its first row's answers
    judge, given = load_judge(f"{REPO / 'data' / 'chat' / 'judge.py'}:rank"), []
    with server(run_copy, "--labeller", "ann") as (base, url, proc):  # the run's folder: its waiting round
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
            page = browser.new_context(bypass_csp=True).new_page()
            page.goto(url)
            page.wait_for_selector("#answers li")
            page.keyboard.press("g")  # the recipe's guidelines, in a panel, as markdown (and markup as text)
            assert page.locator("#guidelines h3").inner_text() == "Rank by the facts"
            assert page.locator("#guidelines strong").inner_text() == "right"
            assert "<b>never</b> markup" in page.locator("#guidelines").inner_text()
            page.keyboard.press("g")
            for _ in range(3):
                given.append(rank_on_the_page(page, samples, judge))
            browser.close()
    assert db_path_for(here / "samples.jsonl").is_file()

    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings)
    assert code == 0, err
    assert "3 of 80 prompts ranked by people (3 rankings; 3 prompts on the labelling page" in err
    ranked = [json.loads(line) for line in (here / "ranked.jsonl").read_text().splitlines()]
    # the page's rankings are the judge's, ties and all (as 1, 2, 2, 4 where the judge gave classes 1, 3, 3, 5)
    assert [r["ranks"] for r in ranked] == [[1 + sum(x < v for x in g) for v in g] for g in given]
    assert all(r["provenance"]["labeller"] == "ann" for r in ranked)
    assert f"+ 3 rankings of round 2 ({here / 'ranked.jsonl'})" in err
    metrics = json.loads((here / "reward" / "metrics.json").read_text())
    all_ties = sum(len(set(r)) == 1 for r in given)
    assert metrics["rankings"]["trained"] + metrics["rankings"]["all_ties"] == 42 + 3
    assert metrics["rankings"]["all_ties"] == all_ties
    assert summary(out)["round-2/ppo"] == "trained"
