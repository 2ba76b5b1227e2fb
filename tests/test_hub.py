"""Pushing to the Hub. This machine cannot reach the Hub, so the two calls that would (HfApi.create_repo and
HfApi.upload_folder) are replaced by recorders; everything before them (token lookup, files, model card) is real."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import FAST, REPO, TINY, alignkit, summary
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignkit.report import verdict_lines

TOKEN = "hf_alignkitTestSecret0123456789"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Record what would be uploaded: repo creations, and a copy of each uploaded folder."""
    calls = {"repos": {}, "uploads": {}}

    def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
        assert self.token == TOKEN
        calls["repos"][repo_id] = private

    def upload_folder(self, repo_id, folder_path, commit_message=None, **kwargs):
        import shutil

        copy = tmp_path / "uploaded" / repo_id.replace("/", "__")
        shutil.copytree(folder_path, copy)
        calls["uploads"][repo_id] = copy

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return calls


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _nowhere(token: str, *folders: Path):
    for folder in folders:
        for f in folder.rglob("*"):
            if f.is_file():
                assert token.encode() not in f.read_bytes(), f


def test_hub_section_pushes_merged_models_with_tokenizer_and_card(run_copy, hub, capsys):
    code, out, err = alignkit(
        capsys,
        "run",
        TINY,
        f"output_dir={run_copy}",
        *FAST,
        "hub.repo_id=alice/tiny",
        "hub.stages=[sft, ppo]",
        "hub.private=true",
    )
    assert code == 0, err
    assert summary(out) == dict.fromkeys(["pretrain", "sft", "reward", "ppo"], "reused")
    assert hub["repos"] == {"alice/tiny-sft": True, "alice/tiny": True}  # the last stage gets the plain name
    assert "https://huggingface.co/alice/tiny" in out
    ppo = hub["uploads"]["alice/tiny"]
    files = _files(ppo)
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "recipe.yaml"} <= files
    assert not {"alignkit_stage.json", "training_args.bin"} & files and not any(f.startswith("adapter") for f in files)
    tokenizer = AutoTokenizer.from_pretrained(ppo)
    assert "Assistant:" in tokenizer.chat_template and tokenizer.pad_token == "<|pad|>"
    assert AutoModelForCausalLM.from_pretrained(ppo).config.vocab_size == len(tokenizer)

    card = ModelCard.load(ppo / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"alignkit", "trl", "sft", "reward-model", "rlhf", "ppo"} <= set(meta["tags"])
    assert "datasets" not in meta  # local files are named in the text, not claimed as Hub datasets
    text = card.text
    for stage, dataset in (("pretrain", "data/tiny/pretrain.jsonl"), ("ppo", "data/tiny/ppo.jsonl")):
        assert f"| {stage} | `{dataset}` |" in text
    assert "kl_coef: 0.3" in text and "total_episodes: 48" in text  # key settings of each stage
    assert "untrained gpt2 built from a config" in text
    report = json.loads((run_copy / "report.json").read_text())  # tiny.yaml's eval section wrote it
    for checkpoint in ("base", "sft", "ppo"):  # the evaluation table, row by row
        values = report["eval"][checkpoint]
        assert f"| {checkpoint} | {values['gold_accuracy']:.3f} | {values['reward_mean']:.3f} |" in text
    assert "kl_to_sft is a sampled estimate" in text
    assert all(line in text for line in verdict_lines(report))  # the report's verdict, on ppo against sft
    sft_card = ModelCard.load(hub["uploads"]["alice/tiny-sft"] / "README.md")
    assert "| ppo |" not in sft_card.text.split("## Evaluation")[0]  # its lineage stops at sft
    _nowhere(TOKEN, run_copy, *hub["uploads"].values())
    assert TOKEN not in out + err


