"""Rows longer than the model's context, as HH-RLHF has: the reward model's normalisation and the evaluation cut them
from the left (keeping the end, where a score is read or an answer follows) and say how many; normalisation scores
each demonstration once, on the device the stage trained on."""

import json

import torch
from conftest import REPO, TINY, alignkit, rerun

LONG = " ".join(["The capital of Zorbia is Quell and its river runs north."] * 30)  # hundreds of tokens


def _with_a_long_row(path, source, long_row):
    rows = (REPO / source).read_text().splitlines()
    path.write_text("\n".join(rows + [json.dumps(long_row)]) + "\n")
    return path, len(rows) + 1


def test_normalisation_cuts_an_overlong_demonstration_after_the_reward_model_trains(run_copy, capsys, monkeypatch):
    """A demonstration longer than the context used to end the stage in an IndexError after the model had trained
    and been saved; it is cut from the left, counted, and the stage normalises on the trainer's device and length."""
    from alignkit.stages import reward

    demos, count = _with_a_long_row(
        run_copy / "demos.jsonl",
        "data/tiny/sft.jsonl",
        {"messages": [{"role": "user", "content": "Tell me about Zorbia."}, {"role": "assistant", "content": LONG}]},
    )
    seen = {}
    normalize = reward.normalize

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return normalize(*args, **kwargs)

    monkeypatch.setattr(reward, "normalize", spy)
    code, out, err = rerun(
        capsys,
        run_copy,
        "reward",
        "~eval",
        f"stages.reward.normalize_dataset.path={demos}",
    )
    assert code == 0, err
    assert f"normalising: 1 of {count} demonstrations longer than 128 tokens cut from the left" in err
    metrics = json.loads((run_copy / "reward" / "metrics.json").read_text())["normalize"]
    assert metrics["applied"] and metrics["rows"] == count and metrics["cut"] == 1
    assert seen["device"] == torch.device("cpu") and seen["max_length"] == 128  # the trainer's, this machine's


def test_normalisation_scores_each_demonstration_once_on_the_given_device(run_copy, monkeypatch):
    """One forward row per demonstration (the shift is exact: the mean after it needs no second pass), with the
    model and its inputs on the device it is given."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignkit.recipe import Dataset, load_recipe
    from alignkit.stages import reward

    rows, devices = [], set()
    load = AutoModelForSequenceClassification.from_pretrained

    def counted(*args, **kwargs):
        model = load(*args, **kwargs)

        def hook(module, inputs, kwargs):
            rows.append(kwargs["input_ids"].shape[0])
            devices.add((kwargs["input_ids"].device, next(module.parameters()).device))

        model.register_forward_pre_hook(hook, with_kwargs=True)
        return model

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", counted)
    recipe = load_recipe(TINY, check_trainers=False)
    tokenizer = AutoTokenizer.from_pretrained(run_copy / "reward")
    spec = Dataset(path="data/tiny/sft.jsonl")
    done = reward.normalize(run_copy / "reward", recipe, tokenizer, "x", spec, "demonstrations", device="cpu")
    assert sum(rows) == done["rows"] == 50 and len(rows) == 2  # 50 demonstrations in batches of 32, once
    assert devices == {(torch.device("cpu"), torch.device("cpu"))}


def test_evaluation_cuts_prompts_that_leave_no_room_for_the_answer(run_copy, capsys):
    """A held-out prompt longer than the context less eval.max_new_tokens used to end the run in an IndexError inside
    generate(); it is cut from the left (the question at its end kept) and counted."""
    prompts, count = _with_a_long_row(
        run_copy / "eval.jsonl",
        "data/tiny/eval.jsonl",
        {
            "prompt": [{"role": "user", "content": LONG + " Which city is the capital of Zorbia?"}],
            "reference": "Quell",
        },
    )
    code, out, err = alignkit(capsys, "eval", TINY, f"output_dir={run_copy}", f"eval.dataset.path={prompts}")
    assert code == 0, err
    assert f"eval: warning: 1 of {count} prompts longer than 112 tokens" in err  # 128 - max_new_tokens 16
    report = json.loads((run_copy / "report.json").read_text())
    assert report["eval_prompts"] == count and report["eval"]["ppo"]["length_mean"] > 0


def test_eval_max_new_tokens_that_fill_the_context_fail_validation(capsys):
    code, out, err = alignkit(capsys, "validate", TINY, "eval.max_new_tokens=128")
    assert code == 2 and "eval.max_new_tokens: 128 tokens leave no room for a prompt" in err
