"""What alignkit's layer costs: each stage through `alignkit run` against plain TRL doing the same training.

    python benchmarks/overhead.py [--width 256] [--pairs 5] [--epochs-times 1] [--trl-head] [--stages STAGE ...]
        [--out runs/bench-overhead]

Trains recipes/tiny.yaml (a 4-layer GPT-2 of the chosen width) once with alignkit, then times pretrain, sft, reward
(its normalisation off: plain TRL has none) and dpo (tiny.yaml plus the DPO block below), each in a fresh process,
both ways, on the same upstream folders, data and trainer settings:
  - alignkit: `alignkit run recipes/tiny.yaml --only STAGE --force ~eval` (recipe and data checks, conversion, length
    checks, fingerprints, the stage folder and its manifest; without the held-out evaluation and report.md, which
    plain TRL does not do; `alignkit eval` as its own command is timed apart: a fresh process, imports included);
  - plain TRL: what a user would write by hand: load the upstream model and tokenizer (pretrain: the same untrained
    model, built from the same seed), `load_dataset("json")`, build TRL's trainer with the recipe's trainer block
    (plus the settings the stage cannot run without on this machine: output_dir, use_cpu, max_length at the model's
    context), train, save.
The two run as interleaved pairs (alignkit, plain TRL, alignkit, plain TRL, ...: drift on the machine touches both
alike). --epochs-times N multiplies every stage's num_train_epochs on both sides: alignkit's cost is mostly a fixed
cost per invocation, so its share depends on how long the stage trains. Prints per stage the median wall seconds of
each (a fresh process, imports included) and the median of the per-pair ratios alignkit / plain TRL, with their
range. alignkit's pretrain, sft and dpo compute their loss on a CPU from the whole logits (`full_logits`), which is
faster than the chunked LM head plain TRL uses: with --trl-head each pair becomes a triple, the third run alignkit
with `full_logits: false` (TRL's head, exactly plain TRL's work), and a second ratio shows the layer's own cost
apart from that choice. The ppo stage is alignkit's own PPO (TRL has none after
1.12): benchmarks/ppo_vs_trl.py compares it with TRL 1.12's.
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny.yaml"
STAGES = ("pretrain", "sft", "reward", "dpo")
# the dpo stage that tiny.yaml lacks: its comparisons, a few epochs (as tests/test_stages.py trains it)
DPO = {
    "dataset": {"path": "data/tiny/reward.jsonl"},
    "trainer": {
        "num_train_epochs": 4,
        "learning_rate": 1.0e-4,
        "per_device_train_batch_size": 8,
        "gradient_checkpointing": False,
        "bf16": False,
        "logging_steps": 1,
        "save_steps": 10,
    },
}
DPO_OVERRIDES = [f"stages.dpo.dataset.path={DPO['dataset']['path']}"] + [
    f"stages.dpo.trainer.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in DPO["trainer"].items()
]


def plain(stage: str, out: Path, times: float = 1.0) -> None:
    """The stage in plain TRL, from the alignkit run's upstream folders (tokenizer with pad token and chat
    template)."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["stages"]["dpo"] = DPO
    # the recipe's trainer block as it stands (checkpoints every save_steps, as alignkit's stage writes them)
    settings = dict(
        recipe["stages"][stage]["trainer"],
        seed=recipe["seed"],
        use_cpu=not torch.cuda.is_available(),
        output_dir=str(out / f"plain-{stage}"),
    )
    settings["num_train_epochs"] = settings["num_train_epochs"] * times
    data = load_dataset("json", data_files=str(REPO / recipe["stages"][stage]["dataset"]["path"]), split="train")
    context = 128  # n_positions, as main() sets it
    if stage == "pretrain":  # the model alignkit built (its config.json), untrained, from the same seed
        from transformers import AutoConfig, set_seed
        from trl import SFTConfig, SFTTrainer

        tokenizer = AutoTokenizer.from_pretrained(out / "pretrain")
        set_seed(recipe["seed"])
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out / "pretrain"))
        trainer = SFTTrainer(
            model=model, args=SFTConfig(max_length=context, **settings), train_dataset=data, processing_class=tokenizer
        )
    elif stage == "sft":
        from trl import SFTConfig, SFTTrainer

        tokenizer = AutoTokenizer.from_pretrained(out / "pretrain")
        model = AutoModelForCausalLM.from_pretrained(out / "pretrain")
        trainer = SFTTrainer(
            model=model, args=SFTConfig(max_length=context, **settings), train_dataset=data, processing_class=tokenizer
        )
    elif stage == "reward":
        from trl import RewardConfig, RewardTrainer

        tokenizer = AutoTokenizer.from_pretrained(out / "sft")
        model = AutoModelForSequenceClassification.from_pretrained(out / "sft", num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = RewardTrainer(
            model=model,
            args=RewardConfig(max_length=context, **settings),
            train_dataset=data,
            processing_class=tokenizer,
        )
    else:
        from trl import DPOConfig, DPOTrainer

        tokenizer = AutoTokenizer.from_pretrained(out / "sft")
        model, ref = (AutoModelForCausalLM.from_pretrained(out / "sft") for _ in range(2))
        trainer = DPOTrainer(
            model=model,
            ref_model=ref,
            args=DPOConfig(max_length=context, **settings),
            train_dataset=data,
            processing_class=tokenizer,
        )
    trainer.train()
    trainer.save_model(str(out / f"plain-{stage}" / "model"))


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main():
    if sys.argv[1:2] == ["--plain"]:
        return plain(sys.argv[2], Path(sys.argv[3]), float(sys.argv[4]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=256, help="n_embd of the tiny GPT-2 (64 is recipes/tiny.yaml)")
    parser.add_argument("--pairs", type=int, default=5, help="interleaved runs of each")
    parser.add_argument("--epochs-times", type=float, default=1.0, help="scale every stage's num_train_epochs")
    parser.add_argument("--trl-head", action="store_true", help="also time alignkit with full_logits: false")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="which stages to time")
    parser.add_argument("--out", default="runs/bench-overhead")
    args = parser.parse_args()
    out = (REPO / args.out / f"width{args.width}").resolve()
    size = [
        f"model.config.n_embd={args.width}",
        f"model.config.n_head={max(2, args.width // 64)}",
        "model.config.n_layer=4",
        "model.config.n_positions=128",
    ]
    alignkit = [sys.executable, "-m", "alignkit", "run", str(RECIPE), f"output_dir={out}", *size]
    recipe = yaml.safe_load(RECIPE.read_text())
    print(f"training the pipeline once ({out}) ...", file=sys.stderr)
    timed(alignkit)
    # what alignkit does after the stages, which plain TRL does not: evaluate on the held-out prompts, write report.md
    report = statistics.median(
        timed([sys.executable, "-m", "alignkit", "eval", str(RECIPE), f"output_dir={out}", *size]) for _ in range(3)
    )
    rows = {}
    for stage in args.stages:
        print(f"{stage} ...", file=sys.stderr)
        # the same work: plain TRL has no reward normalisation, so alignkit's is off here
        extra = {"dpo": DPO_OVERRIDES, "reward": ["stages.reward.normalize=false"]}.get(stage, [])
        epochs = (DPO if stage == "dpo" else recipe["stages"][stage])["trainer"]["num_train_epochs"]
        extra = [*extra, f"stages.{stage}.trainer.num_train_epochs={epochs * args.epochs_times}", "~eval"]
        pairs = []
        for _ in range(args.pairs):
            ours = timed([*alignkit, *extra, "--only", stage, "--force"])
            theirs = timed([sys.executable, __file__, "--plain", stage, str(out), str(args.epochs_times)])
            head = None
            if args.trl_head and stage != "reward":  # the reward model has no LM head
                head = timed([*alignkit, *extra, f"stages.{stage}.full_logits=false", "--only", stage, "--force"])
            pairs.append((ours, theirs, head))
        rows[stage] = pairs
    print(
        f"\nrecipes/tiny.yaml, GPT-2 of 4 layers and width {args.width}, num_train_epochs x {args.epochs_times:g}; "
        f"wall seconds of a fresh process per stage, {args.pairs} interleaved pairs\n"
    )
    print(f"{'stage':8s}{'alignkit':>10s}{'plain TRL':>11s}{'ratio (median)':>16s}{'ratios':>18s}", end="")
    print(f"{'TRL head':>10s}{'ratio (median)':>16s}{'ratios':>18s}" if args.trl_head else "")
    for stage, pairs in rows.items():
        ratios = sorted(a / b for a, b, _ in pairs)
        print(
            f"{stage:8s}{statistics.median(a for a, _, _ in pairs):9.1f}s"
            f"{statistics.median(b for _, b, _ in pairs):10.1f}s"
            f"{statistics.median(ratios):16.3f}{f'{ratios[0]:.2f}-{ratios[-1]:.2f}':>18s}",
            end="",
        )
        heads = sorted(h / b for _, b, h in pairs if h is not None)
        if heads:
            median = statistics.median(h for _, _, h in pairs)
            print(f"{median:9.1f}s{statistics.median(heads):16.3f}{f'{heads[0]:.2f}-{heads[-1]:.2f}':>18s}")
        else:
            print()
    print(
        f"\n`alignkit eval` as its own command (evaluation, report.md; fresh process, imports included): {report:.1f}s"
    )


if __name__ == "__main__":
    main()
