"""Rounds (recipe `rounds`): round 2 samples from round 1's policy, a judge or people rank the answers, the reward
model retrains on the recipe's comparisons plus the round's rankings, and ppo goes on from round 1's policy with the
sft model as its KL reference. Through the real entry point, on the tiny recipe's finished run."""

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, TINY, alignkit, launched, summary
from safetensors.torch import load_file

from alignkit.hub import model_card

JUDGE = '''
def rank(prompt, answers):
    """Whole sentences about a capital first, then the rest; equal answers of a kind tie."""
    return [1 if a.strip().endswith(".") and "capital" in a else 2 for a in answers]
'''


def rounds(tmp_path: Path, *more: str) -> list[str]:
    judge = tmp_path / "judge.py"
    judge.write_text(JUDGE)
    return [
        "rounds.count=2",
        "rounds.prompts.path=data/tiny/ppo.jsonl",
        f"rounds.rank_by={judge}:rank",
        "rounds.stages.reward.num_train_epochs=2",
        "rounds.stages.ppo.total_episodes=16",
        *more,
    ]


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def distance(a: dict, b: dict) -> float:
    return sum((a[k].float() - b[k].float()).abs().sum().item() for k in a)


def test_a_second_round_samples_ranks_and_goes_on_from_the_first(run_copy, tmp_path, capsys):
    # a learning rate so small that round 2's policy stays where it started: which weights it loaded shows
    settings = rounds(tmp_path, "rounds.stages.ppo.learning_rate=1e-12")
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings)
    assert code == 0, err
    done = summary(out)
    assert done["round-2/reward"] == "trained" and done["round-2/ppo"] == "trained"
    assert all(done[stage] == "reused" for stage in ("pretrain", "sft", "reward", "ppo"))
    here = run_copy / "round-2"

    samples = [json.loads(line) for line in (here / "samples.jsonl").read_text().splitlines()]
    assert 30 <= len(samples) <= 42  # a prompt whose answers cannot differ is left out
    assert all(2 <= len(row["responses"]) <= 4 and row["ranks"] is None for row in samples)  # K's default: 4
    assert sum(len(row["responses"]) == 4 for row in samples) > len(samples) // 2
    provenance = samples[0]["provenance"]
    assert provenance["round"] == 2 and provenance["models"][0]["model"] == str(run_copy / "ppo")
    ranked = [json.loads(line) for line in (here / "rankings.jsonl").read_text().splitlines()]
    assert [r["responses"] for r in ranked] == [r["responses"] for r in samples]
    assert all(set(r["ranks"]) <= {1, 2} for r in ranked)

    # the reward model of round 2: the recipe's 42 comparisons and the round's rankings (all ties teach nothing)
    ties = sum(len(set(r["ranks"])) == 1 for r in ranked)
    metrics = json.loads((here / "reward" / "metrics.json").read_text())
    assert metrics["rankings"]["trained"] + metrics["rankings"]["all_ties"] == 42 + len(ranked)
    assert metrics["rankings"]["all_ties"] == ties
    assert f"+ {len(ranked)} rankings of round 2 ({here / 'rankings.jsonl'})" in err

    # ppo of round 2: policy from round 1's, reference the sft model, this round's reward model
    manifest = json.loads((here / "ppo" / "alignkit_stage.json").read_text())
    assert manifest["inputs"]["model"] == str(run_copy / "ppo")
    assert manifest["inputs"]["reference"] == str(run_copy / "sft")
    assert manifest["inputs"]["reward_model"] == str(here / "reward")
    assert f"policy from {run_copy / 'ppo'}, KL reference {run_copy / 'sft'}" in err
    new, first, sft = weights(here / "ppo"), weights(run_copy / "ppo"), weights(run_copy / "sft")
    assert distance(new, first) < 1e-3 * distance(new, sft)
    mixed = [json.loads(line)["prompt"] for line in (run_copy / "round-prompts.jsonl").read_text().splitlines()]
    assert len(mixed) == 2 * 42  # train_on_prompts (default): the stage's 42 prompts and the rounds' (the same file)

    # the same command again: every round's work is reused
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings)
    assert code == 0, err
    assert set(summary(out).values()) == {"reused"}
    assert "samples up to date" in err and "rankings up to date" in err

    # the run moved elsewhere: still up to date (the rounds' prompts file lies inside the run, named from there)
    moved = tmp_path / "moved"
    run_copy.rename(moved)
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={moved}", *FAST, *settings)
    assert code == 0, err
    assert set(summary(out).values()) == {"reused"}


