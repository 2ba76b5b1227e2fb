"""How fast `alignkit sample` draws answers, against a plain transformers generate() loop over the same model, prompts
and batch size.

    python benchmarks/sample_speed.py [--run runs/chat] [--stage ppo] [--prompts data/chat/ppo.jsonl] [--k 4]
        [--batch-size 32] [--max-new-tokens 20] [--repeats 3]

Both sides start from the model folder and end with every answer decoded; each draws K answers for every prompt, at
temperature 1, in batches of --batch-size sequences:
  - alignkit: `alignkit sample RUN --stage STAGE ...` in this process (reading and checking the prompts, the model
    load, generation with the KV cache, the file written), with `--redraws 0`, so that it generates exactly as many
    answers as the plain loop; and once more with its default re-draws, whose distinct answers per second are
    printed apart (re-drawing duplicates is more generation, not slower generation);
  - plain: load the model and tokenizer, render every prompt through the chat template, repeat it K times, and for
    each batch tokenizer(padding=True, left) -> model.generate(do_sample=True) -> batch_decode.
The two run as interleaved pairs (alignkit, plain, alignkit, plain, ...: drift on the machine touches both alike).
Prints each side's median answers per second and the median of the per-pair ratios alignkit / plain, with their range
(target: at least 0.9).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def alignkit_side(args, out: Path, redraws: int) -> tuple[int, float]:
    """(answers in the file, seconds) of one `alignkit sample`."""
    from alignkit.cli import main

    t0 = time.perf_counter()
    code = main(
        [
            "sample",
            args.run,
            "--stage",
            args.stage,
            "--prompts",
            args.prompts,
            "--out",
            str(out),
            "--k",
            str(args.k),
            "--batch-size",
            str(args.batch_size),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--redraws",
            str(redraws),
        ]
    )
    seconds = time.perf_counter() - t0
    assert code == 0, f"alignkit sample exited with {code}"
    return sum(len(json.loads(line)["responses"]) for line in out.open()), seconds


def plain_side(args, prompts: list) -> tuple[int, float]:
    """(answers decoded, seconds) of a plain generate() loop."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    set_seed(42)
    t0 = time.perf_counter()
    folder = str(Path(args.run) / args.stage)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    texts = [
        text
        for prompt in prompts
        for text in [tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)] * args.k
    ]
    answers = []
    for start in range(0, len(texts), args.batch_size):
        batch = tokenizer(
            texts[start : start + args.batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        )
        with torch.no_grad():
            out = model.generate(
                **batch,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=args.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return len(answers), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/chat")
    parser.add_argument("--stage", default="ppo")
    parser.add_argument("--prompts", default="data/chat/ppo.jsonl")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not (Path(args.run) / args.stage / "config.json").exists():
        sys.exit(f"no {args.stage} model in {args.run}: run its recipe first (alignkit run recipes/chat.yaml)")

    from alignkit import data
    from alignkit.recipe import Dataset

    prompts = data.load(Dataset(path=args.prompts), "--prompts", None, "prompts")["prompt"]
    mine, plain, ratios = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "samples.jsonl"
        alignkit_side(args, out, 0)  # warm-up: imports, the first model load, the allocator
        plain_side(args, prompts)
        for _ in range(args.repeats):
            _, s = alignkit_side(args, out, 0)
            mine.append(len(prompts) * args.k / s)  # answers generated (those equal to another are then left out)
            n, s = plain_side(args, prompts)
            plain.append(n / s)
            ratios.append(mine[-1] / plain[-1])
        distinct, seconds = alignkit_side(args, out, 3)
    print(
        f"{args.run}/{args.stage}, {len(prompts)} prompts x K={args.k}, batch {args.batch_size}, "
        f"{args.max_new_tokens} new tokens at most, {args.repeats} pairs:"
    )
    print(f"  alignkit sample (--redraws 0): {statistics.median(mine):7.1f} answers/s")
    print(f"  plain generate() loop:         {statistics.median(plain):7.1f} answers/s")
    print(f"  ratio alignkit / plain: {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})")
    print(
        f"  with its default 3 re-draws: {distinct} distinct answers in {seconds:.1f} s, "
        f"{distinct / seconds:.1f} distinct answers/s"
    )


if __name__ == "__main__":
    main()
