"""`alignkit chat`: talk to a model in the terminal, multi-turn, through its chat template, tokens streamed as they come.

Works on a run folder (its last policy stage, or --stage), a stage folder, any local model folder or a Hub id. A
tokenizer without a chat template gets alignkit's default one, as the stages use.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import UserError

PROMPT = "you> "


def resolve(target: str, stage: str | None) -> str:
    """A run folder becomes one of its stage folders; anything else is a model folder or a Hub id."""
    from .hub import POLICY_STAGES
    from .pipeline import complete_stages

    path = Path(target)
    if path.is_dir() and not (path / "config.json").exists():
        done = [s for s in complete_stages(path) if s in POLICY_STAGES]
        if stage:
            if stage not in done:
                raise UserError(f"{target}: no finished {stage} stage here (finished: {', '.join(done) or 'none'})")
            return str(path / stage)
        if not done:
            raise UserError(f"{target}: neither a model folder (no config.json) nor a run with a finished pretrain, "
                            "sft or ppo stage")
        return str(path / done[-1])
    if stage:
        raise UserError(f"--stage needs a run folder; {target} is a model")
    return target


def load(target: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import DEFAULT_CHAT_TEMPLATE

    try:
        tokenizer = AutoTokenizer.from_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(target, dtype="auto")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {target!r}: {str(e).splitlines()[0]}\n  give a run folder, a model folder, or "
                        "a Hub id reachable from here") from None
    notes = []
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        notes.append("its tokenizer has no chat template: using alignkit's 'User:/Assistant:' one")
    if tokenizer.eos_token is None:
        notes.append("its tokenizer has no EOS token: answers stop at --max-new-tokens")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer, notes


def main(args) -> int:
    import torch
    from transformers import TextStreamer

    target = resolve(args.model, args.stage)
    model, tokenizer, notes = load(target)
    print(f"chatting with {target}; /reset forgets the conversation, /exit or Ctrl-D quits", flush=True)
    for note in notes:
        print(f"note: {note}", flush=True)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 2048)
    sampling = {"do_sample": False} if args.greedy else \
        {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    while True:
        try:
            text = input(PROMPT)
        except EOFError:
            print()
            return 0
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            history = []
            print("(conversation forgotten)", flush=True)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        ids = _prompt_ids(tokenizer, system, history, limit - args.max_new_tokens)
        if ids is None:
            history.pop()
            print(f"(that message alone is longer than the model's context of {limit} tokens)", flush=True)
            continue
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                                 max_new_tokens=args.max_new_tokens, streamer=streamer,
                                 pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                 else tokenizer.eos_token_id, **sampling)
        sys.stdout.flush()
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": answer})


def _prompt_ids(tokenizer, system: list[dict], history: list[dict], room: int):
    """The conversation's tokens, dropping the oldest exchanges while it does not fit the context."""
    while history:
        text = tokenizer.apply_chat_template(system + history, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        if ids.shape[1] <= room:
            return ids
        if len(history) <= 1:
            return None
        del history[:2]  # the oldest question and its answer
    return None
