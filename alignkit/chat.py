"""`alignkit chat`: talk to a model in the terminal, multi-turn, through its chat template, tokens streamed as they
come.

Works on a run folder (its last policy stage up to date, or --stage; of its last round, or --round, when it has
rounds), a stage folder, any local model folder or a Hub id. A tokenizer without a chat template gets alignkit's
default one, as the stages use. An answer may use what the model's context leaves after the conversation, up to 256
tokens or --max-new-tokens; the oldest exchanges are dropped when that would be less than min(64, context / 4).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from .errors import UserError
from .log import log, wrap

PROMPT = "you> "


def resolve(target: str, stage: str | None, round: int | None = None) -> str:
    """A run folder becomes one of its stage folders, of the round pipeline.pick_round() picks (in a later round,
    its policy unless --stage names another); anything else is a model folder or a Hub id."""
    from .pipeline import ROUND_POLICY, complete_stages, finish_moves, pick_round, read_complete, stage_folder, stale
    from .stages import POLICIES

    path = Path(target)
    if path.is_dir() and not (path / "config.json").exists():
        finish_moves(path, f"alignkit chat {target}")  # a stage a kill left between its two renames
        n = pick_round(path, round, [stage] if stage else [])
        if n > 1:
            folder = stage_folder(path, stage or ROUND_POLICY, n)
            if not read_complete(folder):
                raise UserError(f"{target}: round {n} has no finished {folder.name} stage ({folder} is not complete)")
            if why := stale(path, folder):
                log("model", f"warning: {folder} is out of date ({why}); alignkit run brings it up to date")
            return str(folder)
        done = [s for s in complete_stages(path) if s in POLICIES]
        if stage:
            if stage not in done:
                raise UserError(f"{target}: no finished {stage} stage here (finished: {', '.join(done) or 'none'})")
            if why := stale(path, path / stage):
                log("model", f"warning: {path / stage} is out of date ({why}); alignkit run brings it up to date")
            return str(path / stage)
        if not done:
            raise UserError(
                f"{target}: neither a model folder (no config.json) nor a run with a finished policy "
                f"stage ({', '.join(POLICIES)})"
            )
        why = {s: stale(path, path / s) for s in done}
        fresh = [s for s in done if not why[s]]  # the last one not built on an output trained since
        for s in done[done.index(fresh[-1]) + 1 :] if fresh else done:
            log("model", f"left out: {path / s} is out of date ({why[s]})")
        if not fresh:
            raise UserError(
                f"{target}: every finished policy stage is out of date; alignkit run brings them up to date"
            )
        return str(path / fresh[-1])
    if stage or round is not None:
        raise UserError(f"--{'stage' if stage else 'round'} needs a run folder; {target} is a model")
    if not path.exists() and (target.startswith((".", "/", "~")) or target.count("/") > 1):
        raise UserError(
            f"cannot load {target!r}: no such folder; give a run folder, a model folder or a Hub id (owner/name)"
        )
    return target


def load(target: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .models import DEFAULT_CHAT_TEMPLATE
    from .pipeline import MANIFEST, read_complete
    from .stages import POLICIES

    folder = Path(target)
    if (folder / MANIFEST).is_file() and not read_complete(folder):
        raise UserError(f"{target}: a stage output that did not finish (or lost files); alignkit run finishes it")
    try:
        kinds = getattr(AutoConfig.from_pretrained(target), "architectures", None) or []
        if kinds and all(k.endswith("ForSequenceClassification") for k in kinds):
            raise UserError(
                f"{target}: a reward model ({', '.join(kinds)}) scores answers and writes none; give a policy (a "
                f"run folder, or one of its stages {', '.join(POLICIES)}) or another causal language model"
            )
        tokenizer = AutoTokenizer.from_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(target, dtype="auto")
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load {target!r}: {str(e).splitlines()[0]}\n  give a run folder, a model folder, or "
            "a Hub id reachable from here"
        ) from e
    notes = []
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        notes.append("its tokenizer has no chat template: using alignkit's 'User:/Assistant:' one")
    if tokenizer.eos_token is None:
        notes.append("its tokenizer has no EOS token: answers stop at --max-new-tokens")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer, notes


DEFAULT_MAX_NEW_TOKENS = 256  # the longest answer without --max-new-tokens, where the context leaves that much


def min_answer_tokens(limit: int) -> int:
    """The room always kept for an answer: old exchanges are dropped rather than leave less than this."""
    return max(1, min(64, limit // 4))


def main(args) -> int:
    import torch
    from transformers import TextStreamer

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: give a number of tokens, 1 or more")
    if not args.greedy and not (args.temperature > 0 and math.isfinite(args.temperature)):  # (greedy uses neither)
        raise UserError(
            f"--temperature {args.temperature}: give a number above 0 (lower is more predictable; "
            "--greedy always takes the most likely token)"
        )
    if not args.greedy and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p}: give a share of the probability mass, above 0 and at most 1")
    target = resolve(args.model, args.stage, args.round)
    model, tokenizer, notes = load(target)
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 2048)
    floor = min_answer_tokens(limit)
    longest = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    if args.max_new_tokens is not None and longest + floor > limit:  # said once here, not at every capped answer
        notes.append(
            f"--max-new-tokens {longest} does not fit the model's context of {limit} tokens beside a "
            "prompt: an answer stops where the context ends"
        )
    system = [{"role": "system", "content": args.system}] if args.system else []
    _check_system(tokenizer, system, limit - floor)
    print(wrap(f"chatting with {target}; /reset forgets the conversation, /exit or Ctrl-D quits"), flush=True)
    for note in notes:
        print(wrap(f"note: {note}"), flush=True)
    history: list[dict] = []
    sampling = (
        {"do_sample": False}
        if args.greedy
        else {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    )
    while True:
        try:
            text = input(PROMPT)
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:  # as at a shell's prompt: the line is dropped, the conversation goes on
            print("\n(Ctrl-D or /exit quits)", flush=True)
            continue
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            history = []
            print("(conversation forgotten)", flush=True)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        # old exchanges go only when they leave the answer less than `floor`: a conversation keeps its memory
        # rather than room for the longest answer; a message refused as too long keeps the conversation as it was
        kept = list(history)
        ids, dropped = _prompt_ids(tokenizer, system, kept, limit - min(longest, floor))
        if ids is None:
            history.pop()
            alone = "that message alone" + (" (with the system prompt)" if system else "")
            print(
                wrap(
                    f"({alone} is longer than the model's context of {limit} tokens allows, with room for an answer "
                    f"of {min(longest, floor)})"
                ),
                flush=True,
            )
            continue
        history = kept
        if dropped:
            oldest = "its oldest exchange" if dropped == 1 else f"its {dropped} oldest exchanges"
            print(
                wrap(f"(the conversation outgrew the model's context of {limit} tokens: forgot {oldest})"), flush=True
            )
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids.to(model.device),
                    attention_mask=torch.ones_like(ids).to(model.device),
                    max_new_tokens=min(longest, limit - ids.shape[1]),
                    streamer=streamer,
                    pad_token_id=tokenizer.pad_token_id
                    if tokenizer.pad_token_id is not None
                    else tokenizer.eos_token_id,
                    **sampling,
                )
        except KeyboardInterrupt:  # Ctrl-C stops the answer, not the chat: the unanswered message is forgotten
            history.pop()
            print("\n(answer stopped; your message is forgotten)", flush=True)
            continue
        sys.stdout.flush()
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": answer})


def _check_system(tokenizer, system: list[dict], room: int) -> None:
    """Refuse, before the first message, a chat template that cannot render the conversation (some refuse a system
    role) and a system prompt that leaves no room for a message and its answer."""
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            system + [{"role": "user", "content": ""}], tokenize=False, add_generation_prompt=True
        )
    except TemplateError as e:
        what = "refuses a system prompt" if system else "fails on a user message"
        fix = "leave --system out" if system else "give the tokenizer another chat template"
        raise UserError(f"{'--system: ' if system else ''}this model's chat template {what} ({e}); {fix}") from e
    if system and len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids) > room:
        raise UserError(
            "--system: the system prompt leaves no room in the model's context for a message and an answer; "
            "give a shorter one"
        )


def _prompt_ids(tokenizer, system: list[dict], history: list[dict], room: int):
    """The conversation's tokens (at most `room`) and how many of its oldest exchanges were dropped (from `history`
    too) to fit; None if the last message alone does not fit."""
    dropped = 0
    while history:
        text = tokenizer.apply_chat_template(system + history, tokenize=False, add_generation_prompt=True)
        # (verbose=False: a message too long for the context is refused below, not warned about by transformers)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids
        if ids.shape[1] <= room:
            return ids, dropped
        if len(history) <= 1:
            return None, dropped
        del history[:2]  # the oldest question and its answer
        dropped += 1
    return None, dropped
