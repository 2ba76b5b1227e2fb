"""The stage registry: what a stage is stands in its own module, and nothing else names one; alignkit's departures from
TRL's defaults stand in one table that docs/defaults.md shows; the DPO stage, added through the registry, trains and
is reported, chatted with and pushed like the others."""

import ast
import json
import re

import pytest
import torch
from conftest import REPO, TINY, alignkit, rerun, summary
from safetensors.torch import load_file

# DPO on the tiny world: the reward stage's comparisons, a few epochs
DPO = [
    "stages.dpo.dataset.path=data/tiny/reward.jsonl",
    "stages.dpo.trainer.num_train_epochs=4",
    "stages.dpo.trainer.learning_rate=1e-4",
    "stages.dpo.trainer.per_device_train_batch_size=8",
    "stages.dpo.trainer.gradient_checkpointing=false",
    "stages.dpo.trainer.bf16=false",
    "stages.dpo.trainer.logging_steps=1",
    "stages.dpo.trainer.save_steps=10",
]


def _strings_outside_docs(tree: ast.AST):
    """Every string constant of a module except docstrings and --help examples (module constants named *_EXAMPLES)."""
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            skip.add(id(body[0].value))
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id.endswith("_EXAMPLES") for t in node.targets
        ):
            skip.update(id(n) for n in ast.walk(node.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node


def test_no_module_outside_the_stages_names_a_stage():
    """A stage's name appears only in alignkit/stages/: as a string of its own ("ppo"), or as a word in a message
    ("run the sft stage"); "reward" counts only alone (it is also a plain word: reward model, reward_mean)."""
    from alignkit.stages import NAMES

    words = re.compile(r"(?<![\w./-])(" + "|".join(n for n in NAMES if n != "reward") + r")(?![\w/-])")
    found = []
    for path in sorted((REPO / "alignkit").glob("*.py")):
        for node in _strings_outside_docs(ast.parse(path.read_text())):
            if node.value in NAMES or words.search(node.value):
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert not found, "\n".join(found)


def test_the_stage_order_is_the_registrys_and_each_declares_itself():
    from alignkit import stages
    from alignkit.recipe import StageSettings

    assert stages.NAMES == ("pretrain", "sft", "reward", "ppo", "dpo")
    for stage in stages.ORDER:
        assert stage.config_class().__name__.endswith("Config")
        assert issubclass(stage.settings, StageSettings)
        assert all(up in stages.NAMES[: stages.NAMES.index(stage.name)] for up in stage.model_from)
        assert stage.data in ("text", "demonstrations", "comparisons", "rankings", "prompts")
    assert [s.name for s in stages.ORDER if s.eval_reference] == ["sft"]
    assert stages.POLICIES == ("pretrain", "sft", "ppo", "dpo")


def _documented_defaults() -> set[tuple[str, str, str, str]]:
    text = (REPO / "docs" / "defaults.md").read_text()
    table = text.split("| stage | setting | alignkit's value | why |")[1].split("\n\n")[0]
    rows = [line.strip("|").split(" | ") for line in table.strip().splitlines()[1:]]
    return {
        (stage.strip(), setting.strip().strip("`"), value.strip(), why.strip()) for stage, setting, value, why in rows
    }


def test_docs_defaults_lists_every_departure_from_trls_defaults_as_the_stages_declare_it():
    from alignkit.stages import all_defaults

    declared = {(stage, setting, value, why) for stage, setting, value, why in all_defaults()}
    assert _documented_defaults() == declared


def test_each_default_is_logged_where_a_stage_starts_with_it(run_copy, capsys):
    code, out, err = rerun(
        capsys,
        run_copy,
        "ppo",
        "stages.ppo.trainer.total_episodes=16",
    )
    assert code == 0, err
    assert "ppo: stop_token=eos (alignkit: TRL's default never stops a response" in err
    # a recipe that sets the key keeps its own value, and nothing is said
    code, out, err = alignkit(
        capsys,
        "run",
        TINY,
        f"output_dir={run_copy}",
        "--only",
        "ppo",
        "stages.ppo.trainer.total_episodes=16",
        "stages.ppo.trainer.stop_token_id=0",
    )
    assert code == 0, err
    assert "stop_token=eos" not in err


def test_validate_builds_the_config_the_stage_runs_with(tmp_path):
    """One config, built when the recipe loads: what validate checks is what the stage gets."""
    from alignkit.recipe import load_recipe

    recipe = load_recipe(TINY, ["stages.sft.trainer.max_length=4096"])
    args = recipe.configs["sft"].args
    assert args.max_length == 128  # capped at model.config's n_positions
    assert args.seed == 42 and args.learning_rate == 1e-3
    assert recipe.configs["ppo"].args.stop_token == "eos"
    assert "max_length=128 (alignkit: " in recipe.configs["sft"].applied[0]
    assert "configs" not in recipe.to_dict()


def test_a_bug_keeps_its_traceback_and_debug_shows_the_one_behind_a_recipe_error(tmp_path):
    """Errors that are the recipe's are messages; ALIGNKIT_DEBUG=1 shows the library's error behind one."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO), "ALIGNKIT_DEBUG": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignkit",
            "validate",
            str(TINY),
            "stages.sft.trainer.eval_strategy=steps",
            "stages.sft.trainer.eval_steps=5",
            "stages.sft.trainer.load_best_model_at_end=true",
            "stages.sft.trainer.save_steps=7",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "SFTConfig rejected these settings" in done.stderr
    assert "Traceback" in done.stderr and "ValueError" in done.stderr  # the config class's own error, with its frames


# --- DPO, added through the registry ------------------------------------------------------------------------------


@pytest.fixture
def dpo_run(run_copy, capsys):
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *DPO, "--only", "dpo")
    assert code == 0, err
    assert summary(out) == {"dpo": "trained"}
    return run_copy, err


def test_dpo_trains_the_sft_model_on_comparisons(dpo_run):
    run, err = dpo_run
    assert "dpo: training (no earlier output); model from " + str(run / "sft") in err
    sft, dpo = load_file(run / "sft" / "model.safetensors"), load_file(run / "dpo" / "model.safetensors")
    changed = [k for k in sft if not torch.equal(sft[k], dpo[k])]
    assert len(changed) > len(sft) // 2  # every layer moved, not only a head
    metrics = json.loads((run / "dpo" / "metrics.json").read_text())
    logged = [h for h in metrics["log_history"] if "rewards/margins" in h]
    assert logged and logged[-1]["rewards/margins"] > logged[0]["rewards/margins"]  # chosen pulled above rejected
    assert logged[-1]["rewards/accuracies"] >= 0.75
    assert json.loads((run / "dpo" / "alignkit_stage.json").read_text())["inputs"] == {"model": str(run / "sft")}


def test_eval_reports_dpo_beside_the_other_policies(dpo_run, capsys):
    run, _ = dpo_run
    code, out, err = alignkit(capsys, "eval", TINY, f"output_dir={run}", *DPO)
    assert code == 0, err
    report = json.loads((run / "report.json").read_text())
    assert list(report["eval"]) == ["base", "sft", "ppo", "dpo"]
    dpo = report["eval"]["dpo"]
    assert 0 <= dpo["gold_accuracy"] <= 1 and dpo["reward_mean"] is not None and dpo["kl_to_sft"] is not None
    assert set(report["win_rates"]) == {"ppo", "dpo"} and all(0 <= r <= 1 for r in report["win_rates"].values())
    markdown = (run / "report.md").read_text()
    assert (
        "| dpo |" in markdown
        and "Win rate of dpo against sft" in markdown
        and "Win rate of ppo against sft" in markdown
    )
    assert (run / "dpo.png").is_file()
    # the verdict, on each against sft, ends the command's output; dpo has no reward of its own training to show
    verdict = report["verdict"]
    assert set(verdict) == {"ppo", "dpo"} and verdict["dpo"]["training_reward"] is None
    assert all(v["wins"] + v["ties"] + v["losses"] == report["eval_prompts"] for v in verdict.values())
    lines = out.strip().splitlines()
    assert lines[-2].startswith(f"- ppo: {verdict['ppo']['conclusion']}; ") and "(training " in lines[-2]
    assert lines[-1].startswith(f"- dpo: {verdict['dpo']['conclusion']}; ") and "(training " not in lines[-1]


def test_chat_and_push_pick_dpo(dpo_run, monkeypatch, capsys):
    import io

    from huggingface_hub import HfApi, ModelCard

    run, _ = dpo_run
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of Zorbia?\n/exit\n"))
    code, out, err = alignkit(capsys, "chat", run, "--stage", "dpo", "--greedy")
    assert code == 0, err
    assert f"chatting with {run / 'dpo'}" in out
    # the Hub cannot be reached from here: the two calls that would are recorded instead
    uploads = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(
        HfApi,
        "upload_folder",
        lambda self, repo_id, folder_path, **kw: uploads.update({repo_id: ModelCard.load(f"{folder_path}/README.md")}),
    )
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    code, out, err = alignkit(capsys, "push", run, "--repo-id", "alice/tiny-dpo", "--stage", "dpo")
    assert code == 0, err
    card = uploads["alice/tiny-dpo"]
    assert "dpo" in card.data.tags and "ppo" not in card.data.tags
    assert "(pretrain -> sft -> dpo)" in card.text  # its lineage: what went into it, not the ppo beside it


def test_dpo_with_lora_trains_only_adapters(run_copy, capsys):
    code, out, err = alignkit(
        capsys,
        "run",
        TINY,
        f"output_dir={run_copy}",
        *DPO,
        "--only",
        "dpo",
        "--accept-upstream",  # the shared sft was trained without LoRA; only dpo gets an adapter here
        "lora.r=4",
        "lora.lora_alpha=8",
    )
    assert code == 0, err
    metrics = json.loads((run_copy / "dpo" / "metrics.json").read_text())
    counts = metrics["parameters"]["model"]
    assert 0 < counts["trainable"] < counts["total"] // 10
    assert (run_copy / "dpo" / "adapter" / "adapter_config.json").is_file()
    sft, dpo = load_file(run_copy / "sft" / "model.safetensors"), load_file(run_copy / "dpo" / "model.safetensors")
    assert any(not torch.equal(sft[k], dpo[k]) for k in sft)  # the merged weights carry the adapter's update


def test_chat_dpo_recipe_is_chat_recipe_plus_dpo():
    """recipes/chat-dpo.yaml shares chat.yaml's output folder, so every stage they share must be the same, or running
    one after the other would retrain them."""
    from alignkit.recipe import load_recipe

    chat, dpo = load_recipe(REPO / "recipes" / "chat.yaml"), load_recipe(REPO / "recipes" / "chat-dpo.yaml")
    assert list(dpo.stages) == [*chat.stages, "dpo"]
    assert dpo.to_dict() == {
        **chat.to_dict(),
        "stages": {**chat.to_dict()["stages"], "dpo": dpo.to_dict()["stages"]["dpo"]},
    }


# --- the reward model as InstructGPT trains it ----------------------------------------------------------------------


def test_ranking_loss_matches_a_hand_computation_on_a_batch_of_a_ranking_and_a_pair():
    import math

    from alignkit.stages.reward import RankingCollator, ranking_loss

    batch = RankingCollator(pad_token_id=0)([{"ranked_ids": [[5, 6], [7], [8, 9, 10]]}, {"ranked_ids": [[1], [2, 3]]}])
    assert batch["input_ids"].tolist() == [[5, 6, 0], [7, 0, 0], [8, 9, 10], [1, 0, 0], [2, 3, 0]]
    assert batch["better"].tolist() == [0, 0, 1, 3] and batch["worse"].tolist() == [1, 2, 2, 4]
    r = torch.tensor([2.0, 0.5, -1.0, 0.3, 0.7])

    def nll(x):
        return -math.log(1 / (1 + math.exp(-x)))

    ranking = (nll(2.0 - 0.5) + nll(2.0 + 1.0) + nll(0.5 + 1.0)) / 3  # -1/C(3,2) sum log sigmoid
    pair = nll(0.3 - 0.7)
    loss = ranking_loss(r, batch["better"], batch["worse"], batch["weight"], batch["rankings"])
    assert loss.item() == pytest.approx((ranking + pair) / 2, rel=1e-6)
    # TRL's center_rewards_coefficient: c x (r_better + r_worse)^2, averaged as the pairs are
    centered = ranking_loss(r, batch["better"], batch["worse"], batch["weight"], batch["rankings"], center=0.01)
    squares = ((2.0 + 0.5) ** 2 + (2.0 - 1.0) ** 2 + (0.5 - 1.0) ** 2) / 3 + (0.3 + 0.7) ** 2
    assert centered.item() == pytest.approx((ranking + pair) / 2 + 0.01 * squares / 2, rel=1e-6)


def test_all_pairs_trains_each_pair_of_a_ranking_as_its_own_element():
    from transformers import AutoTokenizer

    from alignkit.stages.reward import tokenize_rankings

    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "tiny" / "tokenizer")
    rows = [
        {"prompt": "Q: 1+1?\nA:", "ranked": [" 2", " 3", " 4", " 5"]},
        {"prompt": "Q: x?\nA:", "ranked": [" y", " z"]},
    ]
    one, *_ = tokenize_rankings(rows, tokenizer, 128)
    pairs, *_ = tokenize_rankings(rows, tokenizer, 128, all_pairs=True)
    assert [len(r) for r in one["ranked_ids"]] == [4, 2]
    assert len(pairs) == 6 + 1 and all(len(r) == 2 for r in pairs["ranked_ids"])
    first = one["ranked_ids"][0]
    assert pairs["ranked_ids"][:6] == [[first[a], first[b]] for a in range(4) for b in range(a + 1, 4)]


def test_a_shared_prefix_gives_the_plain_forwards_scores_and_gradients():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from alignkit.stages.reward import RankingCollator, ranking_loss, ranking_scores

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=50, num_labels=1, pad_token_id=0)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    model = GPT2ForSequenceClassification(config)
    examples = [
        {
            "ranked_ids": [
                [5, 6, 7, 8, 9],
                [5, 6, 7, 8, 11, 12],
                [5, 6, 7, 2],
                [5, 6, 3],
                [5, 6, 7, 8, 9, 4],
                [5, 6, 1],
            ]
        },
        {"ranked_ids": [[20, 21, 22], [20, 23]]},  # K = 2, a shorter prefix: padding between prefix and answer
        {"ranked_ids": [[30, 31], [40]]},  # nothing shared
    ]
    plain, shared = RankingCollator(0)(examples), RankingCollator(0, shared_prefix=True)(examples)
    assert shared["prefix_length"].tolist() == [2, 1, 0] and shared["owner"].tolist() == [0] * 6 + [1] * 2 + [2] * 2
    assert shared["input_ids"].shape[1] == 4 and plain["input_ids"].shape[1] == 6  # fewer tokens in the second pass
    results = []
    for batch in (plain, shared):
        model.zero_grad()
        scores = ranking_scores(model, batch)
        ranking_loss(scores, batch["better"], batch["worse"], batch["weight"], batch["rankings"]).backward()
        results.append((scores.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    for name, grad in results[0][1].items():
        assert torch.allclose(grad, results[1][1][name], atol=1e-5), name


def test_the_reward_stage_with_a_shared_prefix_trains_as_without(run_copy, capsys):
    weights = []
    for setting in ("false", "true"):
        code, _, err = rerun(
            capsys,
            run_copy,
            "reward",
            "~eval",
            "stages.reward.trainer.max_steps=4",
            f"stages.reward.shared_prefix={setting}",
        )
        assert code == 0, err
        weights.append(load_file(run_copy / "reward" / "model.safetensors"))
    start = load_file(run_copy / "sft" / "model.safetensors")
    name = "transformer.h.0.attn.c_attn.weight"
    assert not torch.allclose(weights[1][name], start[name])
    for key, tensor in weights[0].items():
        assert torch.allclose(tensor, weights[1][key], atol=1e-4), key


def test_a_shared_prefix_with_gradient_checkpointing_is_refused_before_anything_loads(tmp_path, capsys):
    code, _, err = alignkit(
        capsys,
        "validate",
        TINY,
        f"output_dir={tmp_path}",
        "stages.reward.shared_prefix=true",
        "stages.reward.trainer.gradient_checkpointing=true",
    )
    assert code == 2 and "stages.reward.shared_prefix" in err and "gradient_checkpointing" in err


def test_the_reward_stage_trains_rankings_of_two_and_six_and_normalises_on_the_demonstrations(run_copy, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit import data
    from alignkit.recipe import Dataset, load_recipe

    questions = [json.loads(line) for line in (REPO / "data" / "tiny" / "reward.jsonl").read_text().splitlines()]
    rows = []
    for i, row in enumerate(questions):  # every other question a ranking of six: the chosen, the rejected, 4 cut
        answer = row["chosen"][0]["content"]
        cut = [answer.split()[: -k - 1] for k in range(4)]
        extra = [[{"role": "assistant", "content": " ".join(words) + "."}] for words in cut] if i % 2 else []
        rows.append({"prompt": row["prompt"], "responses": [row["chosen"], *extra, row["rejected"]]})
    rankings = run_copy / "rankings.jsonl"
    rankings.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = alignkit(
        capsys, "run", TINY, f"output_dir={run_copy}", "--only", "reward", f"stages.reward.dataset.path={rankings}"
    )
    assert code == 0, err
    assert "reward: normalised: the demonstrations (data/tiny/sft.jsonl, 50) scored" in err
    sft = load_file(run_copy / "sft" / "model.safetensors")
    reward = load_file(run_copy / "reward" / "model.safetensors")
    assert not torch.equal(sft["transformer.h.0.attn.c_attn.weight"], reward["transformer.h.0.attn.c_attn.weight"])
    metrics = json.loads((run_copy / "reward" / "metrics.json").read_text())
    assert 0.5 < metrics["figures"]["accuracy"] <= 1 and metrics["normalize"]["applied"]
    # the demonstrations' mean score is 0, read back with plain transformers
    tokenizer = AutoTokenizer.from_pretrained(run_copy / "reward")
    model = AutoModelForSequenceClassification.from_pretrained(run_copy / "reward").eval()
    recipe = load_recipe(TINY, check_trainers=False)
    texts = [
        data.render(r, tokenizer)
        for r in data.load(Dataset(path="data/tiny/sft.jsonl"), "sft", recipe, "demonstrations")
    ]
    batch = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = model(**batch).logits[:, 0]
    assert abs(scores.mean().item()) < 1e-3 and scores.std().item() > 0.01
    assert abs(metrics["normalize"]["mean_before"]) > 1e-3  # it did move


def test_a_stage_run_twice_trains_the_same_weights(run_copy, capsys):
    """Each stage seeds torch before loading anything: the reward model's score head, which the stage creates, and
    so every weight after training come out the same from the same seed (they used to differ from run to run)."""
    weights = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical is promised on one thread (more may split sums differently)
    try:
        for _ in range(2):
            code, out, err = alignkit(
                capsys, "run", TINY, f"output_dir={run_copy}", "--only", "reward", "--force", "~eval"
            )
            assert code == 0, err
            weights.append(load_file(run_copy / "reward" / "model.safetensors"))
    finally:
        torch.set_num_threads(threads)  # the tests after this one keep their threads
    assert weights[0].keys() == weights[1].keys() and any("score" in k for k in weights[0])
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name
