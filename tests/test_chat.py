"""The offline chat recipe, shrunk to a few steps: its data, the evaluation and the report; and the tiny recipe's
report, which every test session's run writes."""

import json
import math
import re
import subprocess
import sys

import pytest
from conftest import REPO, alignkit, run_recipe

CHAT = REPO / "recipes" / "chat.yaml"
DATA = REPO / "data" / "chat"
TRAINING = ["pretrain.jsonl", "sft.jsonl", "comparisons.jsonl", "ppo.jsonl"]
SHRINK = [
    "model.config.n_layer=1",
    "stages.pretrain.trainer.max_steps=8",
    "stages.sft.trainer.max_steps=8",
    "stages.reward.trainer.max_steps=8",
    "stages.ppo.trainer.total_episodes=64",
    *(f"stages.{s}.trainer.logging_steps=2" for s in ("pretrain", "sft", "reward")),
    "eval.dataset.max_rows=24",
    "eval.comparisons.max_rows=12",
]


def _rows(name):
    with open(DATA / name) as f:
        return [json.loads(line) for line in f]


def test_held_out_prompts_never_occur_in_training_data():
    questions = [m["content"] for row in _rows("eval.jsonl") for m in row["prompt"] if m["role"] == "user"]
    assert len(questions) >= 200 and len(set(questions)) == len(questions)
    assert all(row["reference"] for row in _rows("eval.jsonl"))
    for name in TRAINING:
        text = (DATA / name).read_text()
        leaked = [q for q in questions if json.dumps(q)[1:-1] in text or q in text]
        assert not leaked, f"{name} holds held-out prompts: {leaked[:3]}"
    # and the held-out comparisons ask only held-out questions
    assert {r["prompt"][0]["content"] for r in _rows("eval_comparisons.jsonl")} <= set(questions)


def test_held_out_facts_appear_only_in_the_pretraining_text():
    # not even as a wrong or off-topic answer: the reward model would learn that held-out names mean a bad answer
    held = set()
    for row in _rows("eval.jsonl"):
        reference = row["reference"][:-1]
        if reference.startswith("The capital of "):
            held |= set(reference.removeprefix("The capital of ").split(" is "))  # the country and its capital
        elif " plus " in reference:
            held.add(reference.rpartition(" is ")[0] + " is")  # "4 plus 7 is"
    assert len(held) > 150
    for name in ("sft.jsonl", "comparisons.jsonl", "ppo.jsonl"):
        text = (DATA / name).read_text()
        # whole words: the held-out capital "Fely" is part of the training country "Felyia"
        leaked = sorted(h for h in held if re.search(rf"\b{re.escape(h)}\b", text))
        assert not leaked, f"{name} mentions held-out countries, capitals or sums: {leaked[:5]}"
    pretraining = (DATA / "pretrain.jsonl").read_text()
    assert all(h in pretraining for h in held if " plus " not in h)  # where the facts come from


def test_the_rounds_ask_about_countries_known_only_from_their_pretraining_text():
    """chat-rounds.yaml's later rounds ask about 40 countries of their own: in no training or eval file, stated
    (with their capitals and flags) in data/chat/rounds/pretrain.jsonl, which otherwise holds chat.yaml's text."""
    countries = {
        re.search(r"of (\w+)\?", row["prompt"][0]["content"]).group(1) for row in _rows("rounds/prompts.jsonl")
    }
    assert len(countries) == 40 and len(_rows("rounds/prompts.jsonl")) == 80
    for name in [*TRAINING, "eval.jsonl", "eval_comparisons.jsonl"]:
        text = (DATA / name).read_text()
        assert not [c for c in countries if re.search(rf"\b{c}\b", text)], name
    rounds_text = (DATA / "rounds" / "pretrain.jsonl").read_text()
    assert all(f"The capital of {c} is" in rounds_text or f"is the capital of {c}." in rounds_text for c in countries)
    assert {r["text"] for r in _rows("pretrain.jsonl")} <= {r["text"] for r in _rows("rounds/pretrain.jsonl")}


