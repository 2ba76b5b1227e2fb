"""What a pretrained model knows: greedy completion of "The capital of X is" and "The flag of X is" for the 60
training countries of the chat world (their facts from data/chat/pretrain.jsonl; never the held-out countries).

    python benchmarks/recall.py runs/chat/pretrain [more model folders ...]

A cheap way to choose pretraining settings before the later stages: PPO can only teach the SFT model to state facts
that pretraining put there. Prints, per folder, how many capitals and flag colours it completes right.
"""

import argparse
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def facts() -> dict[tuple[str, str], str]:
    """{(kind, country): answer} for the training countries."""
    found = {}
    for line in (REPO / "data" / "chat" / "pretrain.jsonl").read_text().splitlines():
        text = json.loads(line)["text"]
        for kind in ("capital", "flag"):
            for m in re.finditer(rf"The {kind} of (\w+) is (\w+)\.", text):
                found[kind, m[1]] = m[2]
    training = set()
    for line in (REPO / "data" / "chat" / "comparisons.jsonl").read_text().splitlines():
        m = re.search(r"(?:capital|flag) of (\w+)\?", json.loads(line)["prompt"][-1]["content"])
        if m:
            training.add(m[1])
    return {key: value for key, value in found.items() if key[1] in training}


def recall(folder: str, known: dict) -> dict[str, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    result = {}
    for kind in ("capital", "flag"):
        items = [(country, answer) for (k, country), answer in known.items() if k == kind]
        batch = tokenizer([f"The {kind} of {c} is" for c, _ in items], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
        right = sum(bool(re.match(rf"{re.escape(answer)}\b", text.strip())) for (_, answer), text in zip(items, texts))
        result[kind] = f"{right}/{len(items)}"
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="pretrained (or later) model folders")
    args = parser.parse_args()
    known = facts()
    for folder in args.folders:
        r = recall(folder, known)
        print(f"{folder}: capitals {r['capital']}, flags {r['flag']}", flush=True)


if __name__ == "__main__":
    main()