def test_reward_from_previous_trains_each_round_reward_model_on_from_the_last(run_copy, tmp_path, capsys):
    # rounds.reward_from: previous, with a learning rate so small that which weights each round loaded shows
    settings = rounds(
        tmp_path, "rounds.count=3", "rounds.reward_from=previous", "rounds.stages.reward.learning_rate=1e-12"
    )
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings)
    assert code == 0, err
    assert summary(out)["round-3/reward"] == "trained"
    for n, previous in ((2, run_copy / "reward"), (3, run_copy / "round-2" / "reward")):
        here = run_copy / f"round-{n}" / "reward"
        manifest = json.loads((here / "alignkit_stage.json").read_text())
        assert manifest["inputs"]["model"] == str(previous)
        assert len(manifest["parts"]["rankings"]) == n - 1  # every round's rankings so far
        new, last, sft = weights(here), weights(previous), weights(run_copy / "sft")
        shared = [k for k in new if k in sft and not k.endswith("ln_f.bias")]  # ln_f.bias: normalisation's shift
        moved = sum((new[k].float() - last[k].float()).abs().sum().item() for k in shared)
        assert moved < 1e-3 * sum((new[k].float() - sft[k].float()).abs().sum().item() for k in shared)
        # the score head carried over, not started afresh
        assert torch.allclose(new["score.weight"], last["score.weight"], atol=1e-9)

    # the default (start) trains round 2's from the sft model again: a changed input, so it retrains
    settings = [item for item in settings if not item.startswith("rounds.reward_from")]
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings)
    assert code == 0, err
    assert summary(out)["round-2/reward"] == "trained"
    manifest = json.loads((run_copy / "round-2" / "reward" / "alignkit_stage.json").read_text())
    assert manifest["inputs"]["model"] == str(run_copy / "sft")


def test_compare_previous_samples_the_newest_policy_and_the_one_before_it_blind(run_copy, tmp_path, capsys):
    # rounds.compare_previous: half of each prompt's answers from the policy before the newest (round 2: sft)
    settings = rounds(tmp_path, "rounds.count=3", "rounds.compare_previous=true")
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings)
    assert code == 0, err
    assert summary(out)["round-3/ppo"] == "trained"
    for n, newest, before in ((2, "ppo", "sft"), (3, "round-2/ppo", "ppo")):
        rows = [json.loads(line) for line in (run_copy / f"round-{n}" / "samples.jsonl").read_text().splitlines()]
        models = rows[0]["provenance"]["models"]
        assert [m["model"] for m in models] == [str(run_copy / newest), str(run_copy / before)]
        built = [
            json.loads((run_copy / m / "alignkit_stage.json").read_text())["fingerprint"] for m in (newest, before)
        ]
        assert [m["fingerprint"] for m in models] == built
        sources = [row["provenance"]["sources"] for row in rows]
        assert all(s.count(0) <= 2 and s.count(1) <= 2 for s in sources)  # K 4: two answers from each
        assert sum(s.count(1) for s in sources) > len(rows)  # the one before answers too, not only the newest
        assert any(s not in ([0, 0, 1, 1], [0, 0, 1], [0, 1, 1], [0, 1]) for s in sources)  # shuffled in, blind
        assert f"sampling from {run_copy / newest} and, blind beside it, {run_copy / before}" in err

    # the same command again reuses every round; without compare_previous the samples are drawn again
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings)
    assert code == 0, err
    assert set(summary(out).values()) == {"reused"}
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings[:-1])
    assert code == 0, err
    rows = [json.loads(line) for line in (run_copy / "round-2" / "samples.jsonl").read_text().splitlines()]
    assert len(rows[0]["provenance"]["models"]) == 1 and summary(out)["round-2/reward"] == "trained"


