"""The `alignkit` command: main(argv) -> exit status. Heavy libraries are imported inside the commands."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import quiet
from .errors import Stopped, UserError, WaitingForRankings
from .log import log, wrap

RUN_EXAMPLES = """examples:
  alignkit run recipes/tiny.yaml
  alignkit run recipes/tiny.yaml output_dir=/tmp/run stages.ppo.trainer.learning_rate=1e-5
  alignkit run recipes/tiny.yaml --only reward      # just the reward stage (its upstream must exist)
  alignkit run recipes/tiny.yaml --from reward      # reward and everything after it
  alignkit run recipes/tiny.yaml --force            # retrain even the stages that are up to date
  alignkit run recipes/tiny.yaml ~model.config model.name_or_path=openai-community/gpt2   # ~KEY removes a key
  alignkit run recipes/chat-rounds.yaml              # the stages, then two more rounds of sample, rank, train

A stage whose config, data and upstream stages are unchanged is reused; an interrupted stage resumes from its last
checkpoint when the same command runs again (alignkit's ppo included). A recipe's rounds section runs its later rounds
after the stages (not with --only or --from), each reused and resumed the same way; a round ranked by people stops
with exit status 3 until people have ranked enough (`alignkit label RUN_DIR/round-N` opens the page). With an eval
section the run ends by evaluating every policy checkpoint (each round's too) and writing {output_dir}/report.md (as
`alignkit eval` does)."""

VALIDATE_EXAMPLES = """examples:
  alignkit validate recipes/tiny.yaml
  alignkit validate recipes/hh-gpt2.yaml stages.sft.trainer.learning_rate=2e-5
  alignkit validate recipes/*.yaml                  # several recipes: each is checked, all are reported

Checks each recipe with the same loader as `run` (every key and its range, trainer blocks against TRL's config
classes, the model config built without weights, the chat template rendered) and reads every stage's local dataset;
loads no model and downloads nothing (Hub datasets are read when the recipe runs). Arguments with '=' or starting
with '~' are overrides, applied to every recipe; the others are recipes. Exits 2 if any recipe has a problem."""

PUSH_EXAMPLES = """examples:
  alignkit push runs/chat --repo-id you/chat-ppo                 # the last policy stage (ppo) to you/chat-ppo
  alignkit push runs/chat --repo-id you/chat --stage sft --stage ppo --private
  alignkit push runs/chat --repo-id you/chat-lora --adapter      # the LoRA adapter instead of merged weights
  alignkit push runs/chat --repo-id you/chat-r2 --round 2        # round 2's ppo (default: the last round)

The last stage pushed goes to REPO_ID, every earlier one to REPO_ID-STAGE. Each repo gets the model, its tokenizer
with the chat template, and a model card with the run's lineage and evaluation. The token comes from HF_TOKEN or
`hf auth login` and is never written anywhere. A recipe's `hub` section pushes at the end of `alignkit run`.
In a run with rounds, a stage comes from the last round unless --round picks another (round 1 is the stages); a later
round holds its own reward and ppo and the stages they build on (pretrain, sft)."""

CHAT_EXAMPLES = """examples:
  alignkit chat runs/chat                      # its last policy stage up to date (dpo, ppo, sft, ...)
  alignkit chat runs/chat --stage sft --greedy
  alignkit chat runs/chat --round 2            # round 2's policy, in a run with rounds (default: the last round)
  alignkit chat openai-community/gpt2 --system "You are terse." --temperature 0.7 --top-p 0.9

In the conversation: /reset forgets the history, /exit (or Ctrl-D) quits."""

SAMPLE_EXAMPLES = """examples:
  alignkit sample runs/chat --prompts data/chat/ppo.jsonl --out runs/chat/samples.jsonl
  alignkit sample runs/chat --stage ppo --stage sft --k 4 --prompts data/chat/ppo.jsonl --out samples.jsonl \\
      --recipe recipes/chat.yaml --round 2          # both models, blind; refuse the recipe's held-out prompts
  alignkit sample runs/chat/ppo --prompts prompts.jsonl --out samples.jsonl --temperature 0.7 --top-p 0.9

Each row of the output is one prompt: its K answers (shared among the stages named, shuffled together so that
whoever ranks them compares the models blind), "ranks": null (not ranked yet) and its provenance (each model's
folder, stage and fingerprint; the sampling settings, seed, round; the prompt's file and line). It is the reward
stage's ranking format: rank it (alignkit rank, or people), then train on it. Answers that are empty or repeat
another of their prompt are drawn again up to --redraws times, then left out (counted); a prompt left with fewer
than two answers is left out. The same command and seed write the same file."""

RANK_EXAMPLES = """examples:
  alignkit rank samples.jsonl --by data/chat/judge.py:rank            # the chat world's judge, in place
  alignkit rank samples.jsonl --by mypackage.judges:rank --out ranked.jsonl

The judge is a Python function judge(prompt, answers) -> ranks: the prompt as the file holds it (text, or a list of
{role, content} messages), the answers' texts, and back one whole number per answer, 1 for the best, equal numbers
for ties. The reward stage then compares only strictly ordered answers; a ranking that is all ties teaches nothing.
A judge that raises or returns anything else, or a row with an empty or repeated answer, stops the command (exit
status 2) naming the file and line; nothing is written then."""

LABEL_EXAMPLES = """examples:
  alignkit label runs/chat-rounds                   # the round that waits for people: open the URL it prints
  alignkit label samples.jsonl --labeller ann --min-labels 2 --guidelines guide.md
  alignkit label samples.jsonl --host 0.0.0.0 --port 8000    # for others: the URL printed carries a token
  alignkit label samples.jsonl --export labelled/ --judge data/chat/judge.py:rank

The page shows one prompt at a time, its answers in an order of each labeller's own: rank them (drag, or the number
keys and arrows), tie them, mark none acceptable, give thumbs, write a better answer; skip, undo, come back. Every
action is stored as it is made in FILE's folder (samples.labels.db, SQLite): a kill loses nothing, and the same
command goes on where everyone was. A run whose round waits for people reads the rankings from there. --export
writes rankings.jsonl (the reward stage's format, ties kept), demonstrations.jsonl (sft's), thumbs.jsonl and
agreement.json (between labellers, and against --judge)."""

VERBOSE = (
    "show the libraries' own warnings and progress bars, which alignkit hides where its own lines say the same or "
    "the user cannot act on them (alignkit/quiet.py lists them)"
)

EVAL_EXAMPLES = """examples:
  alignkit eval recipes/chat.yaml
  alignkit eval recipes/chat.yaml eval.max_new_tokens=64 output_dir=runs/other

Writes {output_dir}/report.md, report.json and PNG plots. `alignkit run` does the same after training when the
recipe has an eval section."""


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    from .stages import NAMES, POLICIES

    parser = argparse.ArgumentParser(
        prog="alignkit",
        description="Pretrain -> SFT -> reward model -> PPO from one YAML recipe, on Hugging Face TRL.",
        epilog="run 'alignkit COMMAND --help' for a command's options and examples",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"alignkit {__version__}")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def subcommand(name, handler, summary, description, epilog):
        """A command: its help, its examples, and the function that runs it (cmd_NAME)."""
        sub = commands.add_parser(
            name,
            help=summary,
            description=description,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(handler=handler)
        return sub

    def command(name, handler, summary, description, epilog, recipe_help="the recipe YAML file"):
        """A command on one recipe, with KEY=VALUE overrides."""
        sub = subcommand(name, handler, summary, description, epilog)
        sub.add_argument("recipe", help=recipe_help)
        sub.add_argument(
            "overrides", nargs="*", metavar="KEY=VALUE", help="set a recipe key by its dotted path; ~KEY removes one"
        )
        return sub

    run = command(
        "run",
        cmd_run,
        "run a recipe's stages",
        "Run the recipe's stages in order, reusing those that are up to date.",
        RUN_EXAMPLES,
    )
    which = run.add_mutually_exclusive_group()
    which.add_argument("--only", choices=NAMES, metavar="STAGE", help="run this stage alone")
    which.add_argument(
        "--from", dest="start", choices=NAMES, metavar="STAGE", help="run this stage and the later ones"
    )
    run.add_argument("--force", action="store_true", help="retrain the chosen stages even if they are up to date")
    run.add_argument(
        "--accept-upstream",
        action="store_true",
        help="with --only/--from: build on earlier stages' outputs even where they were trained with other settings "
        "than the recipe gives (refused without it, naming the settings)",
    )
    run.add_argument(
        "--num-processes",
        type=int,
        default=1,
        metavar="N",
        help="train data-parallel in N processes on this machine (torchrun: one per GPU, or CPU "
        "processes over gloo); for DeepSpeed, FSDP or several machines use accelerate launch",
    )
    validate = subcommand(
        "validate",
        cmd_validate,
        "check recipes and their data without training",
        "Check recipes as `run` would, without loading any model.",
        VALIDATE_EXAMPLES,
    )
    validate.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe YAML files")
    validate.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="set a recipe key by its dotted path in every recipe; ~KEY removes one",
    )
    command(
        "eval",
        cmd_eval,
        "evaluate a run's checkpoints and write its report",
        "Evaluate the run's policy checkpoints (its base model and every policy stage) on the recipe's held-out "
        "prompts.",
        EVAL_EXAMPLES,
        recipe_help="the recipe YAML file (its output_dir holds the run)",
    )

    push = subcommand(
        "push",
        cmd_push,
        "push a run's models to the Hugging Face Hub",
        "Push stages of a finished run to the Hub, each with a model card.",
        PUSH_EXAMPLES,
    )
    push.add_argument("run_dir", help="a run's output_dir")
    push.add_argument("--repo-id", help="owner/name on the Hub (default: the run recipe's hub.repo_id)")
    push.add_argument(
        "--stage",
        dest="stages",
        action="append",
        choices=NAMES,
        metavar="STAGE",
        help="a stage to push (repeatable; default: the recipe's hub.stages, else the last policy stage)",
    )
    push.add_argument(
        "--round",
        type=int,
        metavar="N",
        help="in a run with rounds, which round's outputs (default: the last complete round; 1: the stages)",
    )
    push.add_argument("--private", action="store_true", default=None, help="create the repo private")
    push.add_argument("--adapter", action="store_true", help="push the LoRA adapter instead of merged weights")

    chat = subcommand(
        "chat",
        cmd_chat,
        "talk to a model in the terminal",
        "Talk to a stage of a run, or to any causal LM, through its chat template.",
        CHAT_EXAMPLES,
    )
    chat.add_argument("model", help="a run's output_dir, a stage folder, a model folder or a Hub id")
    chat.add_argument(
        "--stage", choices=POLICIES, help="which stage of a run (default: the last policy stage up to date)"
    )
    chat.add_argument(
        "--round",
        type=int,
        metavar="N",
        help="in a run with rounds, which round's policy (default: the last complete round; 1: the stages)",
    )
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help="longest answer, capped at what the model's context leaves after the conversation "
        "(default: what it leaves, up to 256)",
    )
    chat.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    chat.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default 0.9)")
    chat.add_argument("--greedy", action="store_true", help="always take the most likely token")

    sample = subcommand(
        "sample",
        cmd_sample,
        "draw K answers per prompt from a run's policy stages, to rank",
        "Draw K answers per prompt from a run's stages (or a model folder): unranked rankings to rank.",
        SAMPLE_EXAMPLES,
    )
    sample.add_argument("model", help="a run's output_dir, a stage folder or a model folder")
    sample.add_argument(
        "--stage",
        dest="stages",
        action="append",
        choices=POLICIES,
        metavar="STAGE",
        help="a stage of the run to sample (repeatable: the stages share each prompt's answers, shuffled together; "
        "default: the last policy stage)",
    )
    sample.add_argument(
        "--prompts",
        required=True,
        metavar="FILE",
        help="the prompts, in any format RL prompts are read in (prompt, messages, Alpaca, ShareGPT, HH; .jsonl, "
        ".json, .csv, .parquet)",
    )
    sample.add_argument("--out", required=True, metavar="FILE.jsonl", help="where to write the rows (replaced whole)")
    sample.add_argument("--k", type=int, default=4, help="answers per prompt, all models together (default 4)")
    sample.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    sample.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0: off)")
    sample.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        metavar="N",
        help="longest answer (default 64); prompts longer than the context leaves are cut from the left",
    )
    sample.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
    sample.add_argument(
        "--batch-size", type=int, default=32, metavar="N", help="answers generated at once (default 32)"
    )
    sample.add_argument(
        "--redraws",
        type=int,
        default=3,
        metavar="N",
        help="times an empty answer, or one equal to another of its prompt, is drawn again (default 3)",
    )
    sample.add_argument(
        "--round", type=int, metavar="N", help="the round these samples are for (recorded in each row)"
    )
    sample.add_argument(
        "--recipe",
        metavar="RECIPE",
        help="refuse prompts that this recipe's eval data holds (held-out prompts never enter training)",
    )

    rank = subcommand(
        "rank",
        cmd_rank,
        "rank each prompt's answers with a program (a judge)",
        "Rank the answers of every row of a rankings file with a judge function; ties allowed.",
        RANK_EXAMPLES,
    )
    rank.add_argument("file", help="a rankings file, as alignkit sample writes it (.jsonl)")
    rank.add_argument(
        "--by",
        required=True,
        metavar="MODULE:FUNCTION",
        help="the judge: a Python file (path/to/judge.py:function) or module (package.module:function)",
    )
    rank.add_argument("--out", metavar="FILE", help="where to write the ranked rows (default: replace FILE)")
    label = subcommand(
        "label",
        cmd_label,
        "a local page where people rank, rate and write answers",
        "Serve a page to rank, rate and rewrite the answers of a batch alignkit sample wrote.",
        LABEL_EXAMPLES,
    )
    label.add_argument(
        "target",
        metavar="FILE_OR_RUN",
        help="a batch (.jsonl from alignkit sample), a round's folder, or a run's output_dir (the round that waits "
        "for people, else the last one with samples)",
    )
    label.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs the token)"
    )
    label.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    label.add_argument("--labeller", metavar="NAME", help="the name the page starts with (each labeller gives theirs)")
    label.add_argument(
        "--min-labels",
        type=int,
        default=1,
        metavar="N",
        help="labellers each prompt is served to before it counts as done (default 1)",
    )
    label.add_argument("--guidelines", metavar="FILE.md", help="guidelines for labellers (markdown), in a panel")
    label.add_argument("--db", metavar="FILE", help="the labels database (default: beside the batch, .labels.db)")
    label.add_argument(
        "--judge", metavar="MODULE:FUNCTION", help="a program judge to measure the labellers' agreement against"
    )
    label.add_argument("--export", metavar="FOLDER", help="write what was labelled to FOLDER and stop")

    for sub in commands.choices.values():  # `alignkit --verbose run ...` and `alignkit run ... --verbose` alike
        sub.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE)
    return parser


def cmd_run(args) -> int:
    import shlex
    import time

    from . import distributed, guard, pipeline
    from .recipe import load_recipe

    t0 = time.time()
    recipe = load_recipe(args.recipe, args.overrides)
    quiet.hide_progress_bars(args.verbose)
    if args.num_processes > 1 and distributed.world_size() == 1:
        # bad data or a missing upstream stage is one clear error here, not one per process
        pipeline.check_data(recipe, pipeline.select(recipe, args.only, args.start))
        return distributed.launch(_without_num_processes(args.argv), args.num_processes)
    from . import lock

    command = "alignkit " + shlex.join(args.argv)
    args.folder = recipe.output_dir
    # what goes on after SIGTERM or Ctrl-C: without --force, which would start the interrupted stage afresh
    resume = "alignkit " + shlex.join([a for a in args.argv if a != "--force"])
    if recipe.rounds is not None and not (args.only or args.start):
        from . import rounds

        rounds.prepare(recipe)  # the rounds' prompts and judge, before anything trains
    with lock.exclusive(Path(recipe.output_dir), command), guard.signals(resume):  # SIGTERM, Ctrl-C: save, say how
        return _run(recipe, args, t0)


def _run(recipe, args, t0: float) -> int:
    import time

    from . import distributed, pipeline

    summary = pipeline.run(
        recipe, only=args.only, start=args.start, force=args.force, accept_upstream=args.accept_upstream
    )
    if recipe.rounds is not None:
        from . import rounds

        if args.only or args.start:
            log("rounds", "not run: --only and --from choose among the stages (round 1); run without them for rounds")
        else:
            summary.update(rounds.run(recipe, force=args.force))
    if not distributed.is_main():
        return 0  # the main process evaluates, reports and pushes
    width = max([9, *map(len, summary)])
    for stage, info in summary.items():
        print(
            f"{stage:{width}s} {info['status']:8s} {info['seconds']:8.1f}s  {os.path.join(recipe.output_dir, stage)}"
        )
    if recipe.eval is not None:
        from . import evaluate

        if evaluate.answers_prompts(recipe):
            report = evaluate.evaluate(recipe)
            print(evaluate.write_report(recipe, report, summary, time.time() - t0))
            _print_verdict(report)
        else:  # e.g. --only on a stage that trains from scratch: nothing that answers prompts yet, or none up to date
            stale = evaluate.left_out(recipe)
            for line in stale:
                log("eval", f"left out: {line}")
            log(
                "eval",
                f"skipped: no {' or '.join(evaluate.answering_stages(recipe))} model in {recipe.output_dir} "
                + (f"up to date; alignkit run {recipe.source} brings them up to date" if stale else "yet"),
            )
            if (Path(recipe.output_dir) / "report.md").is_file():
                log(
                    "eval",
                    f"{Path(recipe.output_dir) / 'report.md'} is left as it was: a report of the outputs before",
                )
    if recipe.hub is not None:
        from . import hub

        for line in hub.push(
            Path(recipe.output_dir),
            recipe.hub.repo_id,
            recipe.hub.stages,
            recipe.hub.private,
            recipe.hub.weights == "adapter",
        ):
            print(wrap(line))
    return 0


def _without_num_processes(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--num-processes":
            skip = True
        elif not a.startswith("--num-processes="):
            out.append(a)
    return out


def cmd_push(args) -> int:
    from . import hub

    args.folder = args.run_dir
    for line in hub.push_run(Path(args.run_dir), args.repo_id, args.stages, args.private, args.adapter, args.round):
        print(wrap(line))
    return 0


def cmd_chat(args) -> int:
    from . import chat

    args.folder = args.model
    quiet.hide_progress_bars(args.verbose)
    return chat.main(args)


def output_jsonl(option: str, path) -> Path:
    """A JSON Lines file a command is to write (`--out`), checked before any work: a .jsonl name, not a folder, in a
    folder that exists or can be made. Raises UserError naming the option."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise UserError(f"{option} {path}: write the rankings as JSON Lines, a .jsonl file")
    if path.is_dir():
        raise UserError(f"{option} {path}: a folder; give a file's path, e.g. {path / 'rankings.jsonl'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"{option} {path}: cannot make its folder {path.parent} ({e.strerror or e}); give another path"
        ) from None
    return path


def cmd_sample(args) -> int:
    from . import sample

    quiet.hide_progress_bars(args.verbose)
    args.folder = args.model
    args.out = output_jsonl("--out", args.out)
    return sample.main(args)


def cmd_rank(args) -> int:
    from . import rank

    if args.out:
        args.out = output_jsonl("--out", args.out)
    return rank.main(args)


def cmd_label(args) -> int:
    from .label import main

    return main.main(args)


def cmd_eval(args) -> int:
    import shlex
    import time

    from . import lock, pipeline
    from .recipe import load_recipe
    from .stages import ROUND_STAGES

    t0 = time.time()
    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.eval is None:
        raise UserError(
            f"{args.recipe}: no eval section; add one naming held-out prompts: "
            "eval: {dataset: {path: data/eval.jsonl}}"
        )
    out = Path(recipe.output_dir)
    args.folder = out
    if not out.is_dir():
        raise UserError(
            f"{out}: no run here (the output_dir of {args.recipe}); run it first: alignkit run {args.recipe}"
        )
    with lock.exclusive(out, "alignkit " + shlex.join(args.argv)):  # the report is written where `run` writes
        for stage in recipe.stages:
            pipeline.recover(out / stage)  # a stage a kill left between its two renames
        for n in range(2, recipe.rounds.count + 1) if recipe.rounds else []:
            for stage in ROUND_STAGES:
                pipeline.recover(pipeline.stage_folder(out, stage, n))  # and a later round's
        return _evaluate(recipe, out, t0, args.verbose)


def _evaluate(recipe, out: Path, t0: float, verbose: bool) -> int:
    import time

    from . import evaluate, pipeline

    stages = {
        stage: {"status": "reused", "seconds": pipeline.read_manifest(out / stage).get("seconds", 0.0)}
        for stage in pipeline.complete_stages(out)
        if stage in recipe.stages
    }
    quiet.hide_progress_bars(verbose)
    report = evaluate.evaluate(recipe)
    print(evaluate.write_report(recipe, report, stages, time.time() - t0))
    _print_verdict(report)
    return 0


def _print_verdict(report: dict) -> None:
    """The report's verdict, last on the terminal: what each policy trained after the reference bought."""
    from .report import verdict_lines

    lines = verdict_lines(report)
    if lines:
        print("\n" + "\n".join(lines))


def cmd_validate(args) -> int:
    """Check every recipe named, each with the same overrides; report each one's problems, exit 2 if any had some."""
    from . import pipeline
    from .recipe import load_recipe

    failed = 0
    for path in args.recipes:
        try:
            recipe = load_recipe(path, args.overrides)
            unread = pipeline.check_data(recipe, list(recipe.stages), local_only=True)
        except UserError as e:
            _report(e)
            failed += 1
            continue
        more = f", then rounds 2-{recipe.rounds.count}" if recipe.rounds is not None else ""
        print(wrap(f"{path}: ok ({' -> '.join(recipe.stages)}{more}; output in {recipe.output_dir})"))
        if unread:
            print(wrap("  Hub datasets, read when the recipe runs: " + ", ".join(unread)))
    if failed and len(args.recipes) > 1:
        print(f"alignkit: error: {failed} of {len(args.recipes)} recipes have problems (above)", file=sys.stderr)
    return 2 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    # KEY=VALUE and ~KEY overrides may stand anywhere, before or after the options; every other positional argument
    # is a recipe (validate takes several)
    command = next((a for a in argv if not a.startswith("-")), None)
    overrides = (
        [a for a in argv if ("=" in a or a.startswith("~")) and not a.startswith("-")]
        if command in ("run", "validate", "eval")
        else []
    )
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.argv = argv
    if overrides:
        args.overrides = list(args.overrides or []) + overrides
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with quiet.quiet(args.verbose):
            return args.handler(args)
    except UserError as e:
        _report(e)
        if os.environ.get("ALIGNKIT_DEBUG"):
            raise
        return 2
    except (Stopped, WaitingForRankings) as e:  # SIGTERM, Ctrl-C, or a round waiting for people: what goes on
        print(f"alignkit: {e}", file=sys.stderr)
        return e.exit_status
    except Exception as e:
        known = _known(e, args)  # refused pickles and a full disk outside a stage (eval, report, chat, push)
        if known is None or os.environ.get("ALIGNKIT_DEBUG"):
            raise
        _report(known)
        return 2
    except KeyboardInterrupt:
        from .stages import ORDER

        again = [s.name for s in ORDER if not s.resumable]
        print(
            "alignkit: interrupted; run the same command again to resume: finished stages are reused, an "
            "interrupted one goes on from its last checkpoint"
            + (f" ({', '.join(again)} starts again: it cannot resume)" if again else ""),
            file=sys.stderr,
        )
        return 130


def _known(e: Exception, args) -> UserError | None:
    import pickle

    from .errors import DiskFull, is_disk_full, unsafe_file

    folder = getattr(args, "folder", None)
    if isinstance(e, pickle.UnpicklingError):
        return unsafe_file(f"alignkit {args.command}", [Path(folder)] if folder else [])
    full = is_disk_full(e)
    if full is not None:
        return DiskFull(
            f"the disk is full ({full.filename or folder or 'while writing'}: {full.strerror or full}); finished "
            "stages and checkpoints are kept. Free space on that disk and run the same command again"
        )
    return None


def _report(e: UserError) -> None:
    """Print bad input's message; with ALIGNKIT_DEBUG=1 also the library errors behind its problems."""
    print(f"alignkit: error: {e}", file=sys.stderr)
    if os.environ.get("ALIGNKIT_DEBUG"):
        import traceback

        for problem in getattr(e, "problems", []):
            if problem.cause is not None:
                traceback.print_exception(problem.cause, file=sys.stderr)