def test_the_judge_ranks_the_held_out_and_the_set_aside_rankings_in_their_order_of_kinds(tmp_path):
    """benchmarks/reward_pairs.py reads a reward model's accuracy by kind of answer from the position of each answer in
    a ranking: the held-out rankings', and with --aside the ones it makes for the round questions a set-aside run never
    sampled. Both must list right, hedge, wrong fact, off topic, broken, rambling in that order, as the judge classes
    them, and --aside must ask about exactly the questions left out."""
    import importlib.util

    judge = importlib.util.module_from_spec(spec := importlib.util.spec_from_file_location("judge", DATA / "judge.py"))
    spec.loader.exec_module(judge)
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import reward_pairs
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    kinds = list(range(1, len(reward_pairs.KINDS) + 1))
    assert all(judge.rank(row["prompt"], row["responses"]) == kinds for row in _rows("eval_comparisons.jsonl"))
    questions = _rows("rounds/prompts.jsonl")
    kept = [row for i, row in enumerate(questions) if (i // 2) % 4 != 3]  # rounds_seeds.py --set-aside 4
    (tmp_path / "kept.jsonl").write_text("".join(json.dumps(row) + "\n" for row in kept))
    made = reward_pairs.aside_rankings(tmp_path / "kept.jsonl", draws=3)
    asked = [row["prompt"] for row in made]
    left_out = [r["prompt"] for r in questions if r not in kept]
    assert len(left_out) == 20 and sorted(asked, key=str) == sorted(left_out * 3, key=str)
    assert all(judge.rank(row["prompt"], row["responses"]) == kinds for row in made)
    assert len({json.dumps(row) for row in made}) > len(made) // 2  # the draws differ (wrong facts, other countries)


def test_comparisons_rank_several_answers():
    rows = _rows("comparisons.jsonl")
    assert all(len(r["responses"]) >= 2 for r in rows) and max(len(r["responses"]) for r in rows) == 6
    # the demonstrator's flaw: hedges on capitals, in the words its answer would start with
    assert any(
        row["messages"][-1]["content"].startswith("The capital of")
        and row["messages"][-1]["content"].endswith(" is unknown to me.")
        for row in _rows("sft.jsonl")
    )
    assert any(len(row["prompt"]) > 1 for row in _rows("ppo.jsonl"))  # some multi-turn
    assert any(len(row["messages"]) > 2 for row in _rows("sft.jsonl"))
    assert sum(f.stat().st_size for f in DATA.rglob("*") if f.is_file()) < 3_000_000


def test_chat_data_regenerates_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(DATA / "make.py"), str(tmp_path)], check=True, timeout=300)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    programs = {"make.py", "judge.py"}  # what makes and what judges the data, and their bytecode
    shipped = [p for p in DATA.rglob("*") if p.is_file() and p.name not in programs and "__pycache__" not in p.parts]
    assert made == sorted(p.relative_to(DATA) for p in shipped)
    for rel in made:
        assert (tmp_path / rel).read_bytes() == (DATA / rel).read_bytes(), rel


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    return run_recipe(CHAT, tmp_path_factory.mktemp("chat") / "run", *SHRINK)


def _unit(x):
    return isinstance(x, float) and 0.0 <= x <= 1.0


def test_report_json_has_every_field_in_range(chat_run):
    report = json.loads((chat_run / "report.json").read_text())
    assert report["wall_seconds"] > 0
    assert set(report["stages"]) == {"pretrain", "sft", "reward", "ppo"}
    assert all(v["status"] == "trained" and v["seconds"] > 0 for v in report["stages"].values())
    assert _unit(report["reward_accuracy"]) and _unit(report["win_rate_vs_sft"])
    assert set(report["eval"]) == {"base", "sft", "ppo"}
    for name, values in report["eval"].items():
        assert _unit(values["gold_accuracy"]) and _unit(values["eos_rate"]), name
        assert isinstance(values["reward_mean"], float) and math.isfinite(values["reward_mean"])
        assert 0 < values["length_mean"] <= 20
        assert _unit(values["repetition"])
    assert report["eval"]["sft"]["kl_to_sft"] == 0.0
    assert math.isfinite(report["eval"]["base"]["kl_to_sft"]) and math.isfinite(report["eval"]["ppo"]["kl_to_sft"])
    assert report["eval_prompts"] == 24