def test_rejection_sampling_fine_tunes_the_last_policy_on_its_best_answers_before_ppo(run_copy, tmp_path, capsys):
    # rounds.rejection_sampling: round 1's policy is fine-tuned as sft trains on each ranking's best answer, then ppo
    # goes on from that (a learning rate so small that which weights ppo loaded shows)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    settings = rounds(
        tmp_path,
        "rounds.rejection_sampling=true",
        "rounds.stages.sft.num_train_epochs=1",
        "rounds.stages.ppo.learning_rate=1e-12",
    )
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings)
    assert code == 0, err
    done = summary(out)
    assert done["round-2/best-of-k"] == "trained" and done["round-2/ppo"] == "trained"
    here = run_copy / "round-2"
    ranked = [json.loads(line) for line in (here / "rankings.jsonl").read_text().splitlines()]
    best = [json.loads(line) for line in (here / "best-of-k.jsonl").read_text().splitlines()]
    with_a_first = [row for row in ranked if 1 in row["ranks"]]  # the judge's 2s only: none ranked 1, none taken
    assert 0 < len(best) == len(with_a_first) < len(ranked)
    assert f"rejection sampling: {len(best)} of {len(ranked)} prompts have an answer ranked 1 -> " in err

    # each is an answer ranked first, as sft's rows are (the prompt's messages and the answer); among tied firsts the
    # one the round's reward model scores highest, scored here again by transformers itself
    tokenizer = AutoTokenizer.from_pretrained(here / "reward")
    scorer = AutoModelForSequenceClassification.from_pretrained(here / "reward").eval()

    def score(messages) -> float:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        text = text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            return scorer(input_ids=ids).logits[0, 0].item()

    tied = 0
    for row, pick in zip(with_a_first, best):
        assert pick["messages"][:-1] == row["prompt"] and pick["messages"][-1]["role"] == "assistant"
        firsts = [a for a, r in zip(row["responses"], row["ranks"]) if r == 1]
        assert pick["messages"][-1]["content"] in firsts
        if len(firsts) > 1 and tied < 3:
            tied += 1
            scores = [score([*row["prompt"], {"role": "assistant", "content": a}]) for a in firsts]
            assert firsts[scores.index(max(scores))] == pick["messages"][-1]["content"]
            assert pick["score"] == pytest.approx(max(scores), abs=1e-3)
    assert tied  # the judge ties every capital sentence: ties were broken by the reward model

    # the fine-tune starts from round 1's policy and moves it; ppo starts from the fine-tune, its reference still sft
    tuned = json.loads((here / "best-of-k" / "alignkit_stage.json").read_text())
    assert tuned["stage"] == "sft" and tuned["inputs"]["model"] == str(run_copy / "ppo")
    assert distance(weights(here / "best-of-k"), weights(run_copy / "ppo")) > 0
    manifest = json.loads((here / "ppo" / "alignkit_stage.json").read_text())
    assert manifest["inputs"]["model"] == str(here / "best-of-k")
    assert manifest["inputs"]["reference"] == str(run_copy / "sft")
    new, start = weights(here / "ppo"), weights(here / "best-of-k")
    assert distance(new, start) < 1e-3 * distance(start, weights(run_copy / "ppo"))
    # and its Hub card says so, with the fine-tune's data and settings
    card = str(model_card(run_copy, "ppo", "me/tiny", None, False, None, 2))
    assert (
        f"| sft (round-2: each prompt's best answer, rejection sampling) | "
        f"`{run_copy.name}/round-2/best-of-k.jsonl` | " in card
    )
    assert "num_train_epochs: 1" in card.split("rejection sampling) |")[1].splitlines()[0]

    # again: reused; a floor (best_min_reward) above every score keeps none, and ppo starts from round 1's policy
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings)
    assert code == 0, err
    assert set(summary(out).values()) == {"reused"} and "best answers up to date" in err
    code, out, err = alignkit(
        capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings, "rounds.best_min_reward=1000"
    )
    assert code == 0, err
    assert f"0 of {len(ranked)} prompts have an answer ranked 1 that {here / 'reward'} scores at least 1000" in err
    assert "round-2/best-of-k" not in summary(out)
    assert not (here / "best-of-k.jsonl").exists()
    manifest = json.loads((here / "ppo" / "alignkit_stage.json").read_text())
    assert summary(out)["round-2/ppo"] == "trained" and manifest["inputs"]["model"] == str(run_copy / "ppo")


def test_rejection_sampling_takes_one_answer_a_prompt_from_every_labellers_firsts(run_dir):
    # people: a row per labeller. Their answers ranked 1 are pooled by prompt and the reward model picks one; a
    # labeller who found none acceptable and wrote nothing gives none; a prompt nobody ranked 1 gives none
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.recipe import load_recipe
    from alignkit.rounds import _pick_best

    recipe = load_recipe(TINY, [f"output_dir={run_dir}"])
    ask = [[{"role": "user", "content": f"What is the capital of {c}?"}] for c in ("Zorbia", "Marnia", "Quillia")]
    answers = ["The capital of Zorbia is Quell.", "The capital of Zorbia is Marn.", "Zorbia is a country."]
    rows = [
        {"prompt": ask[0], "responses": answers, "ranks": [1, 2, 3], "provenance": {"labeller": "ann"}},
        {"prompt": ask[0], "responses": answers, "ranks": [2, 1, 3], "provenance": {"labeller": "bob"}},
        {"prompt": ask[1], "responses": answers[:2], "ranks": [1, 2], "provenance": {"none_acceptable": True}},
        {"prompt": ask[2], "responses": answers[:2], "ranks": [2, 2]},
    ]
    picked = _pick_best(recipe, rows, run_dir / "reward", None, 2)
    assert [row["messages"][:-1] for row in picked] == [ask[0]]
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "reward")
    scorer = AutoModelForSequenceClassification.from_pretrained(run_dir / "reward").eval()
    scores = []
    for answer in answers[:2]:
        text = tokenizer.apply_chat_template([*ask[0], {"role": "assistant", "content": answer}], tokenize=False)
        ids = tokenizer(text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token).input_ids
        with torch.no_grad():
            scores.append(scorer(input_ids=torch.tensor([ids])).logits[0, 0].item())
    assert picked[0]["messages"][-1]["content"] == answers[scores.index(max(scores))]
    assert picked[0]["score"] == pytest.approx(max(scores), abs=1e-3)
    assert _pick_best(recipe, rows, run_dir / "reward", max(scores) + 1, 2) == []  # a floor above it: none


