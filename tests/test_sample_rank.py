"""`alignkit sample` and `alignkit rank`: answers drawn from a run's own policy stages, blind and with their
provenance, ordered by a judge program with ties, and the reward stage trained on ties (only strictly ordered pairs
count)."""

import json
import math
from collections import Counter

import pytest
import torch
from conftest import REPO, TINY, alignkit

PROMPTS = REPO / "data" / "tiny" / "ppo.jsonl"
SAMPLE = ["--k", "4", "--max-new-tokens", "16", "--batch-size", "16"]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def samples(run_dir, tmp_path_factory):
    """4 answers per prompt from the tiny run's ppo and sft stages, seed 7, written twice by the same command."""
    from alignkit.cli import main

    folder = tmp_path_factory.mktemp("samples")
    argv = ["sample", run_dir, "--stage", "ppo", "--stage", "sft", "--prompts", PROMPTS, *SAMPLE, "--seed", "7"]
    for name in ("a.jsonl", "b.jsonl"):
        assert main([str(a) for a in [*argv, "--round", "2", "--out", folder / name]]) == 0
    return folder


def test_sample_draws_k_distinct_answers_from_both_stages_blind_with_provenance(samples, run_dir):
    rows = _rows(samples / "a.jsonl")
    prompts = _rows(PROMPTS)
    manifests = {s: json.loads((run_dir / s / "alignkit_stage.json").read_text()) for s in ("ppo", "sft")}
    models = [
        {"stage": s, "model": str(run_dir / s), "fingerprint": manifests[s]["fingerprint"]} for s in ("ppo", "sft")
    ]
    assert len(rows) == len(prompts) == 42  # the tiny models do not repeat themselves four times in a row
    firsts = Counter()
    for row in rows:
        where = row["provenance"]["prompt"]
        assert where.startswith(f"{PROMPTS}:")
        assert row["prompt"] == prompts[int(where.rsplit(":", 1)[1]) - 1]["prompt"]
        answers = row["responses"]
        assert 2 <= len(answers) <= 4 and row["ranks"] is None
        assert all(a.strip() for a in answers) and len({a.strip() for a in answers}) == len(answers)
        provenance = row["provenance"]
        assert provenance["models"] == models
        assert {k: provenance[k] for k in ("k", "temperature", "top_p", "max_new_tokens", "seed", "round")} == {
            "k": 4,
            "temperature": 1.0,
            "top_p": 1.0,
            "max_new_tokens": 16,
            "seed": 7,
            "round": 2,
        }
        sources = provenance["sources"]
        assert len(sources) == len(answers) and set(sources) <= {0, 1}
        if len(answers) == 4:
            assert sorted(sources) == [0, 0, 1, 1]  # K = 4 shared evenly by the two stages
        firsts[sources[0]] += 1
    assert firsts[0] > 5 and firsts[1] > 5  # shuffled: either stage's answer comes first, often
    # the same command and seed write the same file
    assert (samples / "a.jsonl").read_bytes() == (samples / "b.jsonl").read_bytes()


def test_another_seed_draws_other_answers_and_the_file_is_read_as_prompts_not_as_rankings(
    samples, run_dir, tmp_path, capsys
):
    from alignkit import data
    from alignkit.recipe import Dataset

    out = tmp_path / "c.jsonl"
    code, _, err = alignkit(
        capsys, "sample", run_dir, "--stage", "ppo", "--stage", "sft", "--prompts", PROMPTS, *SAMPLE, "--out", out
    )
    assert code == 0, err
    assert "sample: wrote 42 prompts" in err
    assert [r["responses"] for r in _rows(out)] != [r["responses"] for r in _rows(samples / "a.jsonl")]
    # unranked rows give the ppo stage its prompts, and no stage that needs their order
    assert len(data.load(Dataset(path=str(out)), "ppo", None, "prompts")) == 42
    code, _, err = alignkit(capsys, "validate", TINY, f"stages.reward.dataset.path={out}")
    assert code == 2 and f"{out}:1: the answers of this row are not ranked yet" in err


