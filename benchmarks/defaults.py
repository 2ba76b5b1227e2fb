"""What each of alignkit's own choices (and chat.yaml's choices for time) costs or saves, on and off (a benchmark, not
a test).

    python benchmarks/defaults.py --run runs/seeds/seed42 [--repeats 2] [--choices NAME ...]
        [--out runs/bench-defaults]

--run is a complete run of recipes/chat.yaml (its pretrain, sft and reward folders are the upstream of the stages
timed here; the runs take its seed, from its sft/recipe.yaml). Each choice is timed both ways through `alignkit run
recipes/chat.yaml --only STAGE --force` in a fresh process, as interleaved repeats (on, off, on, off, ...), by the
trainer's own clock (train_runtime; ppo, alignkit's own trainer: the stage's seconds, loading included):
  - packing_strategy (pretrain): `wrapped` (alignkit's, with packing: true) against TRL's `bfd`, 40 steps;
  - bf16 autocast (pretrain): chat.yaml's fp32 against bf16, 40 steps, and the loss reached;
  - rankings (reward): one batch element per ranking (alignkit's) against all 15 pairs of each (`all_pairs: true`),
    one epoch each, with the pairwise accuracy reached;
  - full_logits (pretrain): the loss from whole logits on a CPU (alignkit's) against TRL's chunked LM head,
    40 steps, and the loss reached;
  - fused_gelu (reward, all pairs, one epoch): GPT-2's gelu_new as gelu_pytorch_tanh (alignkit's) against the
    model's own gelu_new modules; --run must then be a run saved with gelu_new (before alignkit fused it, or run
    with model.fused_gelu: false), since a model saved with gelu_pytorch_tanh loads with it either way;
  - lora_reference (ppo, with LoRA r=16 on the ppo stage, 640 episodes, no ptx): the reference as the policy with
    its adapter disabled (alignkit's) against a second frozen copy (`separate_reference: true`), timed by the stage's
    own clock (alignkit_stage.json), with the reward and KL reached (memory: benchmarks/ppo_memory.py);
  - disable_dropout (pretrain, chat.yaml's choice; TRL's SFTConfig has no such key): dropout off while pretraining
    against dropout as the model's config says, 40 steps, and the loss reached;
  - shared_prefix (reward, one epoch): the tokens a ranking's answers share run once per ranking against every
    answer whole, with the pairwise accuracy reached (the same scores and gradients, to rounding);
  - ptx_max_length (ppo, chat.yaml's choice): PPO-ptx on 64-token blocks against 128 (the pretrain stage's
    max_length, what it would take otherwise), 640 episodes, timed by the stage's own clock.
Prints the median seconds of each side, the ratio off / on, and what each side reached.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "chat.yaml"
PRETRAIN = ["stages.pretrain.trainer.max_steps=40", "stages.pretrain.trainer.save_strategy='no'"]
REWARD = ["stages.reward.trainer.num_train_epochs=1", "stages.reward.trainer.save_strategy='no'"]
PPO = [
    "stages.ppo.trainer.total_episodes=640",
    "stages.ppo.trainer.ptx_coef=0",
    "stages.ppo.lora.r=16",
    "stages.ppo.lora.lora_alpha=32",
]
PTX = ["stages.ppo.trainer.total_episodes=640"]
CHOICES = (
    (
        "packing_strategy",
        "pretrain",
        "wrapped (alignkit)",
        PRETRAIN + ["stages.pretrain.trainer.packing_strategy=wrapped"],
        "bfd (TRL's default)",
        PRETRAIN + ["stages.pretrain.trainer.packing_strategy=bfd"],
    ),
    (
        "bf16",
        "pretrain",
        "fp32 (chat.yaml)",
        PRETRAIN,
        "bf16 autocast",
        PRETRAIN + ["stages.pretrain.trainer.bf16=true"],
    ),
    (
        "rankings",
        "reward",
        "one element per ranking (alignkit's default)",
        REWARD + ["stages.reward.all_pairs=false"],
        "all 15 pairs (all_pairs: true, TRL's way)",
        REWARD + ["stages.reward.all_pairs=true"],
    ),
    (
        "full_logits",
        "pretrain",
        "whole logits on the CPU (alignkit's)",
        PRETRAIN + ["stages.pretrain.full_logits=true"],
        "TRL's chunked LM head",
        PRETRAIN + ["stages.pretrain.full_logits=false"],
    ),
    (
        "fused_gelu",
        "reward",
        "gelu_pytorch_tanh (alignkit's)",
        REWARD + ["stages.reward.all_pairs=true", "model.fused_gelu=true"],
        "gelu_new (the model's own)",
        REWARD + ["stages.reward.all_pairs=true", "model.fused_gelu=false"],
    ),
    (
        "lora_reference",
        "ppo",
        "the policy, adapter disabled (alignkit's)",
        PPO + ["stages.ppo.separate_reference=false"],
        "a second frozen copy",
        PPO + ["stages.ppo.separate_reference=true"],
    ),
    (
        "disable_dropout",
        "pretrain",
        "dropout off (chat.yaml's)",
        PRETRAIN + ["stages.pretrain.disable_dropout=true"],
        "dropout as the model's config says",
        PRETRAIN + ["stages.pretrain.disable_dropout=false"],
    ),
    (
        "shared_prefix",
        "reward",
        "shared prefix (`shared_prefix: true`)",
        REWARD + ["stages.reward.shared_prefix=true"],
        "every answer whole",
        REWARD + ["stages.reward.shared_prefix=false"],
    ),
    (
        "ptx_max_length",
        "ppo",
        "64-token PPO-ptx blocks (chat.yaml's)",
        PTX + ["stages.ppo.trainer.ptx_max_length=64"],
        "128 (the pretrain stage's max_length)",
        PTX + ["stages.ppo.trainer.ptx_max_length=128"],
    ),
)


def timed(out: Path, stage: str, overrides: list[str]) -> tuple[float, dict]:
    cmd = [
        sys.executable,
        "-m",
        "alignkit",
        "run",
        str(RECIPE),
        f"output_dir={out}",
        "--only",
        stage,
        "--force",
        "~eval",
    ]
    done = subprocess.run(cmd + overrides, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd + overrides)} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((out / stage / "metrics.json").read_text())
    history = metrics["log_history"]
    if stage == "ppo":  # alignkit's PPO: the stage's own clock, and the figures its training ended on
        seconds = json.loads((out / stage / "alignkit_stage.json").read_text())["seconds"]
        return seconds, {k: metrics["figures"][k] for k in ("reward", "kl")}
    runtime = next(h["train_runtime"] for h in history if "train_runtime" in h)
    last = [h for h in history if "loss" in h][-1]
    return runtime, {k: last[k] for k in ("loss", "accuracy") if k in last}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a complete run of recipes/chat.yaml")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-defaults")
    parser.add_argument("--choices", nargs="+", default=[c[0] for c in CHOICES], help="which of them to time")
    args = parser.parse_args()
    run, out = Path(args.run).resolve(), REPO / args.out
    seed = yaml.safe_load((run / "sft" / "recipe.yaml").read_text())["seed"]  # the run's own
    rows = []
    for name, stage, on_label, on, off_label, off in (c for c in CHOICES if c[0] in args.choices):
        folder = out / name
        for upstream in ("pretrain", "sft", "reward")[: ("pretrain", "sft", "reward", "ppo").index(stage)]:
            shutil.copytree(run / upstream, folder / upstream, dirs_exist_ok=True)
        times = {"on": [], "off": []}
        reached = {}
        for _ in range(args.repeats):
            for side, overrides in (("on", on), ("off", off)):
                seconds, figures = timed(folder, stage, [f"seed={seed}", *overrides])
                times[side].append(seconds)
                reached[side] = figures
                print(f"{name} {side}: {seconds:.1f} s {figures}", file=sys.stderr, flush=True)
        rows.append((name, stage, on_label, off_label, times, reached))

    print(f"\n{RECIPE.name}, upstream from {run}; median of {args.repeats} interleaved repeats, seconds (as above)\n")
    print("| choice | stage | alignkit's | s | reached | the other | s | reached | other / alignkit's |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, stage, on_label, off_label, times, reached in rows:
        a, b = statistics.median(times["on"]), statistics.median(times["off"])
        fig = {side: ", ".join(f"{k} {v:.3f}" for k, v in reached[side].items()) for side in reached}
        print(
            f"| {name} | {stage} | {on_label} | {a:.1f} | {fig['on']} | {off_label} | {b:.1f} | {fig['off']} "
            f"| {b / a:.2f} |"
        )


if __name__ == "__main__":
    main()
