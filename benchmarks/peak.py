"""How close training runs to what this machine can do (a benchmark, not a test).

    python benchmarks/peak.py [--steps 8] [--batch 4] [--length 128] [--out runs/bench-peak]

In one run, for fp32 and for bf16 (autocast, as TRL's `bf16: true` does on a CPU):
  1. the machine's matrix-product peak: the best FLOP/s of square torch.mm products (1024 to 4096) on all threads;
  2. a plain PyTorch training loop on a GPT-2-small shape (12 layers, 768 wide, 12 heads; the chat world's tokenizer,
     so a small vocabulary) over blocks of --length tokens: AdamW, --steps steps of --batch blocks, tokens per second;
     once as transformers builds GPT-2 (gelu_new), once with the activation alignkit computes it with
     (gelu_pytorch_tanh, the same function: model.fused_gelu);
  3. the same model and work through alignkit: `alignkit run` of a pretrain stage (model.config, packing, max_steps)
     on data/chat/pretrain.jsonl, tokens per second from its train_runtime (the trainer's own clock, as the loop's).
Tokens per second become FLOP/s with the usual count for training a decoder: 6 x (its matrix-product parameters,
the output head included) + 12 x layers x width x tokens in context per token (attention), and are printed as a
fraction of the peak of the precision they ran in. Both timings include the first step, the slowest.

alignkit/plain compares like with like: alignkit against the plain loop with the activation alignkit computes
(gelu_pytorch_tanh) and the optimizer kernel the Trainer uses by default (AdamW, fused); the loop with transformers'
gelu_new is printed beside it, not divided by.

    python benchmarks/peak.py --profile [--steps 4]

profiles both, in this process, with torch.profiler: the plain loop (tanh GELU) and `alignkit run` of the same
pretrain stage, each whole (model built, data read, every step), and prints the operators whose CPU time differs most
between them: where alignkit's extra time goes.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE = {"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024}


def machine() -> str:
    import datasets
    import torch
    import transformers
    import trl

    model = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?"
    )
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    memory = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")) / 2**20
    fast = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (
        f"{model}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), {memory:.0f} GiB; "
        f"{' '.join(fast)}; Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, TRL {trl.__version__}, datasets {datasets.__version__}"
    )


def peak(dtype) -> float:
    """Best FLOP/s of a square matrix product of this dtype."""
    import torch

    best = 0.0
    for n in (1024, 2048, 4096):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b)
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < 2.0:
            torch.mm(a, b)
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def flops_per_token(config, length: int) -> float:
    layer = 12 * config.n_embd**2  # attention (4 d^2) and MLP (8 d^2) weights per layer
    matmul_params = config.n_layer * layer + config.vocab_size * config.n_embd  # + the output head
    return 6 * matmul_params + 12 * config.n_layer * config.n_embd * length


def plain_loop(vocab: int, steps: int, batch: int, length: int, bf16: bool, act: str = "gelu_new") -> float:
    """Tokens per second of a plain PyTorch training loop on the GPT-2-small shape (GPT-2's activation: its own
    gelu_new, or gelu_pytorch_tanh as alignkit computes it)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        **{k: v for k, v in SHAPE.items() if k != "model_type"}, vocab_size=vocab, activation_function=act
    )
    model = GPT2LMHeadModel(config).train()
    # fused, as the Trainer's default optimizer (adamw_torch_fused) is: the same update in one kernel
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, vocab, (steps, batch, length))
    start = time.perf_counter()
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids[step], labels=ids[step]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return steps * batch * length / (time.perf_counter() - start)


