"""alignkit's PPO against TRL 1.12's PPOTrainer, side by side on the chat recipe (a benchmark, not a test).

    python -m venv --system-site-packages /work/trl112 && /work/trl112/bin/pip install --no-deps trl==1.12.0
    python benchmarks/ppo_vs_trl.py --trl-python /work/trl112/bin/python [--seeds 42 1 2 3] [--out runs/seeds]

For each seed: `alignkit run recipes/chat.yaml seed=N output_dir=OUT/seedN stages.ppo.trainer.ptx_coef=0` (pretrain,
sft, reward, then alignkit's ppo without PPO-ptx, which TRL lacks, and the evaluation; stages already complete are
reused), then TRL 1.12's PPOTrainer, run by the other
environment's python, trains a policy from the same sft and reward folders with the recipe's ppo trainer block, the
same prompts (tokenized by alignkit's own code) and the settings alignkit applies (stop_token eos, dropout off), into
OUT/seedN-trl/ppo, which `alignkit eval` then evaluates on the same held-out prompts. Prints per seed: held-out gold
accuracy of sft and ppo, KL to sft, the ppo stage's wall seconds and its training episodes per second, then the
means. TRL 1.12 is the last TRL with PPO; it needs its own environment because alignkit installs a newer TRL.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "chat.yaml"
SAME = ["stages.ppo.trainer.ptx_coef=0"]  # TRL's PPO has no PPO-ptx: both run without it


def trl_ppo(run: Path, out: Path, seed: int) -> None:
    """In TRL 1.12's environment: train the recipe's ppo stage with TRL's PPOTrainer; write the policy, its tokenizer
    and timing.json to `out`."""
    import copy
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from alignkit import data, models
    from alignkit.recipe import load_recipe

    recipe = load_recipe(RECIPE, [f"seed={seed}", *SAME], check_trainers=False)
    spec = recipe.stages["ppo"]
    tokenizer = AutoTokenizer.from_pretrained(run / "sft")
    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"
    config = AutoModelForCausalLM.from_pretrained(run / "sft").config
    dropout_off = {k: 0.0 for k in models.dropout_settings(config)}
    policy, ref = (AutoModelForCausalLM.from_pretrained(run / "sft", **dropout_off) for _ in range(2))
    reward, value = (
        AutoModelForSequenceClassification.from_pretrained(run / "reward", num_labels=1, **dropout_off)
        for _ in range(2)
    )
    for model in (policy, ref, reward, value):
        models.fit_to_tokenizer(model, tokenizer)
    known = {f.name for f in dataclasses.fields(PPOConfig)}  # alignkit's own keys (ptx_coef 0 here, kl_target) out
    settings = {k: v for k, v in spec.trainer.items() if k in known}
    limit = models.context_length(policy.config) - settings["response_length"]
    prompts = data.load(spec.dataset, "ppo", recipe, "prompts")
    ids = prompts.map(
        lambda row: {
            "input_ids": left(data.render(row, left, add_generation_prompt=True), add_special_tokens=False).input_ids[
                -limit:
            ]
        },
        remove_columns=prompts.column_names,
    )
    args = PPOConfig(
        output_dir=str(out / "checkpoints"),
        seed=seed,
        stop_token="eos",
        save_strategy="no",
        use_cpu=not torch.cuda.is_available(),
        sft_model_path=str(run / "sft"),
        reward_model_path=str(run / "reward"),
        **settings,
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=left,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=ids,
        eval_dataset=ids.select(range(8)),
    )
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    episodes = trainer.state.episode
    trainer.model.policy.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "timing.json").write_text(json.dumps({"train_seconds": seconds, "episodes": episodes}))


def alignkit(*argv) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "alignkit", *map(str, argv)], cwd=REPO, capture_output=True, text=True
    )
    if done.returncode:
        sys.exit(f"alignkit {' '.join(map(str, argv))} failed:\n{done.stderr[-3000:]}")


def as_stage(folder: Path) -> None:
    """Give a policy folder written outside alignkit a complete manifest, so that `alignkit eval` reads it."""
    from alignkit.pipeline import MANIFEST, output_files

    (folder / MANIFEST).write_text(json.dumps({"stage": "ppo", "status": "complete", "files": output_files(folder)}))


def mean(values) -> str:
    values = list(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main():
    if sys.argv[1:2] == ["--trl"]:
        return trl_ppo(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl-python", required=True, help="python of an environment with trl==1.12.0")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3])
    parser.add_argument("--out", default="runs/seeds")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        run, theirs = REPO / args.out / f"seed{seed}", REPO / args.out / f"seed{seed}-trl"
        print(f"seed {seed}: alignkit ...", file=sys.stderr, flush=True)
        alignkit("run", RECIPE, f"seed={seed}", f"output_dir={run}", *SAME)
        ours = json.loads((run / "report.json").read_text())
        manifest = json.loads((run / "ppo" / "alignkit_stage.json").read_text())
        logged = json.loads((run / "ppo" / "metrics.json").read_text())["log_history"]
        last = [h for h in logged if "eps" in h][-1]
        print(f"seed {seed}: TRL 1.12 ...", file=sys.stderr, flush=True)
        for stage in ("pretrain", "sft", "reward"):
            shutil.copytree(run / stage, theirs / stage, dirs_exist_ok=True)
        shutil.rmtree(theirs / "ppo", ignore_errors=True)
        (theirs / "ppo").mkdir(parents=True)
        start = time.time()
        done = subprocess.run(
            [args.trl_python, __file__, "--trl", str(run), str(theirs / "ppo"), str(seed)],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        if done.returncode:
            sys.exit(f"TRL's PPO failed on seed {seed}:\n{done.stderr[-3000:]}")
        wall = time.time() - start
        timing = json.loads((theirs / "ppo" / "timing.json").read_text())
        as_stage(theirs / "ppo")
        alignkit("eval", RECIPE, f"seed={seed}", f"output_dir={theirs}", *SAME)
        report = json.loads((theirs / "report.json").read_text())
        rows.append(
            {
                "seed": seed,
                "sft": ours["eval"]["sft"]["gold_accuracy"],
                "ours": (
                    ours["eval"]["ppo"]["gold_accuracy"],
                    ours["eval"]["ppo"]["kl_to_sft"],
                    manifest["seconds"],
                    last["eps"],
                ),
                "trl": (
                    report["eval"]["ppo"]["gold_accuracy"],
                    report["eval"]["ppo"]["kl_to_sft"],
                    wall,
                    timing["episodes"] / timing["train_seconds"],
                ),
            }
        )
    print(
        f"\nrecipes/chat.yaml's ppo stage from the same sft and reward models; held-out gold accuracy "
        f"({ours['eval_prompts']} prompts), KL to sft (nats per response), wall seconds of the stage (loading and "
        f"saving included), training episodes per second\n"
    )
    print(
        f"{'seed':>5s} {'sft':>6s} | {'alignkit ppo':>12s} {'KL':>6s} {'s':>6s} {'eps':>6s} | "
        f"{'TRL 1.12 ppo':>12s} {'KL':>6s} {'s':>6s} {'eps':>6s}"
    )
    for r in rows:
        print(
            f"{r['seed']:5d} {r['sft']:6.3f} | {r['ours'][0]:12.3f} {r['ours'][1]:6.2f} {r['ours'][2]:6.0f} "
            f"{r['ours'][3]:6.1f} | {r['trl'][0]:12.3f} {r['trl'][1]:6.2f} {r['trl'][2]:6.0f} {r['trl'][3]:6.1f}"
        )
    for name, key in (("alignkit", "ours"), ("TRL 1.12", "trl")):
        print(
            f"{name:9s} gain over sft {mean(r[key][0] - r['sft'] for r in rows)}, KL {mean(r[key][1] for r in rows)}, "
            f"seconds {mean(r[key][2] for r in rows)}, episodes/s {mean(r[key][3] for r in rows)}"
        )


if __name__ == "__main__":
    main()