def test_best_answers_are_picked_again_when_a_labeller_finds_none_acceptable_without_reranking(run_dir, tmp_path):
    # the rankings' fingerprint is their answers and ranks; "none acceptable" changes neither, only the best answers
    from alignkit.recipe import load_recipe
    from alignkit.rounds import _best_answers, _ranked_fp

    recipe = load_recipe(TINY, [f"output_dir={run_dir}", *rounds(tmp_path, "rounds.rejection_sampling=true")])
    ask = [[{"role": "user", "content": f"What is the capital of {c}?"}] for c in ("Zorbia", "Marnia")]
    rows = [
        {"prompt": ask[0], "responses": ["The capital of Zorbia is Quell.", "Zorbia."], "ranks": [1, 2]},
        {"prompt": ask[1], "responses": ["The capital of Marnia is Marn.", "Marnia."], "ranks": [1, 2]},
    ]
    here, ranked = tmp_path / "round-2", tmp_path / "round-2" / "ranked.jsonl"
    here.mkdir()

    def best(rows):
        ranked.write_text("".join(json.dumps(r) + "\n" for r in rows))
        path, _ = _best_answers(recipe, here, 2, ranked, _ranked_fp(rows), run_dir / "reward", "rm", False)
        return [json.loads(line)["messages"][0] for line in path.read_text().splitlines()] if path else []

    assert best(rows) == [ask[0][0], ask[1][0]]
    rows[1]["provenance"] = {"none_acceptable": True, "written": False}
    assert best(rows) == [ask[0][0]]  # picked again: the same ranks no longer give Marnia a best answer
    rows[0]["provenance"] = {"none_acceptable": True, "written": False}
    assert best(rows) == [] and not (here / "best-of-k.jsonl").exists()
    assert json.loads((here / "round.json").read_text())["best-of-k"]["kept"] == 0


def test_train_on_prompts_false_keeps_the_policy_on_its_stage_prompts(run_copy, tmp_path, capsys):
    # the default mixes the stage's prompts and the rounds' own (round-prompts.jsonl); false keeps the stage's alone
    code, out, err = alignkit(
        capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *rounds(tmp_path, "rounds.train_on_prompts=false")
    )
    assert code == 0, err
    assert summary(out)["round-2/ppo"] == "trained"
    first = json.loads((run_copy / "ppo" / "alignkit_stage.json").read_text())["parts"]["data"]
    later = json.loads((run_copy / "round-2" / "ppo" / "alignkit_stage.json").read_text())["parts"]["data"]
    assert later == first and not (run_copy / "round-prompts.jsonl").exists()
    text = (run_copy / "round-2" / "ppo" / "recipe.yaml").read_text()
    assert "data/tiny/ppo.jsonl" in text and "round-prompts" not in text