def test_report_plots_are_valid_pngs(chat_run):
    from PIL import Image

    markdown = (chat_run / "report.md").read_text()
    for name in ("loss.png", "ppo.png", "eval.png"):
        assert f"]({name})" in markdown
        with Image.open(chat_run / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100
    assert "| ppo |" in markdown and "Win rate" in markdown


def test_eval_command_rewrites_the_report(chat_run, capsys):
    before = json.loads((chat_run / "report.json").read_text())
    (chat_run / "report.json").unlink()
    code, out, err = alignkit(capsys, "eval", CHAT, f"output_dir={chat_run}", *SHRINK)
    assert code == 0
    report = json.loads((chat_run / "report.json").read_text())
    assert all(v["status"] == "reused" for v in report["stages"].values())
    assert set(report["eval"]) == {"base", "sft", "ppo"}
    assert report["eval"] == before["eval"]  # the same models measure the same, the sampled KL included
    code, out, err = alignkit(capsys, "eval", REPO / "recipes" / "tiny.yaml", f"output_dir={chat_run}", "~eval")
    assert code == 2 and "no eval section" in err


def test_a_run_of_pretraining_alone_skips_the_evaluation(tmp_path, capsys):
    out = tmp_path / "pre"
    code, _, err = alignkit(capsys, "run", CHAT, f"output_dir={out}", *SHRINK, "--only", "pretrain")
    assert code == 0
    assert (out / "pretrain" / "model.safetensors").exists()
    assert f"eval: skipped: no sft or ppo model in {out} yet" in err
    assert not (out / "report.json").exists()


def test_kl_estimate_is_zero_for_the_same_model_and_positive_for_another(run_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.evaluate import _logprobs, generate

    tok = AutoTokenizer.from_pretrained(run_dir / "sft")
    sft = AutoModelForCausalLM.from_pretrained(run_dir / "sft").eval()
    base = AutoModelForCausalLM.from_pretrained(run_dir / "pretrain").eval()
    with open(REPO / "data" / "tiny" / "ppo.jsonl") as f:
        prompts = [
            tok(
                tok.apply_chat_template(json.loads(line)["prompt"], add_generation_prompt=True, tokenize=False),
                add_special_tokens=False,
            ).input_ids
            for line in f
        ]
    samples = generate(base, tok, prompts, 16, 16, sample=True)
    own = _logprobs(base, tok, prompts, samples, 16)
    assert _logprobs(base, tok, prompts, samples, 16) == pytest.approx(own, abs=1e-4)
    kl = sum(a - b for a, b in zip(own, _logprobs(sft, tok, prompts, samples, 16))) / len(prompts)
    assert kl > 1.0  # 20 epochs of SFT moved the model far from its base


# --- the tiny recipe's report (conftest's run_dir) ----------------------------------------------------------------

TINY_DATA = REPO / "data" / "tiny"


def test_tiny_held_out_prompts_never_occur_in_training_data():
    def rows(name):
        with open(TINY_DATA / name) as f:
            return [json.loads(line) for line in f]

    questions = [row["prompt"][-1]["content"] for row in rows("eval.jsonl")]
    assert len(questions) == len(set(questions)) >= 12 and all(row["reference"] for row in rows("eval.jsonl"))
    for name in ("pretrain.jsonl", "sft.jsonl", "reward.jsonl", "ppo.jsonl"):
        text = (TINY_DATA / name).read_text()
        assert not [q for q in questions if q in text], name
    assert {r["prompt"][0]["content"] for r in rows("eval_comparisons.jsonl")} == set(questions)


def test_tiny_run_writes_a_report_with_every_checkpoint(run_dir):
    from alignkit.evaluate import KL_NOTE

    markdown = (run_dir / "report.md").read_text()
    for name in ("base", "sft", "ppo"):
        assert f"| {name} | " in markdown
    report = json.loads((run_dir / "report.json").read_text())
    assert report["eval_prompts"] == 18 and set(report["eval"]) == {"base", "sft", "ppo"}
    assert _unit(report["reward_accuracy"]) and _unit(report["win_rate_vs_sft"])
    # the KL column is a sampled estimate, which can come out below zero (the tiny ppo model's does): said once
    assert isinstance(report["eval"]["ppo"]["kl_to_sft"], float)
    assert markdown.count(KL_NOTE) == 1 and "can come out slightly below zero" in KL_NOTE
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_eval_replaces_report_files_whole(run_copy, capsys):
    """Each report file is written beside its place and renamed over it (a kill mid-write leaves the old one whole,
    not a cut-off one): the old file lives on, unchanged, under a hard link taken before."""
    names = ["report.md", "report.json", "loss.png", "ppo.png", "eval.png"]
    before = {}
    for name in names:
        (run_copy / f"old-{name}").hardlink_to(run_copy / name)
        before[name] = (run_copy / name).read_bytes()
    code, out, err = alignkit(capsys, "eval", REPO / "recipes" / "tiny.yaml", f"output_dir={run_copy}")
    assert code == 0, err
    for name in names:
        old, new = run_copy / f"old-{name}", run_copy / name
        assert old.read_bytes() == before[name] and not old.samefile(new), name  # written in place, it would change
        assert new.stat().st_size > 0
    assert json.loads((run_copy / "report.json").read_text())["stages"]["ppo"]["status"] == "reused"
    assert not [p.name for p in run_copy.iterdir() if p.name.endswith(".tmp")]