def recipe_file(out: Path, steps: int, batch: int, length: int, bf16: bool) -> Path:
    """A recipe of one pretrain stage on the same shape and work as the plain loop."""
    import yaml

    recipe = {
        "output_dir": str(out),
        "seed": 0,
        "model": {"config": SHAPE, "tokenizer": str(REPO / "data" / "chat" / "tokenizer")},
        "stages": {
            "pretrain": {
                "dataset": {"path": str(REPO / "data" / "chat" / "pretrain.jsonl")},
                "trainer": {
                    "max_steps": steps,
                    "learning_rate": 1.0e-4,
                    "per_device_train_batch_size": batch,
                    "packing": True,
                    "max_length": length,
                    "gradient_checkpointing": False,
                    "bf16": bf16,
                    "logging_steps": 1,
                    "save_strategy": "no",
                },
            }
        },
    }
    path = out.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def through_alignkit(out: Path, steps: int, batch: int, length: int, bf16: bool) -> float:
    """Tokens per second of alignkit's pretrain stage on the same shape, from the trainer's train_runtime."""
    path = recipe_file(out, steps, batch, length, bf16)
    done = subprocess.run(
        [sys.executable, "-m", "alignkit", "run", str(path), "--force"], cwd=REPO, capture_output=True, text=True
    )
    if done.returncode:
        sys.exit(f"alignkit failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "pretrain" / "metrics.json").read_text())
    runtime = next(h["train_runtime"] for h in metrics["log_history"] if "train_runtime" in h)
    return steps * batch * length / runtime


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--out", default="runs/bench-peak")
    parser.add_argument("--profile", action="store_true", help="profile the plain loop and alignkit instead")
    args = parser.parse_args()
    if args.profile:
        return profile(args)
    import torch
    from transformers import AutoTokenizer, GPT2Config

    print(machine())
    vocab = len(AutoTokenizer.from_pretrained(REPO / "data" / "chat" / "tokenizer"))
    config = GPT2Config(**{k: v for k, v in SHAPE.items() if k != "model_type"}, vocab_size=vocab)
    per_token = flops_per_token(config, args.length)
    print(
        f"GPT-2-small shape, vocabulary {vocab}, blocks of {args.length} tokens, batch {args.batch}, {args.steps} "
        f"steps: {per_token / 1e9:.3f} GFLOP per token trained\n"
    )
    print(
        f"{'precision':9s} {'peak GFLOP/s':>12s} | {'plain loop tok/s':>16s} {'of peak':>7s} | "
        f"{'plain, tanh GELU':>16s} {'of peak':>7s} | {'alignkit tok/s':>14s} {'of peak':>7s} | "
        f"{'alignkit/plain (tanh)':>21s}"
    )
    for name, dtype, bf16 in (("fp32", torch.float32, False), ("bf16", torch.bfloat16, True)):
        top = peak(dtype)
        loop = plain_loop(vocab, args.steps, args.batch, args.length, bf16)
        tanh = plain_loop(vocab, args.steps, args.batch, args.length, bf16, act="gelu_pytorch_tanh")
        ours = through_alignkit(REPO / args.out / name, args.steps, args.batch, args.length, bf16)
        print(
            f"{name:9s} {top / 1e9:12.1f} | {loop:16.1f} {loop * per_token / top:7.1%} | "
            f"{tanh:16.1f} {tanh * per_token / top:7.1%} | "
            f"{ours:14.1f} {ours * per_token / top:7.1%} | {ours / tanh:21.2f}",
            flush=True,
        )


def profile(args) -> None:
    """Operators' CPU time (self, in ms) in the plain loop and through alignkit, fp32, and their difference."""
    import torch
    from torch.profiler import ProfilerActivity
    from transformers import AutoTokenizer

    from alignkit.cli import main as alignkit_main

    vocab = len(AutoTokenizer.from_pretrained(REPO / "data" / "chat" / "tokenizer"))
    totals = {}
    for name, run in (
        ("plain", lambda: plain_loop(vocab, args.steps, args.batch, args.length, False, act="gelu_pytorch_tanh")),
        (
            "alignkit",
            lambda: alignkit_main(
                [
                    "run",
                    str(recipe_file(REPO / args.out / "profile", args.steps, args.batch, args.length, False)),
                    "--force",
                ]
            ),
        ),
    ):
        with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        totals[name] = {e.key: e.self_cpu_time_total / 1000 for e in prof.key_averages()}
        print(f"{name}: {sum(totals[name].values()) / 1000:.1f} s of operator time in all")
    keys = set(totals["plain"]) | set(totals["alignkit"])
    rows = sorted(keys, key=lambda k: -abs(totals["alignkit"].get(k, 0) - totals["plain"].get(k, 0)))
    print(f"\n{'operator':40s} {'plain ms':>10s} {'alignkit ms':>12s} {'difference':>11s}")
    for k in rows[:20]:
        a, p = totals["alignkit"].get(k, 0.0), totals["plain"].get(k, 0.0)
        print(f"{k[:40]:40s} {p:10.1f} {a:12.1f} {a - p:+11.1f}")


if __name__ == "__main__":
    main()
