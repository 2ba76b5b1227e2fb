"""What watches a stage while it trains: a non-finite value stops it, a signal stops it at a step boundary with a
checkpoint, and the terminal shows alignkit's own progress line (TRL's raw log dicts go to the stage's log.jsonl).

Every stage trains through `fit(trainer, stage, ...)`, which attaches these to its trainer as Trainer callbacks; what
they need to know of the stage (its name, whether it resumes, which figures matter) comes from its declaration.
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from .distributed import is_main, world_size
from .errors import NonFinite, Stopped
from .log import keep, log

LOG_FILE = "log.jsonl"  # every log dict the trainer produced, one JSON object a line, in the stage folder


# --- signals ------------------------------------------------------------------------------------------------------

_pending: int | None = None  # a signal received while a stage trains, acted on at the next step boundary
_training = False
_command = "alignkit run ..."


def _name(signum: int) -> str:
    return signal.Signals(signum).name


def _on_signal(signum, frame):
    global _pending
    if _training and _pending is None and world_size() == 1:
        _pending = signum
        log(
            "",
            f"{_name(signum)} received: stopping at the end of this step, with a checkpoint where the stage can "
            "resume (send it again to stop at once)",
        )
        return
    # outside training, a second signal, or several processes (which could not agree on one step to stop at)
    raise Stopped(
        signum,
        f"stopped by {_name(signum)}; finished stages and the checkpoints written so far are kept: "
        f"run the same command again to go on: {_command}",
    )


@contextmanager
def signals(command: str):
    """Handle SIGTERM (how clusters preempt) and SIGINT (Ctrl-C) for the whole run: during training they stop at the
    next step boundary with a checkpoint; elsewhere they stop at once. `command` is what resumes the run."""
    global _command, _pending
    _command, _pending = command, None
    try:
        previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: leave the signals as they are
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class _StopOnSignal(TrainerCallback):
    """On a pending signal: save a checkpoint at this step boundary (where the stage saves checkpoints), then stop."""

    def __init__(self, stage: str, resumable: bool):
        self.stage, self.resumable, self.saving = stage, resumable, False

    def on_step_end(self, args, state, control, **kwargs):
        if _pending is None:
            return
        if self.resumable and args.save_strategy != "no":
            control.should_save, self.saving = True, True  # the trainer saves, then calls on_save below
            return
        raise Stopped(
            _pending,
            f"stopped by {_name(_pending)} in {self.stage} at step {state.global_step}; "
            f"{self.stage} saves no checkpoint it could resume from, so it starts again. Finished "
            f"stages are kept: run the same command again to go on: {_command}",
        )

    def on_save(self, args, state, control, **kwargs):
        if self.saving:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            raise Stopped(
                _pending,
                f"stopped by {_name(_pending)} in {self.stage} at step {state.global_step} of "
                f"{state.max_steps}; saved {checkpoint}. Run the same command again to resume "
                f"from it: {_command}",
            )


# --- non-finite values --------------------------------------------------------------------------------------------


class _FiniteGuard(TrainerCallback):
    """Stops the stage at the first step whose gradients, or whose logged loss, reward or KL, are not finite: before
    the optimizer applies them, so the weights in memory and every checkpoint written stay good."""

    def __init__(self, stage):
        self.stage, self.declared = stage.name, stage

    def _stop(self, args, step: int, what: str):
        raise diverged(self.declared, args, step, what)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        import torch

        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        if not grads:  # DeepSpeed keeps gradients elsewhere; the logged loss and grad_norm are checked below
            return
        # Each tensor's 2-norm is finite unless the tensor holds NaN or infinity, or its squares overflow; only then
        # are its values looked at. (The max-norm would say it directly, but torch computes it element by element
        # on a CPU: 16x slower, 30 ms a step for a 3.4M-parameter model.)
        norms = torch.stack(torch._foreach_norm(grads, 2.0))
        if torch.isfinite(norms).all():
            return
        bad = [g for g, n in zip(grads, norms) if not torch.isfinite(n) and not torch.isfinite(g).all()]
        if bad:
            self._stop(
                args,
                state.global_step + 1,
                f"the gradients hold {'NaN' if any(g.isnan().any() for g in bad) else 'infinite'} values (the "
                "loss was NaN or infinite, or overflowed in the backward pass)",
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        bad = {k: v for k, v in (logs or {}).items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:
            self._stop(
                args,
                state.global_step,
                "NaN or infinite values logged: " + ", ".join(f"{k} = {v}" for k, v in bad.items()),
            )


def diverged(stage, args, step: int, what: str) -> NonFinite:
    """The error that stops `stage` (its declaration) at `step` for a non-finite `what`: it names the last good
    checkpoint, which is kept, and the fix."""
    checkpoints = sorted(Path(args.output_dir).glob("checkpoint-*"), key=lambda p: p.stat().st_mtime)
    kept = f"its last good checkpoint is kept ({checkpoints[-1]})" if checkpoints else "no checkpoint was written"
    return NonFinite(
        f"{stage.name}: training diverged at step {step}: {what}. The stage is not marked complete; "
        f"{kept}.\n  {divergence_fix(stage, args)}"
    )


def divergence_fix(stage, args) -> str:
    """What to change after `stage` (its declaration) diverged."""
    lower = f"lower stages.{stage.name}.trainer.learning_rate (now {args.learning_rate:g})"
    if stage.clips_gradients and not args.max_grad_norm:
        lower += ", or turn gradient clipping on (max_grad_norm: 1.0)"
    return f"{lower}, then run again (a changed config starts the stage afresh)"


def check_finite(model, stage, args) -> None:
    """Saved weights must be finite before a stage is declared complete."""
    import torch

    bad = [name for name, p in model.named_parameters() if p.numel() and not torch.isfinite(p).all()]
    if bad:
        raise NonFinite(
            f"{stage.name}: the trained weights hold NaN or infinite values ({len(bad)} tensors, e.g. {bad[0]});"
            f" the stage is not marked complete.\n  {divergence_fix(stage, args)}"
        )


# --- progress -----------------------------------------------------------------------------------------------------


class _Progress(TrainerCallback):
    """One line per log event, at most every `every` seconds (and at the start and end): step, the figures that
    matter (each one logged at an earlier step labelled with it), speed and time left. Every log dict goes to
    {stage folder}/log.jsonl."""

    def __init__(self, stage, folder: Path, every: float = 10.0):
        self.stage, self.path, self.every = stage.name, folder / LOG_FILE, every
        self.shown = (*stage.figures, ("grad_norm", "grad norm"))  # (key in the trainer's logs, label)
        self.start = self.last = None
        self.first_step, self.printed = 0, -1
        self.latest: dict = {}
        self.at: dict = {}  # the step each of latest was logged at

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.first_step, self.last = time.time(), state.global_step, 0.0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not is_main() or not logs:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, **logs}, default=str) + "\n")
        numbers = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
        self.latest.update(numbers)
        self.at.update(dict.fromkeys(numbers, state.global_step))
        now, step = time.time(), state.global_step
        if step != self.printed and (now - self.last >= self.every or step >= state.max_steps):
            self.last, self.printed = now, step
            log(self.stage, self._line(state, now))

    def _line(self, state, now: float) -> str:
        done, total = state.global_step, state.max_steps or 0
        rate = (done - self.first_step) / max(now - self.start, 1e-9)
        parts = [f"step {done}/{total}" if total else f"step {done}"]
        parts += [
            f"{label} {self.latest[k]:.4g}{at_step(self.at[k], done)}" for k, label in self.shown if k in self.latest
        ]
        if rate > 0:
            parts.append(f"{rate:.2f} steps/s" if rate < 10 else f"{rate:.0f} steps/s")
            if total > done:
                parts.append(f"{clock((total - done) / rate)} left")
        return "  ".join(map(keep, parts))  # too long for a line: broken between figures

    def summary(self) -> dict:
        """The last value of each figure that matters."""
        return {label: self.latest[k] for k, label in self.shown if k in self.latest and k != "grad_norm"}


def at_step(logged: int | None, now: int | None = None) -> str:
    """What follows a figure logged at step `logged`, an earlier step than `now` (the last logged loss of a run whose
    end is not a logging step, say); nothing for one logged now, or where `logged` is None."""
    return f" (at step {logged})" if logged is not None and logged != now else ""


def logged_at(stage, history: list[dict]) -> dict[str, int]:
    """The step each of `stage`'s figures (its declaration's, by label) was last logged at in a trainer's log history,
    where that is before the history's last step."""
    last = max((h.get("step", 0) for h in history), default=0)
    steps = {label: [h["step"] for h in history if key in h and "step" in h] for key, label in stage.figures}
    return {label: s[-1] for label, s in steps.items() if s and s[-1] != last}


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def fit(trainer, stage, folder: Path, resume: str | None = None):
    """Train `trainer` for `stage` (its declaration) under alignkit's watch: non-finite values stop it, a signal stops
    it at a step boundary with a checkpoint (where the stage resumes), and progress is alignkit's own. Returns (train
    result, key figures)."""
    global _training
    for quiet in (PrinterCallback, ProgressCallback):  # TRL's raw log dicts and bars: they go to log.jsonl instead
        trainer.remove_callback(quiet)
    progress = _Progress(stage, folder)
    for callback in (_FiniteGuard(stage), _StopOnSignal(stage.name, stage.resumable), progress):
        trainer.add_callback(callback)
    _training = True
    try:
        result = trainer.train(resume_from_checkpoint=resume) if stage.resumable else trainer.train()
    finally:
        _training = False
    check_finite(trainer.accelerator.unwrap_model(trainer.model), stage, trainer.args)  # before anything is saved
    return result, progress.summary()
