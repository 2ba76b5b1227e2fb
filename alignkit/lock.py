"""One writer per run folder: an exclusive lock on {output_dir}/.alignkit.lock, held while a command writes there.

The lock is the kernel's (flock), so it dies with the process that holds it: a killed run never blocks the next one,
and no stale-lock heuristics are needed. The file itself stays; it says who held it last. In a run of many processes
the main one takes it for all (the others write nothing).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from pathlib import Path

from .distributed import is_main
from .errors import UserError
from .log import log

LOCK_FILE = ".alignkit.lock"
_held: set[int] = set()  # descriptors of the locks this process holds


def _close_in_child() -> None:
    # a forked child (a DataLoader worker) shares the lock; closing its copy keeps the lock dying with its holder
    for fd in list(_held):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


@contextlib.contextmanager
def exclusive(folder: Path, command: str):
    """Hold the run folder's lock for the block, or refuse at once (UserError) naming the process that holds it."""
    if not is_main():
        yield
        return
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.set_inheritable(fd, False)  # a child started with exec must not keep it after this process dies
    _held.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(_refusal(folder, fd)) from e
            # a filesystem without locks (some network mounts): go on, but say that nothing guards the folder
            log("", f"warning: cannot lock {path} ({e.strerror}); do not start two commands on {folder} at once")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": command, "since": _now()}).encode(), 0)
        yield
    except BaseException:
        _held.discard(fd)
        os.close(fd)
        fd = None
        if created:
            _remove_if_empty(folder)
        raise
    finally:
        if fd is not None:
            _held.discard(fd)
            os.close(fd)  # closing releases the lock


def _refusal(folder: Path, fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        holder = {}
    who = (
        f"process {holder['pid']} ({holder.get('command', '?')}, since {holder.get('since', '?')})"
        if "pid" in holder
        else "another process"
    )
    return (
        f"{folder} is in use by {who}: two commands writing one run folder would corrupt each other's stages. "
        "Wait for it to finish (or stop it), or give this command another output_dir"
    )


def _remove_if_empty(folder: Path) -> None:
    """A refused or failed command leaves no folder it created: only the lock file, if nothing else was written."""
    with contextlib.suppress(OSError):
        if [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            (folder / LOCK_FILE).unlink()
            folder.rmdir()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