def test_a_round_under_two_processes_samples_and_ranks_once_and_trains_on_both(run_copy, tmp_path):
    """Two CPU processes over gloo: the main one samples and ranks, both train the round's stages."""
    done = launched("run", TINY, f"output_dir={run_copy}", *FAST, *rounds(tmp_path), "--num-processes", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary(done.stdout)["round-2/ppo"] == "trained"
    assert done.stderr.count("round 2: sampled ") == 1 and done.stderr.count("ordered pairs ->") == 1
    here = run_copy / "round-2"
    samples = (here / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["responses"] for line in (here / "rankings.jsonl").read_text().splitlines()] == [
        json.loads(line)["responses"] for line in samples
    ]
    for stage in ("reward", "ppo"):
        manifest = json.loads((here / stage / "alignkit_stage.json").read_text())
        assert manifest["status"] == "complete" and manifest["processes"] == 2
    metrics = json.loads((here / "reward" / "metrics.json").read_text())
    assert metrics["rankings"]["trained"] + metrics["rankings"]["all_ties"] == 42 + len(samples)
    assert sorted(p.name for p in here.iterdir()) == ["ppo", "rankings.jsonl", "reward", "round.json", "samples.jsonl"]


def test_rounds_with_qlora_continue_the_merged_policy_against_a_separate_sft_reference(
    run_copy, tmp_path, capsys, monkeypatch
):
    """QLoRA in reward and ppo (sft in full): round 2's policy is round 1's merged one with a new
    adapter, and its KL reference the sft model loaded as a second frozen copy (disabling the adapter would give
    round 1's policy)."""
    settings = ["lora.r=4", "lora.lora_alpha=8", "stages.sft.lora=false", "quantization.load_in_4bit=true"]
    settings += ["stages.sft.quantization=false", "stages.reward.trainer.bf16=true", "stages.ppo.trainer.bf16=true"]
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings, *rounds(tmp_path))
    assert code == 0, err
    done = summary(out)
    assert done["round-2/reward"] == done["round-2/ppo"] == "trained"
    here = run_copy / "round-2"
    assert "ppo has LoRA: later rounds load its KL reference" in err
    assert f"policy from {run_copy / 'ppo'}, KL reference {run_copy / 'sft'}" in err
    assert "reference: a second frozen copy" in err
    params = json.loads((here / "ppo" / "metrics.json").read_text())["parameters"]
    assert params["policy"]["trainable"] < 0.1 * params["policy"]["total"]  # an adapter, not the whole model
    # the merged round-2 policy: round 1's merged weights plus the new adapter, which touches c_attn only
    first, new = weights(run_copy / "ppo"), weights(here / "ppo")
    frozen = [k for k in first if "c_attn" not in k and k in new]
    assert frozen and all(torch.equal(first[k], new[k]) for k in frozen)
    assert any(not torch.equal(first[k], new[k]) for k in first if k.endswith("c_attn.weight"))
    assert (here / "ppo" / "adapter" / "adapter_model.safetensors").is_file()

    # its adapter sits on round 1's merged policy, which no Hub repo holds: only merged weights can be pushed (refused
    # before a token is asked for, so before any request)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    code, out, err = alignkit(capsys, "push", run_copy, "--repo-id", "bob/chat", "--round", "2", "--adapter")
    assert code == 2 and f"ppo of round 2 trained its adapter on {run_copy / 'ppo'}" in err, err
    assert "push merged weights" in err


def test_a_round_ranked_by_people_waits_for_them_and_goes_on(run_copy, tmp_path, capsys):
    settings = [*rounds(tmp_path)[:2], "rounds.rank_by=people", "rounds.min_ranked=4", *rounds(tmp_path)[3:]]
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings)
    assert code == 3, err  # waiting: neither success nor an error
    here = run_copy / "round-2"
    assert "round 2 waits for people to rank its answers: 0 of" in err
    assert "it needs 4 (rounds.min_ranked)" in err and "Traceback" not in err
    assert not (here / "reward").exists()

    # people rank four prompts (one of them all ties), and the same command goes on
    path = here / "rankings.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row, kind in zip(rows, ("ordered", "reversed", "one tie", "all ties")):
        n = len(row["responses"])
        row["ranks"] = {
            "ordered": list(range(1, n + 1)),
            "reversed": list(range(n, 0, -1)),
            "one tie": [1] + [2] * (n - 1),
            "all ties": [2] * n,
        }[kind]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings)
    assert code == 0, err
    assert f"4 of {len(rows)} prompts ranked by people" in err
    assert "waiting" not in json.loads((here / "round.json").read_text())  # `alignkit label RUN_DIR`: none waits
    metrics = json.loads((here / "reward" / "metrics.json").read_text())
    assert metrics["rankings"] == {"trained": 42 + 3, "all_ties": 1, "too_long": 0}
    assert summary(out)["round-2/ppo"] == "trained"

    # a wrong ranking is named by file and line, and nothing more trains
    rows[5]["ranks"] = [1, 2]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings)
    assert code == 2
    assert f"{path}:6: 'ranks' gives 2 ranks for {len(rows[5]['responses'])} answers" in err
    rows[5]["ranks"], rows[7]["responses"][0] = None, "an answer nobody sampled"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings)
    assert code == 2
    assert f"{path}:8: the answers are not the ones sampled for this prompt" in err


