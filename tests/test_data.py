"""Datasets: TRL's formats pass through, Alpaca / ShareGPT / HH convert, and bad rows are named by file and line."""

import json

import pytest
from conftest import TINY

from alignkit import data
from alignkit.errors import DataError
from alignkit.recipe import Dataset, load_recipe
from alignkit.stages import REGISTRY


def _load(tmp_path, rows, stage, name="d.jsonl", **spec):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif name.endswith(".json"):
        path.write_text(json.dumps(rows, indent=2))
    recipe = load_recipe(TINY, check_trainers=False)
    kind = REGISTRY[stage].data if stage in REGISTRY else stage  # a stage reads its kind; "eval" is one itself
    return data.load(Dataset(path=str(path), **spec), stage, recipe, kind)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_alpaca_becomes_conversational_prompt_completion(tmp_path):
    rows = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ]
    ds = _load(tmp_path, rows, "sft")
    assert ds[0] == {"prompt": [user("Add the numbers.\n\n2 and 3")], "completion": [assistant("5")]}
    assert ds[1] == {"prompt": [user("Say hi.")], "completion": [assistant("Hi!")]}
    assert _load(tmp_path, rows, "ppo")[0] == {"prompt": [user("Add the numbers.\n\n2 and 3")]}


def test_sharegpt_becomes_messages(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello"},
                {"from": "human", "value": "Bye"},
                {"from": "gpt", "value": "Bye!"},
            ]
        }
    ]
    ds = _load(tmp_path, rows, "sft")
    assert ds[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        user("Hi"),
        assistant("Hello"),
        user("Bye"),
        assistant("Bye!"),
    ]
    assert _load(tmp_path, rows, "ppo")[0]["prompt"][-1] == user("Bye")  # the last answer is left to the policy


def test_hh_transcripts_become_prompt_chosen_rejected(tmp_path):
    rows = [
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: 2+2?\n\nAssistant: 4",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: 2+2?\n\nAssistant: 5",
        }
    ]
    ds = _load(tmp_path, rows, "dpo")
    assert ds[0] == {
        "prompt": [user("Hi"), assistant("Hello"), user("2+2?")],
        "chosen": [assistant("4")],
        "rejected": [assistant("5")],
    }
    assert _load(tmp_path, rows, "ppo")[0] == {"prompt": [user("Hi"), assistant("Hello"), user("2+2?")]}
    assert _load(tmp_path, rows, "sft")[0]["completion"] == [assistant("4")]


def test_hh_pairs_must_share_the_dialogue(tmp_path):
    rows = [{"chosen": "\n\nHuman: Hi\n\nAssistant: A", "rejected": "\n\nHuman: Bye\n\nAssistant: B"}]
    with pytest.raises(DataError, match=r"d.jsonl:1: 'chosen' and 'rejected' differ before their last Assistant"):
        _load(tmp_path, rows, "dpo")


def test_trl_formats_pass_through(tmp_path):
    assert _load(tmp_path, [{"text": "Once upon a time.", "id": 3}], "pretrain")[0] == {"text": "Once upon a time."}
    assert _load(tmp_path, [{"prompt": "Q: 1+1?", "completion": " 2"}], "sft")[0] == {
        "prompt": "Q: 1+1?",
        "completion": " 2",
    }
    assert _load(tmp_path, [{"prompt": "Q", "chosen": "good", "rejected": "bad"}], "dpo")[0] == {
        "prompt": "Q",
        "chosen": "good",
        "rejected": "bad",
    }
    implicit = {"chosen": [user("Q"), assistant("good")], "rejected": [user("Q"), assistant("bad")]}
    assert _load(tmp_path, [implicit], "dpo")[0] == implicit
    assert _load(tmp_path, [{"prompt": "Tell me a story."}], "ppo")[0] == {"prompt": "Tell me a story."}


def test_column_mapping_csv_and_json_array(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("question,answer\nWhat is 1+1?,2\nWhat is 2+2?,4\n")
    recipe = load_recipe(TINY, check_trainers=False)
    ds = data.load(
        Dataset(path=str(csv), columns={"prompt": "question", "completion": "answer"}),
        "sft",
        recipe,
        REGISTRY["sft"].data,
    )
    assert ds[1] == {"prompt": "What is 2+2?", "completion": "4"}
    ds = _load(tmp_path, [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}], "ppo", name="d.json", max_rows=2)
    assert ds["prompt"] == ["a", "b"]


def test_bad_rows_are_named_by_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "hi"}]}\n\n{"messages": [{"role": "bot", "content": "x"}]}\n'
    )
    recipe = load_recipe(TINY, check_trainers=False)
    with pytest.raises(DataError, match=r"d.jsonl:3: 'messages'\[0\] must be \{role: system\|user\|assistant"):
        data.load(Dataset(path=str(path)), "sft", recipe, REGISTRY["sft"].data)
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        data.load(Dataset(path=str(path)), "pretrain", recipe, REGISTRY["pretrain"].data)
    path.write_text('{"question": "hi"}\n')
    with pytest.raises(
        DataError,
        match=r"d.jsonl:1: the sft stage needs 'messages', 'prompt' and 'completion'.*"
        r"this row has question.*dataset.columns",
    ):
        data.load(Dataset(path=str(path)), "sft", recipe, REGISTRY["sft"].data)
    with pytest.raises(DataError, match=r"stages.sft.dataset.columns.prompt: no column 'q'"):
        data.load(Dataset(path=str(path), columns={"prompt": "q"}), "sft", recipe, REGISTRY["sft"].data)
    path.write_text(json.dumps([{"text": "a"}, {"text": 1}]))
    (tmp_path / "arr.json").write_text('[\n  {"prompt": "a"},\n  {"prompt": ["x"]}\n]')
    with pytest.raises(
        DataError,
        match=r"arr.json:3: column 'prompt' is a list here but text on line 2",
    ):
        data.load(Dataset(path=str(tmp_path / "arr.json")), "ppo", recipe, REGISTRY["ppo"].data)