def test_a_card_leaves_out_a_report_of_outputs_trained_again_since(run_copy, hub, capsys):
    # pretrain trained again: sft and ppo are out of date, so the eval is skipped and report.json still describes
    # the models before; the card must not give those figures as the pushed model's
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, "--only", "pretrain", "--force")
    assert code == 0, err
    assert "report.md is left as it was: a report of the outputs before" in err
    assert json.loads((run_copy / "report.json").read_text())["outputs"]["pretrain"] != json.loads(
        (run_copy / "pretrain" / "alignkit_stage.json").read_text()
    ).get("identity")
    code, out, err = alignkit(capsys, "push", run_copy, "--repo-id", "carol/tiny", "--stage", "ppo")
    assert code == 0, err
    assert "leave out" in out and "pretrain trained again since" in out and "alignkit eval" in out
    assert "## Evaluation" not in ModelCard.load(hub["uploads"]["carol/tiny"] / "README.md").text

    # evaluated again (what the message asks), the card has the new report's figures
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST)
    assert code == 0, err
    code, out, err = alignkit(capsys, "push", run_copy, "--repo-id", "carol/tiny-again", "--stage", "ppo")
    assert code == 0 and "leave out" not in out, err
    report = json.loads((run_copy / "report.json").read_text())
    assert set(report["outputs"]) == {"pretrain", "sft", "reward", "ppo"}
    text = ModelCard.load(hub["uploads"]["carol/tiny-again"] / "README.md").text
    assert "## Evaluation" in text and f"| ppo | {report['eval']['ppo']['gold_accuracy']:.3f} |" in text

    # sft trained again: the eval that follows leaves ppo out (built on the old sft), so its report is no card's
    code, out, err = alignkit(capsys, "run", TINY, f"output_dir={run_copy}", *FAST, "--only", "sft", "--force")
    assert code == 0 and "ppo" not in json.loads((run_copy / "report.json").read_text())["eval"], err
    code, out, err = alignkit(capsys, "push", run_copy, "--repo-id", "carol/tiny-third", "--stage", "ppo")
    assert code == 0 and "(ppo not evaluated in it)" in " ".join(out.split()), err
    assert "## Evaluation" not in ModelCard.load(hub["uploads"]["carol/tiny-third"] / "README.md").text


def test_push_command_sends_lora_adapters_pointing_at_the_hub(run_copy, hub, capsys):
    code, out, err = alignkit(
        capsys, "run", TINY, f"output_dir={run_copy}", *FAST, "--from", "sft", "lora.r=4", "lora.lora_alpha=8"
    )
    assert code == 0, err
    # sft's adapter sits on this run's pretrained model, which the Hub would not know
    code, out, err = alignkit(capsys, "push", run_copy, "--repo-id", "bob/chat", "--stage", "sft", "--adapter")
    assert code == 2 and "push pretrain too" in err and not hub["repos"]

    code, out, err = alignkit(
        capsys,
        "push",
        run_copy,
        "--repo-id",
        "bob/chat",
        "--stage",
        "sft",
        "--stage",
        "ppo",
        "--stage",
        "pretrain",
        "--adapter",
    )
    assert code == 2 and "pretrain has no LoRA adapter" in err.replace(str(run_copy) + "/", "")

    code, out, err = alignkit(capsys, "push", run_copy, "--repo-id", "bob/chat", "--stage", "ppo", "--adapter")
    assert code == 2 and "push sft too" in err

    hub["repos"].clear()
    code, out, err = alignkit(capsys, "push", run_copy, "--repo-id", "bob/chat")  # default: the last policy stage
    assert code == 0, err
    assert list(hub["repos"]) == ["bob/chat"] and "adapter" not in str(_files(hub["uploads"]["bob/chat"]))

    from peft import PeftConfig

    from alignkit import hub as hub_module

    # ppo's adapter, pushed beside sft: its base is the sft repo on the Hub, not a path of this machine
    staged = run_copy.parent / "staged"
    staged.mkdir()
    base = hub_module.stage_files(run_copy, "ppo", staged, True, {"sft": "bob/chat-sft", "ppo": "bob/chat"})
    assert base == "bob/chat-sft"
    assert PeftConfig.from_pretrained(staged).base_model_name_or_path == "bob/chat-sft"
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "recipe.yaml",
        "metrics.json",
    } <= _files(staged)
    _nowhere(TOKEN, run_copy, *hub["uploads"].values())