def test_rounds_are_checked_before_anything_trains(tmp_path, capsys):
    out = tmp_path / "run"
    bad = [
        "rounds.count=1",
        "rounds.prompts.path=data/tiny/ppo.jsonl",
        "rounds.rank_by=judge",
        "rounds.k=1",
        "rounds.stages.dpo.beta=0.1",
        "rounds.stages.ppo.learing_rate=1e-5",
    ]
    code, _, err = alignkit(capsys, "validate", TINY, f"output_dir={out}", *bad)
    assert code == 2
    for expected in (
        "rounds.count: must be >= 2 (round 1 is the stages), got 1",
        "rounds.k: must be >= 2 (a ranking needs two answers), got 1",
        "rounds.rank_by: 'judge': give 'people', or a judge as MODULE:FUNCTION",
        "rounds.stages.dpo: later rounds retrain reward and ppo only",
    ):
        assert expected in err, err
    # a later round's trainer block is checked as the stage's own, named by its rounds key
    code, _, err = alignkit(
        capsys, "validate", TINY, f"output_dir={out}", *rounds(tmp_path, "rounds.stages.ppo.learing_rate=1e-5")
    )
    assert code == 2 and "rounds.stages.ppo.learing_rate" in err and "learning_rate" in err

    # rejection sampling's keys: its floor only with it, sft's trainer settings only with it, and a stage to train as
    code, _, err = alignkit(
        capsys,
        "validate",
        TINY,
        f"output_dir={out}",
        *rounds(tmp_path, "rounds.best_min_reward=0.5", "rounds.stages.sft.num_train_epochs=1"),
    )
    assert code == 2
    assert "rounds.best_min_reward: only with rejection_sampling: true" in err
    assert (
        "rounds.stages.sft: later rounds retrain reward and ppo only; give trainer settings of those (sft too with"
        in err
    )
    code, _, err = alignkit(
        capsys,
        "validate",
        TINY,
        f"output_dir={out}",
        *rounds(tmp_path, "rounds.rejection_sampling=true", "~stages.sft"),
    )
    assert code == 2 and "rounds.rejection_sampling: fine-tunes each later round's policy" in err
    assert "ppo starts from no such stage here: add sft" in err
    code, _, err = alignkit(
        capsys,
        "validate",
        TINY,
        f"output_dir={out}",
        *rounds(tmp_path, "rounds.rejection_sampling=true", "rounds.stages.sft.num_train_epochs=1"),
    )
    assert code == 0, err

    # held-out prompts never enter a round: refused before any stage trains
    code, _, err = alignkit(
        capsys, "run", TINY, f"output_dir={out}", *rounds(tmp_path), "rounds.prompts.path=data/tiny/eval.jsonl"
    )
    assert code == 2
    assert "18 of 18 prompts are held out" in err and "data/tiny/eval.jsonl:1: also" in err
    assert not out.exists()


class Killed(BaseException):
    """Stands for SIGKILL (tests/test_guarantees.py simulates kills the same way)."""


def test_a_round_killed_during_its_ppo_resumes_from_its_checkpoint(run_copy, tmp_path, capsys, monkeypatch):
    from alignkit.stages.ppo_trainer import PPOTrainer

    settings = rounds(tmp_path, "rounds.stages.ppo.save_steps=1")
    original = PPOTrainer._save_checkpoint

    def save_then_die(self, *args, **kwargs):  # round 1's ppo is reused: only round 2's saves
        original(self, *args, **kwargs)
        raise Killed

    monkeypatch.setattr(PPOTrainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings)
    monkeypatch.undo()
    here = run_copy / "round-2"
    checkpoint = here / "ppo.partial" / "checkpoints" / "checkpoint-1"
    assert (checkpoint / "model.safetensors").is_file() and not (here / "ppo").exists()
    assert (here / "reward" / "alignkit_stage.json").is_file()

    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings)
    assert code == 0, err
    assert summary(out)["round-2/reward"] == "reused"
    assert f"ppo: resuming from {checkpoint} (an interrupted rerun)" in err
    assert "samples up to date" in err and "rankings up to date" in err
    history = json.loads((here / "ppo" / "metrics.json").read_text())["log_history"]
    assert history[-1]["step"] == 2  # 16 episodes in rollouts of 8
    assert not (here / "ppo.partial").exists()


JUDGE_BESIDE = '''
import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("judge_order", Path(__file__).with_name("judge_order.py"))
order = importlib.util.module_from_spec(spec)
spec.loader.exec_module(order)


def rank(prompt, answers):
    """Whole sentences first (or last: judge_order.py says), the rest tie."""
    return [order.WHOLE if a.strip().endswith(".") else order.REST for a in answers]
'''