def test_data_errors_reach_the_cli_with_every_stage(tmp_path, capsys):
    from conftest import alignkit

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nothing": 1}\n')
    code, out, err = alignkit(
        capsys, "validate", TINY, f"stages.sft.dataset.path={bad}", f"stages.ppo.dataset.path={bad}"
    )
    assert code == 2
    assert "the data has 2 problem(s)" in err and "stages.sft.dataset:" in err and "stages.ppo.dataset:" in err
    assert f"{bad}:1:" in err


def test_overlength_rows_are_counted(tmp_path, capsys):
    from transformers import AutoTokenizer

    from alignkit.models import prepare_tokenizer

    recipe = load_recipe(TINY, check_trainers=False)
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained("data/tiny/tokenizer"), recipe)
    ds = data.load(Dataset(path="data/tiny/sft.jsonl"), "sft", recipe, REGISTRY["sft"].data)
    lengths = [len(tok(data.render(r, tok)).input_ids) for r in ds]
    limit = sorted(lengths)[len(lengths) // 2]
    expected = sum(n > limit for n in lengths)
    assert data.check_lengths(ds, tok, limit, "sft", "truncate") == expected > 0
    assert f"{expected} of {len(ds)} rows are longer than {limit} tokens and are truncated" in capsys.readouterr().err
    with pytest.raises(DataError, match=rf"stages.sft: {expected} of {len(ds)} rows are longer than {limit}"):
        data.check_lengths(ds, tok, limit, "sft", "error")


def test_the_reward_stage_keeps_a_ranking_together_and_takes_a_pair_as_a_ranking_of_two(tmp_path):
    rows = [
        {"prompt": [user("2+2?")], "responses": ["4", "5", "6", "seven"]},
        {"prompt": [user("1+1?")], "chosen": [assistant("2")], "rejected": [assistant("3")]},
    ]
    ds = _load(tmp_path, rows[:1], "reward")
    assert ds[0] == {"prompt": [user("2+2?")], "ranked": [[assistant(a)] for a in ("4", "5", "6", "seven")]}
    pair = _load(tmp_path, rows[1:], "reward")
    assert pair[0] == {"prompt": [user("1+1?")], "ranked": [[assistant("2")], [assistant("3")]]}


def test_rankings_expand_to_every_pair_best_first(tmp_path):
    """For DPO (and the evaluation's comparisons), a ranking gives every pair of its answers."""
    rows = [
        {"prompt": [user("2+2?")], "responses": ["4", "5", "6", "seven"]},
        {"prompt": [user("1+1?")], "responses": ["2", "3"]},
    ]
    ds = _load(tmp_path, rows, "dpo")
    pairs = [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in ds]
    assert pairs == [
        ("2+2?", "4", "5"),
        ("2+2?", "4", "6"),
        ("2+2?", "4", "seven"),
        ("2+2?", "5", "6"),
        ("2+2?", "5", "seven"),
        ("2+2?", "6", "seven"),
        ("1+1?", "2", "3"),
    ]
    assert all(r["chosen"][0]["role"] == "assistant" for r in ds)
    assert _load(tmp_path, rows, "sft")[0] == {"prompt": [user("2+2?")], "completion": [assistant("4")]}
    assert _load(tmp_path, rows, "ppo")[1] == {"prompt": [user("1+1?")]}
    plain = _load(tmp_path, [{"prompt": "Q", "responses": ["a", "b", "c"]}], "dpo")
    assert [(r["chosen"], r["rejected"]) for r in plain] == [("a", "b"), ("a", "c"), ("b", "c")]
    with pytest.raises(DataError, match=r"d.jsonl:1: 'responses' must list at least two answers"):
        _load(tmp_path, [{"prompt": "Q", "responses": ["a"]}], "dpo")
    # 'ranked' is the column alignkit makes: a file's own went unchecked (ranks of another length, a text taken
    # letter by letter as answers)
    for stage in ("reward", "dpo"):
        for bad in ({"prompt": "Q", "ranked": "ab"}, {"prompt": "Q", "ranked": ["a", "b"], "ranks": [1, 1, 1]}):
            with pytest.raises(DataError, match=r"d.jsonl:1: 'ranked' is the column alignkit makes of 'responses'"):
                _load(tmp_path, [bad], stage)
    chat = {"messages": [user("Hi"), assistant("Hello")], "ranked": True}  # other readers never look at it
    assert _load(tmp_path, [chat], "sft")[0] == {"messages": chat["messages"]}
    row = {"prompt": "Q", "ranked": ["a", "b", "c"], "ranks": [2, 1, 2]}  # a file's own column, renamed: checked
    pairs = _load(tmp_path, [row], "dpo", columns={"responses": "ranked"})
    assert [(r["chosen"], r["rejected"]) for r in pairs] == [("b", "a"), ("b", "c")]


def test_eval_rows_carry_their_reference(tmp_path):
    rows = [{"prompt": [user("2+2?")], "reference": "4"}, {"prompt": [user("Hi")], "reference": None}]
    ds = _load(tmp_path, rows, "eval")
    assert ds[0] == {"prompt": [user("2+2?")], "reference": "4"} and ds[1]["reference"] is None