def test_pushed_recipes_carry_no_local_paths(run_copy, hub, tmp_path, capsys):
    # ppo trained again on datasets and a tokenizer named by absolute paths, as a recipe outside the repo names them
    # (--force: the same files spelled otherwise leave it up to date)
    data = REPO / "data" / "tiny"
    code, out, err = alignkit(
        capsys,
        "run",
        TINY,
        f"output_dir={run_copy}",
        *FAST,
        "--only",
        "ppo",
        "--force",
        f"stages.ppo.dataset.path={data / 'ppo.jsonl'}",
        f"model.tokenizer={data / 'tokenizer'}",
        f"eval.dataset.path={data / 'eval.jsonl'}",
    )
    assert code == 0, err
    written = (run_copy / "ppo" / "recipe.yaml").read_text()
    assert str(run_copy) in written and str(data / "ppo.jsonl") in written  # the run's own file keeps them

    code, out, err = alignkit(capsys, "push", run_copy, "--repo-id", "carol/tiny", "--stage", "sft", "--stage", "ppo")
    assert code == 0, err
    assert (run_copy / "ppo" / "recipe.yaml").read_text() == written
    local = {str(run_copy), str(run_copy.resolve()), str(tmp_path.parent), str(tmp_path.parent.resolve()), str(REPO)}
    for folder in hub["uploads"].values():
        for f in folder.rglob("*"):
            if f.is_file():
                content = f.read_bytes()
                assert not [p for p in local if p.encode() in content], f
    shared = (hub["uploads"]["carol/tiny"] / "recipe.yaml").read_text()
    assert shared.startswith("# alignkit push shortened the training machine's local paths")
    recipe = yaml.safe_load(shared)
    assert recipe["output_dir"] == "run"  # relative to the run folder's parent
    assert recipe["stages"]["ppo"]["dataset"]["path"] == "ppo.jsonl" and recipe["model"]["tokenizer"] == "tokenizer"
    assert recipe["stages"]["sft"]["dataset"]["path"] == "data/tiny/sft.jsonl"  # relative paths stay as they are
    assert recipe["eval"]["dataset"]["path"] == "eval.jsonl"
    card = (hub["uploads"]["carol/tiny"] / "README.md").read_text()
    assert "| ppo | `ppo.jsonl` |" in card and "| sft | `data/tiny/sft.jsonl` |" in card


def test_local_paths_are_shortened_relative_to_the_runs_parent(tmp_path):
    from alignkit.hub import portable

    run = tmp_path / "runs" / "chat"
    recipe = {
        "output_dir": str(run),
        "model": {"name_or_path": "openai-community/gpt2", "tokenizer": "~/tok"},
        "stages": {
            "sft": {
                "dataset": {"path": str(tmp_path / "runs" / "data" / "sft.jsonl"), "max_rows": 3},
                "trainer": {"report_to": [str(tmp_path / "elsewhere" / "logs")], "bf16": False},
            }
        },
        "seed": 42,
    }
    assert portable(recipe, run) == {
        "output_dir": "chat",
        "model": {"name_or_path": "openai-community/gpt2", "tokenizer": "tok"},
        "stages": {
            "sft": {
                "dataset": {"path": "data/sft.jsonl", "max_rows": 3},
                "trainer": {"report_to": ["logs"], "bf16": False},
            }
        },
        "seed": 42,
    }


def test_push_without_a_token_or_with_a_failing_upload_is_a_clear_error(run_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))  # no saved login either
    code, out, err = alignkit(capsys, "push", run_dir, "--repo-id", "alice/tiny")
    assert code == 2 and "no Hugging Face token: set HF_TOKEN, or run `hf auth login`" in err

    code, out, err = alignkit(capsys, "push", run_dir, "--repo-id", "tiny")
    assert code == 2 and "expected owner/name" in err

    def refuse(self, *args, **kwargs):
        raise OSError("403 Forbidden: you cannot write to alice")

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(HfApi, "create_repo", refuse)
    code, out, err = alignkit(capsys, "push", run_dir, "--repo-id", "alice/tiny")
    assert code == 2 and "pushing ppo to alice/tiny failed: OSError: 403 Forbidden" in err
    assert "the run is unchanged" in err and "Traceback" not in err and TOKEN not in err


def test_hub_section_is_checked_with_the_recipe(capsys):
    code, out, err = alignkit(
        capsys,
        "validate",
        TINY,
        "hub.repo_id=noslash",
        "hub.stages=[sft, dpo]",
        "hub.weights=adapter",
        "hub.privat=true",
    )
    assert code == 2
    assert "hub.repo_id: expected owner/name" in err
    assert "hub.stages: 'dpo' is not a stage of this recipe" in err
    assert "hub.weights: 'adapter' needs a lora block" in err
    assert "hub.privat: unknown key for Hub; did you mean private?" in err