def test_a_judge_ranks_again_when_it_or_a_module_beside_it_changes_and_only_new_ranks_retrain(
    run_copy, tmp_path, capsys
):
    from alignkit.recipe import load_recipe
    from alignkit.rounds import _rankings, _stamp

    (tmp_path / "judge_order.py").write_text("WHOLE, REST = 1, 2\n")
    judge = tmp_path / "ranker.py"  # (rounds() writes judge.py)
    judge.write_text(JUDGE_BESIDE)
    settings = [*rounds(tmp_path)[:2], f"rounds.rank_by={judge}:rank", *rounds(tmp_path)[3:]]
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings)
    assert code == 0, err
    here = run_copy / "round-2"
    before = [json.loads(line)["ranks"] for line in (here / "rankings.jsonl").read_text().splitlines()]
    assert {1, 2} <= {rank for ranks in before for rank in ranks}

    # the judge's file edited, its ranks the same: ranked again, and nothing retrains on the same rankings
    judge.write_text(JUDGE_BESIDE + "\n# a comment\n")
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings)
    assert code == 0, err
    assert "rankings up to date" not in err and f"{judge}:rank ranked {len(before)} prompts" in err
    assert set(summary(out).values()) == {"reused"}

    # the module beside it changed (the judge's own file did not): ranked again, and the new ranks retrain round 2
    (tmp_path / "judge_order.py").write_text("WHOLE, REST = 2, 1\n")
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings)
    assert code == 0, err
    after = [json.loads(line)["ranks"] for line in (here / "rankings.jsonl").read_text().splitlines()]
    assert after == [[3 - rank for rank in ranks] for ranks in before]
    assert summary(out)["round-2/reward"] == "trained" and summary(out)["round-2/ppo"] == "trained"

    # --force ranks again even when nothing changed
    recipe = load_recipe(TINY, [f"output_dir={run_copy}", *FAST, *settings])
    drawn = _stamp(here)["samples"]
    capsys.readouterr()
    _, kept = _rankings(recipe, here, 2, drawn)
    assert "rankings up to date" in capsys.readouterr().err
    _, again = _rankings(recipe, here, 2, drawn, force=True)
    assert "ranked" in capsys.readouterr().err and again == kept  # the same ranks: the same fingerprint

    # rows of the prompts file chosen by max_rows: drawn again from those rows only
    code, out, err = alignkit(
        capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings, "rounds.prompts.max_rows=6"
    )
    assert code == 0, err
    assert "samples up to date" not in err
    assert len((here / "samples.jsonl").read_text().splitlines()) <= 6

    # answers too long for the model's context: the error names the recipe's key, not alignkit sample's option
    code, out, err = alignkit(
        capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings, "rounds.max_new_tokens=5000"
    )
    assert code == 2 and "Traceback" not in err
    assert "rounds.max_new_tokens 5000 leaves no room for a prompt in the context of ppo" in err

    # a policy that cannot vary its answers (near-greedy, one token): no ranking to make, said so, nothing written
    (here / "samples.jsonl").unlink()
    code, out, err = alignkit(
        capsys,
        "run",
        TINY,
        f"output_dir={run_copy}",
        *FAST,
        *settings,
        "rounds.temperature=1e-6",
        "rounds.max_new_tokens=1",
    )
    assert code == 2 and "Traceback" not in err
    assert "round 2: no prompt of data/tiny/ppo.jsonl got two different answers" in err
    assert "raise rounds.temperature" in err and not (here / "samples.jsonl").exists()


def test_rankings_set_aside_when_the_samples_change_never_replace_earlier_ones(run_copy, tmp_path, capsys):
    people = [*rounds(tmp_path)[:2], "rounds.rank_by=people", "rounds.min_ranked=4", *rounds(tmp_path)[3:]]
    here = run_copy / "round-2"

    def run(*more) -> str:
        code, _, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *people, *more)
        assert code == 3, err  # waiting for people each time
        return err

    run()
    stamp = json.loads((here / "round.json").read_text())
    assert stamp["waiting"] == stamp["samples"] == stamp["offered"]  # what `alignkit label RUN_DIR` opens
    first = stamp["offered"][:8]
    path = here / "rankings.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["ranks"] = list(range(1, len(rows[0]["responses"]) + 1))  # someone's work
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (here / "samples.labels.db").write_bytes(b"labels")  # a labels database whose server was killed: its log beside it
    (here / "samples.labels.db-wal").write_bytes(b"log")

    err = run("rounds.temperature=0.5")  # other samples: the first rankings set aside, with the database and its log
    assert f"kept aside as rankings-{first}.*" in err
    assert json.loads((here / f"rankings-{first}.jsonl").read_text().splitlines()[0])["ranks"] == rows[0]["ranks"]
    assert (here / f"samples-{first}.labels.db").read_bytes() == b"labels"
    assert (here / f"samples-{first}.labels.db-wal").read_bytes() == b"log"
    assert not (here / "samples.labels.db").exists() and not (here / "samples.labels.db-wal").exists()

    run()  # back to the first samples: the second set aside in turn
    err = run("rounds.temperature=0.5")  # and again: the first samples' fresh copy cannot take the first one's name
    assert f"kept aside as rankings-{first}-2.*" in err
    assert json.loads((here / f"rankings-{first}.jsonl").read_text().splitlines()[0])["ranks"] == rows[0]["ranks"]
    assert all(
        json.loads(line)["ranks"] is None for line in (here / f"rankings-{first}-2.jsonl").read_text().splitlines()
    )


