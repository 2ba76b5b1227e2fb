"""Many processes: launching them, and the one rule they follow (every process trains, only the main one writes).

A run with N processes is N copies of the same `alignkit run`, started by torchrun (`--num-processes N`) or by
`accelerate launch`; both set RANK and WORLD_SIZE. Every copy walks the pipeline in step: each trains its share of
every batch, the main process (rank 0) alone writes manifests, stage folders and reports, and the others wait for it
at `wait_for_everyone()` before they read what it wrote.
"""

from __future__ import annotations

import os
import sys


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_everyone() -> None:
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def fresh_accelerator_state() -> None:
    """Forget what an earlier stage's Accelerator fixed for the whole process (mixed precision, DeepSpeed or FSDP
    plugins, gradient accumulation), keeping the process group: each stage builds its own, with its own settings.
    Without it a stage with other `bf16`/`fp16` settings than the one before fails with accelerate's "AcceleratorState
    has already been initialized"."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def launch(argv: list[str], processes: int) -> int:
    """Run `alignkit ARGV` in `processes` processes on this machine through torchrun (gloo on a CPU, NCCL on GPUs).
    For several machines, DeepSpeed or FSDP use `accelerate launch` with a config from recipes/accelerate/.

    torchrun runs in this process, so that a failed child ends the run with its own message (printed above) and one
    line naming it, not torchrun's traceback and failure table; the exit status is the child's."""
    import logging

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # torchrun sets 1 thread per process and warns; share this machine's cores out instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    # its agent logs each child's exit and the SIGTERM it sends the others; the line below says what matters
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = torchrun.parse_args(["--standalone", f"--nproc_per_node={processes}", "-m", "alignkit", *argv])
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = f"exit status {failure.exitcode}" if failure.exitcode > 0 else f"signal {failure.signal_name()}"
        print(
            f"alignkit: process {rank} of {processes} failed ({how}); its messages are above. The others were "
            "stopped; completed stages and checkpoints are kept: mend the cause and run the same command again "
            "to resume.",
            file=sys.stderr,
        )
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as e:  # Ctrl-C or a kill reached torchrun's agent: the children got it too
        raise KeyboardInterrupt from e
    return 0