def test_each_answer_is_attributed_to_the_model_that_drew_it(run_dir, tmp_path, capsys):
    """Under the sft model, the answers the file says sft drew are far likelier than those it says pretrain drew."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "s.jsonl"
    code, _, err = alignkit(
        capsys, "sample", run_dir, "--stage", "pretrain", "--stage", "sft", "--prompts", PROMPTS, *SAMPLE, "--out", out
    )
    assert code == 0, err
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "sft")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "sft").eval()
    per_token = {"pretrain": [], "sft": []}
    for row in _rows(out):
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        start = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        for answer, source in zip(row["responses"], row["provenance"]["sources"]):
            ids = torch.tensor([tokenizer(prompt + answer, add_special_tokens=False).input_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
            per_token[row["provenance"]["models"][source]["stage"]].append(logp[start - 1 :].mean().item())
    sft, pretrain = (sum(v) / len(v) for v in (per_token["sft"], per_token["pretrain"]))
    assert len(per_token["sft"]) > 40 and len(per_token["pretrain"]) > 40
    assert sft > pretrain + 0.5, (sft, pretrain)


def test_sample_refuses_prompts_held_out_by_the_recipe(run_dir, tmp_path, capsys):
    train = _rows(PROMPTS)[:2]
    held = json.loads((REPO / "data" / "tiny" / "eval.jsonl").read_text().splitlines()[2])["prompt"]
    # the held-out question with other spacing: the same prompt to whoever trains on it
    spaced = [{"role": "user", "content": "  " + held[0]["content"].replace(" ", "  ")}]
    prompts = _write(tmp_path / "prompts.jsonl", [*train, {"prompt": spaced}])
    out = tmp_path / "out.jsonl"
    code, _, err = alignkit(
        capsys, "sample", run_dir, "--prompts", prompts, "--out", out, "--recipe", TINY, "--max-new-tokens", "8"
    )
    assert code == 2
    assert "1 of 3 prompts are held out by" in err and f"{prompts}:3: also data/tiny/eval.jsonl:3" in err
    assert not out.exists()
    # without the held-out row it goes on, with every sampling setting at its default, as README's example runs it
    _write(prompts, train)
    code, _, err = alignkit(capsys, "sample", run_dir, "--prompts", prompts, "--out", out, "--recipe", TINY)
    assert code == 0, err
    rows = _rows(out)
    assert len(rows) == 2 and all(2 <= len(r["responses"]) <= 4 and r["ranks"] is None for r in rows)
    settings = rows[0]["provenance"]
    assert (settings["k"], settings["temperature"], settings["top_p"], settings["max_new_tokens"]) == (4, 1.0, 1.0, 64)
    assert settings["models"][0]["stage"] == "ppo"  # the run's last policy stage


def test_answers_a_model_cannot_vary_are_drawn_again_then_left_out_and_long_prompts_are_cut(run_dir, tmp_path, capsys):
    """Near-greedy sampling gives one answer per prompt however often it is drawn: the re-draws are counted, the
    answers that stayed equal (or empty) are left out, and so are prompts left with fewer than two. And with room for
    120 new tokens in a context of 128, every prompt is cut from the left to 8 tokens."""
    import re

    prompts = _write(tmp_path / "p.jsonl", _rows(PROMPTS)[:3])
    out = tmp_path / "o.jsonl"
    options = ["--k", "3", "--temperature", "1e-4", "--redraws", "2", "--max-new-tokens", "120"]
    code, _, err = alignkit(capsys, "sample", run_dir, "--stage", "sft", "--prompts", prompts, "--out", out, *options)
    assert code == 2, err  # no prompt is left to rank: refused, and no empty file written
    assert (
        "sample: warning: sft: 3 of 3 prompts longer than 8 tokens (the model's context less --max-new-tokens)" in err
    )
    redrawn = re.search(
        r"(\d+) answers drawn again .*after 2 tries (\d+) stayed equal to another and (\d+) empty", err
    )
    assert redrawn and int(redrawn[1]) == 2 * 6 and int(redrawn[2]) + int(redrawn[3]) == 6, err
    assert "3 of 3 prompts left with fewer than two different answers are not in the file" in err
    assert f"--prompts {prompts}: no prompt got two different answers" in err and "Traceback" not in err
    assert not out.exists()


def test_bad_sampling_settings_are_refused_naming_the_option(run_dir, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    (tmp_path / "d.jsonl").mkdir()
    for options, message in (
        (["--k", "1"], "--k 1: a ranking needs at least two answers"),
        (["--k", "2", "--stage", "ppo", "--stage", "sft", "--stage", "pretrain"], "cannot be shared among 3 models"),
        (["--temperature", "0"], "--temperature 0.0: give a number above 0"),
        (["--max-new-tokens", "128"], "--max-new-tokens 128 leaves no room for a prompt"),
        (["--seed", "-1"], "--seed -1: give a whole number from 0 to 4294967295"),
        (["--out", tmp_path / "o.csv"], f"--out {tmp_path / 'o.csv'}: write the rankings as JSON Lines"),
        (["--out", tmp_path / "d.jsonl"], f"--out {tmp_path / 'd.jsonl'}: a folder; give a file's path"),
    ):
        code, _, err = alignkit(capsys, "sample", run_dir, "--prompts", PROMPTS, "--out", out, *options)
        assert code == 2 and message in err, (options, err)
        assert not out.exists()


# --- rank -----------------------------------------------------------------------------------------------------------

JUDGES = """
def by_length(prompt, answers):  # shorter is better; equal lengths tie
    lengths = sorted(set(map(len, answers)))
    return [lengths.index(len(a)) + 1 for a in answers]