def test_switching_between_people_and_a_judge_never_loses_or_mixes_their_rankings(run_copy, tmp_path, capsys):
    judge = rounds(tmp_path)
    people = [*judge[:2], "rounds.rank_by=people", "rounds.min_ranked=4", *judge[3:]]
    here, path = run_copy / "round-2", run_copy / "round-2" / "rankings.jsonl"

    def run(settings, status):
        code, _, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, *settings)
        assert code == status, err
        return err

    run(people, 3)
    first = json.loads((here / "round.json").read_text())["offered"][:8]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0]["ranks"] = list(range(len(rows[0]["responses"]), 0, -1))  # someone's work, by hand
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # a judge now ranks the round: the hand rankings are kept aside, not overwritten, and nothing waits any more
    err = run(judge, 0)
    assert f"kept aside as rankings-{first}.*" in err
    assert json.loads((here / f"rankings-{first}.jsonl").read_text().splitlines()[0])["ranks"] == rows[0]["ranks"]
    assert all(json.loads(line)["ranked_by"] == judge[2].split("=", 1)[1] for line in path.read_text().splitlines())
    stamp = json.loads((here / "round.json").read_text())
    assert "offered" not in stamp and "waiting" not in stamp

    # back to people: they are given the samples afresh (the judge's ranks are not taken for theirs)
    err = run(people, 3)
    assert "kept aside as rankings-older.*" in err and "0 of" in err
    assert all(json.loads(line)["ranks"] is None for line in path.read_text().splitlines())
    assert json.loads((here / f"rankings-{first}.jsonl").read_text().splitlines()[0])["ranks"] == rows[0]["ranks"]
    # and the judge, set again, ranks again rather than taking people's file for its own
    run(judge, 0)
    assert all(json.loads(line)["ranks"] is not None for line in path.read_text().splitlines())

    # rows edited where they should only be ranked are named by line
    run(people, 3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["prompt"] = [{"role": "user", "content": "Another question?"}]
    rows[2]["responses"] = 5
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    err = run(people, 2)
    assert f"{path}:2: the prompt is not the one sampled on this line; rank, do not edit" in err
    assert f"{path}:3: the answers are not the ones sampled for this prompt" in err and "Traceback" not in err


def test_guidelines_that_cannot_be_read_are_refused_before_anything_trains(tmp_path, capsys):
    guide = tmp_path / "guide.md"
    guide.write_bytes("Rank the answers: caf\xe9 first.".encode("latin-1"))
    people = [*rounds(tmp_path)[:2], "rounds.rank_by=people", f"rounds.guidelines={guide}", *rounds(tmp_path)[3:]]
    code, _, err = alignkit(capsys, "validate", TINY, f"output_dir={tmp_path / 'run'}", *people)
    assert code == 2 and "Traceback" not in err
    assert f"rounds.guidelines: cannot read {guide}" in err and "give a UTF-8 markdown file" in err


def test_label_given_a_run_opens_the_round_that_waits_for_people(tmp_path):
    """After a change of settings an earlier round can wait again while a later one has samples from before: the
    run's folder opens the waiting round (round.json says which), else the last one with samples."""
    from alignkit.label.batch import locate

    run = tmp_path / "run"
    for n, stamp in ((2, {"samples": "A", "offered": "A", "waiting": "A"}), (3, {"samples": "B", "offered": "B"})):
        (run / f"round-{n}").mkdir(parents=True)
        (run / f"round-{n}" / "samples.jsonl").write_text("{}\n")
        (run / f"round-{n}" / "round.json").write_text(json.dumps(stamp))
    assert locate(run) == run / "round-2" / "samples.jsonl"
    (run / "round-2" / "round.json").write_text(json.dumps({"samples": "C", "waiting": "A"}))  # waited on older ones
    assert locate(run) == run / "round-3" / "samples.jsonl"
    assert locate(run / "round-2") == run / "round-2" / "samples.jsonl"  # a round's folder: that round
