"""`alignkit label`: check the batch and the database, bind the port, then serve the page until Ctrl-C (or
--export: write what was labelled and stop). Everything that can be wrong with the input is said before it serves."""

from __future__ import annotations

import errno
import os
import socket
import sys
from pathlib import Path

from ..errors import UserError
from . import batch, export
from .store import Store, db_path_for

GUIDELINES = """## How to label
- Put the best answer at the top: drag it, or press its number and move it with the arrow keys.
- Answers equally good (or equally bad): **tie** them (`t` ties the selected answer with the one above it).
- No answer acceptable? Say so (`n`), and if you can, **write a better one** (`w`): it counts as the best.
- Thumbs up or down (`+`, `-`) rate one answer on its own.
- `Enter` submits, `s` skips (your draft is kept), `z` undoes your last action."""


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit it: without, a keep-alive answer waits ~40 ms on Nagle and delayed ACKs (measured)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(
                f"port {port} on {host} is in use; give another with --port N (--port 0 picks a free one)"
            ) from e
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); give another --host or --port") from e
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def checked(args) -> tuple[Path, list, Path]:
    """The batch file, its rows and the database's place, each checked."""
    path = batch.locate(args.target)
    items = batch.read(path)
    db = Path(args.db) if args.db else db_path_for(path)
    if not db.exists() and not (db.parent.is_dir() and os.access(db.parent, os.W_OK)):
        raise UserError(
            f"{db.parent}: not writable, and the labels database ({db.name}) lives there; make the folder writable "
            "or give another place with --db FILE"
        )
    return path, items, db


def main(args) -> int:
    if args.min_labels < 1:
        raise UserError(f"--min-labels {args.min_labels}: each prompt needs at least one labeller; give 1 or more")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: give a port from 1 to 65535 (0 picks a free one)")
    if args.export and Path(args.export).exists() and not Path(args.export).is_dir():
        raise UserError(f"--export {args.export}: a file, not a folder; give a folder to write the labels to")
    path, items, db = checked(args)
    guidelines = GUIDELINES
    given = args.guidelines or (path.parent / "guidelines.md" if (path.parent / "guidelines.md").is_file() else None)
    if given:  # --guidelines, else a round's own (rounds.guidelines, copied beside its samples)
        try:
            guidelines = Path(given).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{given}: cannot read the guidelines ({e}); give a UTF-8 markdown file") from e
    judge = None
    if args.judge:
        from ..rank import load_judge

        judge = load_judge(args.judge)
    sock = None if args.export else bind(args.host, args.port)  # a port in use is said before a database is made
    try:
        store = Store(db, items, path, args.min_labels)
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    if args.export:
        made = export.write(store, Path(args.export), judge)
        counts = ", ".join(f"{n} {name}" for name, n in made.items())
        print(f"alignkit label: {counts} (+ agreement.json) -> {args.export}")
        return 0
    from .server import Labelling, app, is_local, markdown

    port = sock.getsockname()[1]
    labelling = Labelling(
        store, args.host, port, labeller=args.labeller or "", guidelines=markdown(guidelines), judge=judge
    )
    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{port}/" + ("" if is_local(args.host) else f"?token={labelling.token}")
    done = store.counters("")
    print(
        f"alignkit label: {len(store.items)} prompts from {store.meta['batch']} ({done['complete']} done), labels "
        f"in {store.path}\nalignkit label: open {url}  (status: {url.split('?')[0]}status; Ctrl-C stops, nothing "
        "is lost)"
        + (
            ""
            if is_local(args.host)
            else "\nalignkit label: share the URL with its token only with your labellers: it lets them in"
        ),
        flush=True,
    )
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app(labelling), log_level="warning", access_log=False, lifespan="off"))
    try:
        server.run(sockets=[sock])
    finally:
        store.close()
    print("alignkit label: stopped; run the same command to go on where everyone was", file=sys.stderr)
    return 0
