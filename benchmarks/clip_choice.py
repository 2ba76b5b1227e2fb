"""PPO's gradient clipping, each model by its own norm (alignkit since 2026-12-06) against one norm over the policy and
the value model together (alignkit before), on the chat world (a benchmark, not a test).

    python benchmarks/clip_choice.py [--seeds 42 1 2 3] [--out runs/i22]

For each seed, OUT/seedN must hold a complete run of recipes/chat.yaml with that seed (benchmarks/chat_seeds.py makes
them). Its pretrain, sft and reward folders are copied to OUT/seedN-joint, where the ppo stage trains again with the
old clipping (one norm over both models, patched in for this run only) and the run is evaluated as usual. Prints, per
seed, held-out gold accuracy, KL to sft, the first logged policy and value gradient norms, and the stage's time.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "chat.yaml"

# the clipping before 2026-12-06: accelerate's clip over every parameter of PolicyAndValue at once
JOINT = """
import sys
import torch
from alignkit.stages import ppo_trainer

def joint(self, limit):
    unwrapped = self.accelerator.unwrap_model(self.model)
    parts = {"policy": unwrapped.policy, "value": unwrapped.value_model}
    norms = {
        name: torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in part.parameters() if p.grad is not None])
        )
        for name, part in parts.items()
    }
    self.accelerator.clip_grad_norm_(self.model.parameters(), limit)
    return norms

ppo_trainer.PPOTrainer._clip_gradients = joint
from alignkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def figures(run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    history = json.loads((run / "ppo" / "metrics.json").read_text())["log_history"]
    first = next(h for h in history if "policy/grad_norm" in h)
    return {
        "sft": report["eval"]["sft"]["gold_accuracy"],
        "ppo": report["eval"]["ppo"]["gold_accuracy"],
        "kl": report["eval"]["ppo"]["kl_to_sft"],
        "policy_norm": first["policy/grad_norm"],
        "value_norm": first["val/grad_norm"],
        "seconds": report["stages"]["ppo"]["seconds"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3])
    parser.add_argument("--out", default="runs/i22")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        own, joint = Path(args.out) / f"seed{seed}", Path(args.out) / f"seed{seed}-joint"
        if not (joint / "report.json").exists():
            shutil.rmtree(joint, ignore_errors=True)
            joint.mkdir(parents=True)
            for stage in ("pretrain", "sft", "reward"):
                shutil.copytree(own / stage, joint / stage)
            command = [sys.executable, "-c", JOINT, "run", str(RECIPE), f"seed={seed}", f"output_dir={joint}"]
            with open(joint.with_suffix(".log"), "w") as log:
                subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
        rows.append((seed, figures(own), figures(joint)))
    print("| seed | sft | ppo, clipped apart | KL | ppo, clipped together | KL | first grad norms policy / value |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for seed, a, b in rows:
        print(
            f"| {seed} | {a['sft']:.3f} | {a['ppo']:.3f} | {a['kl']:.2f} | {b['ppo']:.3f} | {b['kl']:.2f} | "
            f"{a['policy_norm']:.2f} / {a['value_norm']:.2f} |"
        )
    gains = [[r[k]["ppo"] - r[k]["sft"] for r in rows] for k in (1, 2)]
    for name, g in zip(("apart", "together"), gains):
        sd = statistics.stdev(g) if len(g) > 1 else 0.0
        print(f"gain, clipped {name}: {statistics.mean(g):+.3f} ± {sd:.3f} ({', '.join(f'{x:+.3f}' for x in g)})")


if __name__ == "__main__":
    main()
