"""The command line: instant help with examples, generated data reproducible, and resuming an interrupted stage."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO, alignkit


def test_help_is_fast_and_imports_no_torch():
    code = (
        "import sys; from alignkit.cli import main\n"
        "for argv in (['--help'], ['run', '--help'], ['validate', '--help']):\n"
        "    try: main(argv)\n"
        "    except SystemExit: pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.stdout.count("examples:") == 2
    assert "--only STAGE" in proc.stdout and "KEY=VALUE" in proc.stdout
    assert proc.stdout.strip().endswith("NO TORCH")


def test_a_missing_dataset_is_refused_before_training(capsys):
    code, out, err = alignkit(
        capsys,
        "run",
        REPO / "recipes" / "tiny.yaml",
        "output_dir=/tmp/never",
        "--only",
        "ppo",
        "stages.ppo.dataset.path=missing.jsonl",
    )
    assert code == 2 and "stages.ppo.dataset.path: file not found: missing.jsonl" in err


def test_tiny_data_regenerates_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, "data/tiny/make.py", str(tmp_path)], check=True, cwd=REPO, timeout=120)
    shipped = REPO / "data" / "tiny"
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert made == sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file() and p.name != "make.py")
    for rel in made:
        assert (tmp_path / rel).read_bytes() == (shipped / rel).read_bytes(), rel


def test_interrupted_stage_resumes_from_its_last_checkpoint(tmp_path, capsys):
    recipe = tmp_path / "pretrain.yaml"
    recipe.write_text(f"""\
output_dir: {tmp_path / "run"}
model:
  config: {{model_type: gpt2, n_layer: 2, n_head: 2, n_embd: 64, n_positions: 128}}
  tokenizer: {REPO / "data/tiny/tokenizer"}
stages:
  pretrain:
    dataset: {{path: {REPO / "data/tiny/pretrain.jsonl"}}}
    trainer: {{max_steps: 400, save_steps: 10, per_device_train_batch_size: 4, learning_rate: 1.0e-3,
              gradient_checkpointing: false, bf16: false, logging_steps: 10}}
""")
    partial = tmp_path / "run" / "pretrain.partial"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignkit", "run", str(recipe)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 180
    while not list((partial / "checkpoints").glob("checkpoint-*/trainer_state.json")) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "pretrain").exists()  # nothing that looks complete
    assert json.loads((partial / "alignkit_stage.json").read_text())["status"] == "running"
    complete = [p for p in (partial / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    done = max(int(p.name.split("-")[1]) for p in complete)
    assert 0 < done < 400
    # A kill can land while the trainer writes a checkpoint (it writes trainer_state.json last): make sure one such
    # checkpoint is there, newer than the last complete one, and that the run skips it.
    cut = partial / "checkpoints" / f"checkpoint-{done + 10}"
    cut.mkdir(exist_ok=True)
    (cut / "trainer_state.json").unlink(missing_ok=True)
    (cut / "model.safetensors").write_bytes(b"cut off")

    code, out, err = alignkit(capsys, "run", recipe)
    assert code == 0
    assert f"ignoring {cut}: the run was stopped while it was being written" in err
    assert f"pretrain: resuming from {partial / 'checkpoints' / f'checkpoint-{done}'}" in err
    history = json.loads((tmp_path / "run" / "pretrain" / "metrics.json").read_text())["log_history"]
    assert history[-1]["step"] == 400
    first_logged = min(h["step"] for h in history if "loss" in h)
    assert first_logged <= done  # the log history of the first attempt came back with the checkpoint
    assert not partial.exists()
