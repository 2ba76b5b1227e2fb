"""Many processes: launching them, and the one rule they follow (every process trains, only the main one writes).

A run with N processes is N copies of the same `alignkit run`, started by torchrun (`--num-processes N`) or by
`accelerate launch`; both set RANK and WORLD_SIZE. Every copy walks the pipeline in step: each trains its share of
every batch, the main process (rank 0) alone writes manifests, stage folders and reports, and the others wait for it
at `wait_for_everyone()` before they read what it wrote.
"""

from __future__ import annotations

import os
import subprocess
import sys


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_everyone() -> None:
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def launch(argv: list[str], processes: int) -> int:
    """Run `alignkit ARGV` in `processes` processes on this machine through torchrun (gloo on a CPU, NCCL on GPUs).
    For several machines, DeepSpeed or FSDP use `accelerate launch` with a config from recipes/accelerate/."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "alignkit", *argv]
    env = dict(os.environ)
    # torchrun sets 1 thread per process and warns; share this machine's cores out instead
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    return subprocess.run(command, env=env).returncode
