"""Peak memory of the PPO stage with full fine-tuning, LoRA and QLoRA, side by side.

    python benchmarks/ppo_memory.py [--width 64|256|512] [--out runs/bench-memory]

Trains recipes/tiny.yaml's pretrain -> sft -> reward once (at the chosen model width), then runs only its PPO stage
three times, each in a fresh process: full fine-tuning, LoRA (reference = policy with the
adapter off, value model with an adapter), QLoRA (the same over 4-bit weights). For each it prints:
  - peak resident memory of the process (what the OS saw; includes Python, torch and the libraries, measured from a
    process that only imports them: "stack");
  - model state: bytes of the four PPO models' weights as stored (policy, reference, value, reward), plus gradients
    and AdamW's two moments for the trainable parameters, from the parameters the stage reports in metrics.json;
  - trainable parameters of policy and value, from the stage's metrics.json;
and each figure's ratio to full fine-tuning. On a GPU the same ratios apply to GPU memory; the CPU numbers here
include the libraries' fixed cost, which hides them at the tiny width (the default width, 256, shows them).
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny.yaml"
MODES = {
    "full": [],
    "lora": ["lora.r=8", "lora.lora_alpha=16"],
    "qlora": [
        "lora.r=8",
        "lora.lora_alpha=16",
        "quantization.load_in_4bit=true",
        *[f"stages.{s}.trainer.bf16=true" for s in ("sft", "reward", "ppo")],
    ],
}


def child(argv):
    """Run alignkit in this process and report its peak resident memory in MiB."""
    if argv[0] == "--stack":
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401

        from alignkit.stages.ppo_trainer import PPOTrainer  # noqa: F401
    else:
        from alignkit.cli import main

        assert main(argv) == 0
    print("PEAK_MIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run(*argv) -> float:
    done = subprocess.run(
        [sys.executable, __file__, "--child", *map(str, argv)], cwd=REPO, capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"failed: alignkit {' '.join(map(str, argv))}\n{done.stderr[-3000:]}")
    return float(done.stdout.split("PEAK_MIB")[-1])


def state_bytes(parameters: dict, mode: str) -> float:
    """Weights of the four models as stored, plus a gradient and AdamW's two fp32 moments per trainable parameter.
    With LoRA the reference is the policy with its adapter off (no bytes of its own); the reward model is loaded like
    the value model's base (counted as the value model's frozen bytes)."""
    policy, value = parameters["policy"], parameters["value"]
    optimizer = lambda p: p["trainable_bytes"] + p["trainable"] * 8  # noqa: E731
    reference = policy["bytes"] if mode == "full" else 0
    reward = value["bytes"] - value["trainable_bytes"]
    return policy["bytes"] + optimizer(policy) + value["bytes"] + optimizer(value) + reference + reward


def main():
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256, help="n_embd of the tiny GPT-2 (64 is recipes/tiny.yaml)")
    parser.add_argument("--out", default="runs/bench-memory")
    args = parser.parse_args()
    out = Path(args.out) / f"width{args.width}"
    size = [
        f"model.config.n_embd={args.width}",
        f"model.config.n_head={max(2, args.width // 64)}",
        "model.config.n_layer=4",
        "stages.ppo.trainer.total_episodes=64",
    ]
    base = ["run", RECIPE, f"output_dir={out}", *size]
    print(f"training pretrain -> sft -> reward once ({out}) ...", file=sys.stderr)
    run(*base, "--from", "pretrain", "stages.ppo.trainer.total_episodes=8")
    stack = run("--stack")
    rows = {}
    for mode, settings in MODES.items():
        print(f"ppo with {mode} ...", file=sys.stderr)
        # LoRA settings would retrain sft and reward too: keep their full-precision outputs and rerun ppo alone
        peak = run(*base, *settings, "--only", "ppo", "--force")
        metrics = json.loads((out / "ppo" / "metrics.json").read_text())
        rows[mode] = (peak, state_bytes(metrics["parameters"], mode) / 2**20, metrics["parameters"])
    full_peak, full_state, _ = rows["full"]
    print(f"\nPPO stage, tiny GPT-2 (4 layers, width {args.width}), 64 episodes; library stack alone: {stack:.0f} MiB")
    print(
        f"{'':7s}{'peak RSS':>12s}{'x full':>8s}{'above stack':>13s}{'x full':>8s}{'model state':>13s}"
        f"{'x full':>8s}{'policy trainable':>18s}{'value trainable':>17s}"
    )
    for mode, (peak, state, params) in rows.items():
        above, full_above = peak - stack, full_peak - stack
        print(
            f"{mode:7s}{peak:9.0f} MiB{peak / full_peak:8.2f}{above:9.0f} MiB{above / full_above:8.2f}"
            f"{state:9.1f} MiB{state / full_state:8.2f}{params['policy']['trainable']:18,d}"
            f"{params['value']['trainable']:17,d}"
        )


if __name__ == "__main__":
    main()