def raises(prompt, answers):
    if "boom" in str(prompt):
        raise RuntimeError("cannot judge this one")
    return [1] * len(answers)

def one_short(prompt, answers):
    return list(range(1, len(answers)))

def halves(prompt, answers):
    return [1.5] * len(answers)

def zero(prompt, answers):
    return [0] * len(answers)

def huge(prompt, answers):
    return [1] + [10**20] * (len(answers) - 1)

def edits(prompt, answers):  # a judge that tidies the prompt it is given, in place
    prompt[0]["content"] = prompt[0]["content"].upper()
    return list(range(1, len(answers) + 1))
"""


@pytest.fixture
def judges(tmp_path):
    path = tmp_path / "judges.py"
    path.write_text(JUDGES)
    return path


def test_rank_orders_answers_with_a_judge_ties_included_and_keeps_every_column(samples, judges, tmp_path, capsys):
    from alignkit import data
    from alignkit.recipe import Dataset

    ranked = tmp_path / "ranked.jsonl"
    code, _, err = alignkit(capsys, "rank", samples / "a.jsonl", "--by", f"{judges}:by_length", "--out", ranked)
    assert code == 0, err
    before, after = _rows(samples / "a.jsonl"), _rows(ranked)
    assert len(after) == len(before)
    for old, new in zip(before, after):
        lengths = sorted(set(map(len, old["responses"])))
        assert new["ranks"] == [lengths.index(len(a)) + 1 for a in old["responses"]]
        assert new["ranked_by"] == f"{judges}:by_length"
        assert {k: v for k, v in new.items() if k not in ("ranks", "ranked_by")} == {
            k: v for k, v in old.items() if k != "ranks"
        }
    pairs = sum(1 for r in after for a in r["ranks"] for b in r["ranks"] if a < b)
    assert f"ranked {len(after)} prompts with {judges}:by_length: {pairs} ordered pairs" in err
    # the reward stage reads them best first, the ranks beside; DPO gets the strictly ordered pairs
    rankings = data.load(Dataset(path=str(ranked)), "reward", None, "rankings")
    for row, new in zip(rankings, after):
        assert row["ranks"] == sorted(new["ranks"])
        assert [a[0]["content"] for a in row["ranked"]] == [
            a for _, a in sorted(zip(new["ranks"], new["responses"]), key=lambda x: x[0])
        ]
    assert len(data.load(Dataset(path=str(ranked)), "dpo", None, "comparisons")) == pairs
    assert (samples / "a.jsonl").read_bytes() == (samples / "b.jsonl").read_bytes()  # the input untouched


def test_rank_takes_a_module_importable_from_here_and_rewrites_in_place(judges, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _write(tmp_path / "s.jsonl", [{"prompt": "Q", "responses": ["aa", "b", "cc"], "ranks": None}])
    code, _, err = alignkit(capsys, "rank", path, "--by", "judges:by_length")
    assert code == 0, err
    assert _rows(path) == [
        {"prompt": "Q", "responses": ["aa", "b", "cc"], "ranks": [2, 1, 2], "ranked_by": "judges:by_length"}
    ]


@pytest.mark.parametrize(
    "judge, rows, message",
    [
        (
            "raises",
            [{"prompt": "fine"}, {"prompt": "boom"}],
            ":2: the judge {judges}:raises raised RuntimeError: cannot",
        ),
        (
            "one_short",
            [{"prompt": "Q"}],
            ":1: the judge {judges}:one_short returned [1, 2], which gives 2 ranks for 3",
        ),
        ("halves", [{"prompt": "Q"}], ":1: the judge {judges}:halves returned [1.5, 1.5, 1.5], which has 1.5 for"),
        ("zero", [{"prompt": "Q"}], ":1: the judge {judges}:zero returned [0, 0, 0], which has 0 for 'responses'[0]"),
        (
            "huge",  # beyond what a reader's integers hold: refused here, not as an overflow when the stage reads it
            [{"prompt": "Q"}],
            ":1: the judge {judges}:huge returned [1, 100000000000000000000, 100000000000000000000], which has "
            "100000000000000000000 for 'responses'[1]; a rank is a whole number from 1 (the best) to 1,000,000,000",
        ),
        ("by_length", [{"prompt": "Q"}, {"responses": ["a", "b", "a"]}], ":2: 'responses'[2] repeats 'responses'[0]"),
        ("by_length", [{"responses": ["a", " ", "c"]}], ":1: 'responses'[1] is empty"),
        ("by_length", [{"responses": ["a"]}], ":1: 'responses' must list at least two answers"),
        (
            "missing",
            [{"prompt": "Q"}],
            "has no function missing (it has: by_length, edits, halves, huge, one_short, raises, zero)",
        ),
    ],
)
def test_rank_refuses_bad_judges_and_bad_rows_naming_the_row_and_writes_nothing(
    judges, tmp_path, capsys, judge, rows, message
):
    path = _write(
        tmp_path / "s.jsonl", [{"prompt": "Q", "responses": ["a", "bb", "ccc"], "ranks": None, **r} for r in rows]
    )
    before = path.read_bytes()
    out = tmp_path / "ranked.jsonl"
    code, _, err = alignkit(capsys, "rank", path, "--by", f"{judges}:{judge}", "--out", out)
    assert code == 2 and message.format(judges=judges) in err, err
    assert not out.exists() and path.read_bytes() == before


def test_rank_gives_the_judge_a_copy_loads_it_as_a_module_and_checks_where_it_writes(judges, tmp_path, capsys):
    ask = [{"role": "user", "content": "What is the capital of Zorbia?"}]
    path = _write(tmp_path / "s.jsonl", [{"prompt": ask, "responses": ["a", "bb"], "ranks": None}])
    out = tmp_path / "new" / "folder" / "r.jsonl"  # made as it is written
    code, _, err = alignkit(capsys, "rank", path, "--by", f"{judges}:edits", "--out", out)
    assert code == 0, err
    assert _rows(out)[0]["prompt"] == ask and _rows(out)[0]["ranks"] == [1, 2]  # the judge's edit stays its own
    # a judge whose module needs its own name registered (a dataclass under postponed annotations) loads
    typed = tmp_path / "typed.py"
    typed.write_text(
        "from __future__ import annotations\nfrom dataclasses import dataclass\n\n@dataclass\nclass Verdict:\n"
        "    rank: int\n\ndef rank(prompt, answers):\n    return [Verdict(len(a)).rank for a in answers]\n"
    )
    code, _, err = alignkit(capsys, "rank", path, "--by", f"{typed}:rank", "--out", out)
    assert code == 0, err
    assert _rows(out)[0]["ranks"] == [1, 2]
    # where it cannot write JSON Lines: refused before the judge runs, nothing written
    array = _write(tmp_path / "s.json", [])
    array.write_text(json.dumps([{"prompt": "Q", "responses": ["a", "bb"], "ranks": None}]))
    (tmp_path / "d.jsonl").mkdir()
    for argv, message in (
        ([array], f"{array}: rankings are written as JSON Lines, not over a .json file; give --out FILE.jsonl"),
        ([path, "--out", tmp_path / "d.jsonl"], f"--out {tmp_path / 'd.jsonl'}: a folder; give a file's path"),
        ([path, "--out", tmp_path / "r.csv"], f"--out {tmp_path / 'r.csv'}: write the rankings as JSON Lines"),
    ):
        before = argv[0].read_bytes()
        code, _, err = alignkit(capsys, "rank", *argv, "--by", f"{judges}:by_length")
        assert code == 2 and message in err and "Traceback" not in err, err
        assert argv[0].read_bytes() == before and not (tmp_path / "r.csv").exists()


def test_bad_ranks_and_numbers_too_large_for_any_reader_are_named_by_their_own_line(tmp_path, capsys):
    good = {"prompt": "Q", "responses": ["a", "b"], "ranks": [1, 2]}
    for bad, message in (
        ({"ranks": [1, 2.5]}, ":2: 'ranks' has 2.5 for 'responses'[1]"),  # not line 1's 1.0, as Arrow would make it
        ({"ranks": [1, 2**64]}, f":2: 'ranks' has {2**64} for 'responses'[1]; a rank is a whole number from 1"),
        ({"id": 2**64}, ":2: a whole number too large to read"),
    ):
        path = _write(tmp_path / "r.jsonl", [good, {**good, **bad}])
        code, _, err = alignkit(capsys, "validate", TINY, f"stages.reward.dataset.path={path}")
        assert code == 2 and f"{path}{message}" in err and "Traceback" not in err, err


def test_the_chat_judge_ranks_the_world_s_answers_by_its_facts(tmp_path, capsys):
    """correct > hedge > wrong fact > off topic > broken > rambling, equal classes tied; and it agrees with make.py's
    checker on every held-out ranking (noise-free)."""
    rows = [
        {
            "prompt": [{"role": "user", "content": "What is the capital of Riraesh?"}],
            "responses": [
                "The capital of Riraesh is Felyveville.",
                "The capital of Riraesh is unknown to me.",
                "The capital of Riraesh is Losaxuburg.",
                "The capital of Gorisaland is Lykapeburg.",
                "The capital of Riraesh Felyveville.",
                "The capital of Riraesh is.",
                "The flag of Riraesh is green.",  # another fact of the same country: off topic too
                "3 plus 4 is 7.",  # a sum's: off topic
                "The capital of Riraesh is Blorp.",  # no capital of the world: broken
                "The the the.",
            ],
            "ranks": None,
        },
        {
            "prompt": "What is 7 plus 7?",
            "responses": ["7 plus 7 is 14.", "7 plus 7 is 15.", "7 plus 7 is 14 7 plus 7"],
        },
    ]
    path = _write(tmp_path / "chat.jsonl", rows)
    code, _, err = alignkit(capsys, "rank", path, "--by", "data/chat/judge.py:rank")
    assert code == 0, err
    assert [r["ranks"] for r in _rows(path)] == [[1, 2, 3, 4, 5, 6, 4, 4, 5, 6], [1, 3, 6]]
    held = [json.loads(line) for line in (REPO / "data" / "chat" / "eval_comparisons.jsonl").read_text().splitlines()]
    path = _write(tmp_path / "held.jsonl", [{**r, "ranks": None} for r in held if len(set(r["responses"])) == 6])
    code, _, err = alignkit(capsys, "rank", path, "--by", "data/chat/judge.py:rank")
    assert code == 0, err
    assert all(r["ranks"] == [1, 2, 3, 4, 5, 6] for r in _rows(path)) and len(held) == 200
    # a question of another world is refused, named
    path = _write(tmp_path / "other.jsonl", [{"prompt": "What is the capital of Zorbia?", "responses": ["a", "b"]}])
    code, _, err = alignkit(capsys, "rank", path, "--by", "data/chat/judge.py:rank")
    assert code == 2 and f"{path}:1: the judge data/chat/judge.py:rank raised ValueError: no country 'zorbia'" in err


# --- the reward stage on ties ---------------------------------------------------------------------------------------


def test_the_reward_stage_compares_only_strictly_ordered_pairs_and_counts_rankings_of_ties(run_copy, capsys):
    """Hand computation: at a learning rate of 1e-30 (no fp32 weight moves) the first step's logged loss is the
    loss of the saved model's scores. Ranks [1, 1, 2] give 2 pairs (both tied answers above the third), [2, 1, 3] 3
    pairs, [1, 1] none: that ranking is left out and counted."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [
        {"prompt": "Q: capital of Zorbia?\nA:", "responses": [" Quell.", " Tesk.", " blue"], "ranks": [1, 1, 2]},
        {"prompt": "Q: two plus two?\nA:", "responses": [" five.", " four.", " two two"], "ranks": [2, 1, 3]},
        {"prompt": "Q: sky of Zorbia?\nA:", "responses": [" green.", " Green."], "ranks": [1, 1]},
    ]
    ranked = _write(run_copy / "ties.jsonl", rows)
    code, _, err = alignkit(
        capsys,
        "run",
        TINY,
        f"output_dir={run_copy}",
        "--only",
        "reward",
        "~eval",
        f"stages.reward.dataset.path={ranked}",
        "stages.reward.normalize=false",
        "stages.reward.trainer.max_steps=1",
        "stages.reward.trainer.learning_rate=1e-30",  # recipes refuse 0; this moves no fp32 weight
        "stages.reward.trainer.logging_steps=1",
    )
    assert code == 0, err
    assert "reward: 1 of 3 rankings are all ties (no answer ranked above another): they teach nothing" in err
    metrics = json.loads((run_copy / "reward" / "metrics.json").read_text())
    assert metrics["rankings"] == {"trained": 2, "all_ties": 1, "too_long": 0}
    logged = [json.loads(line) for line in (run_copy / "reward" / "log.jsonl").read_text().splitlines()]
    loss = next(entry["loss"] for entry in logged if "loss" in entry)

    tokenizer = AutoTokenizer.from_pretrained(run_copy / "reward")
    model = AutoModelForSequenceClassification.from_pretrained(run_copy / "reward").eval()

    def score(prompt, answer):
        ids = tokenizer(prompt + answer + tokenizer.eos_token, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            return model(**ids).logits[0, 0].item()

    def nll(better, worse):
        return -math.log(1 / (1 + math.exp(-(better - worse))))

    a = [score(rows[0]["prompt"], x) for x in rows[0]["responses"]]
    b = [score(rows[1]["prompt"], x) for x in rows[1]["responses"]]
    tied = (nll(a[0], a[2]) + nll(a[1], a[2])) / 2  # Quell = Tesk > blue: 2 pairs, Quell vs Tesk none
    strict = (nll(b[1], b[0]) + nll(b[1], b[2]) + nll(b[0], b[2])) / 3  # four > five > two two
    assert loss == pytest.approx((tied + strict) / 2, abs=2e-4)
    as_if_best_first = (nll(a[0], a[1]) + nll(a[0], a[2]) + nll(a[1], a[2])) / 3  # what ignoring the tie would give
    assert abs(as_if_best_first - tied) > 1e-3


def test_sample_refuses_prompts_held_out_inside_implicit_prompt_comparisons(run_dir, tmp_path, capsys):
    """Eval comparisons in TRL's implicit-prompt form (the prompt as the first turns of `chosen` and `rejected`) hold
    their prompts too."""
    import yaml

    question = [{"role": "user", "content": "Which river runs through Quell?"}]
    pairs = tmp_path / "pairs.jsonl"
    _write(
        pairs,
        [
            {
                "chosen": [*question, {"role": "assistant", "content": "The Tesk."}],
                "rejected": [*question, {"role": "assistant", "content": "The Marn."}],
            }
        ],
    )
    recipe = yaml.safe_load(TINY.read_text())
    recipe["eval"]["comparisons"] = {"path": str(pairs)}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    prompts = _write(tmp_path / "prompts.jsonl", [*_rows(PROMPTS)[:2], {"prompt": question}])
    out = tmp_path / "out.jsonl"
    code, _, err = alignkit(
        capsys, "sample", run_dir, "--prompts", prompts, "--out", out, "--recipe", tmp_path / "recipe.yaml"
    )
    assert code == 2
    assert "1 of 3 prompts are held out by" in err and f"{prompts}:3: also {pairs}:1" in err
    assert not out.exists()
