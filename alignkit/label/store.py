"""Every labelling action, one SQLite transaction each (WAL mode), in a file beside the batch.

A labeller's view of a prompt is a state: the answers best first (`order`, indices into the batch's answers), which
positions tie with the one above (`ties`), thumbs per answer, "none is acceptable", and the text of a better answer
being written. Each action stores the whole state it leaves, so the draft of any prompt is its latest action's state,
undo restores the state before the undone action, and a kill at any instant loses no acknowledged action."""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import threading
import time
from pathlib import Path

from ..errors import DataError
from .batch import Item, fingerprint

SCHEMA_VERSION = 1
KINDS = ("edit", "skip", "submit")  # what a labeller posts (and may undo); "open", "reopen", "undo": the server's
MAX_TEXT = 20_000

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
    id INTEGER PRIMARY KEY, line INTEGER NOT NULL, prompt TEXT NOT NULL, responses TEXT NOT NULL,
    provenance TEXT NOT NULL
);
CREATE TABLE actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, labeller TEXT NOT NULL, item INTEGER NOT NULL REFERENCES items(id),
    kind TEXT NOT NULL, state TEXT NOT NULL, at REAL NOT NULL, undone INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX actions_of ON actions (labeller, item, id);
-- where each labeller stands on each prompt, kept in the same transaction as the action that changes it
CREATE TABLE progress (
    labeller TEXT NOT NULL, item INTEGER NOT NULL, status TEXT NOT NULL, last INTEGER NOT NULL,
    PRIMARY KEY (labeller, item)
);
CREATE INDEX progress_of_item ON progress (item, status);
-- per prompt: labellers done, and labellers done or on it now (who takes a prompt next: the fewest first)
CREATE TABLE counts (item INTEGER PRIMARY KEY, done INTEGER NOT NULL, claims INTEGER NOT NULL);
CREATE INDEX counts_by_claims ON counts (claims, item);
"""


class BadAction(ValueError):
    """A request the store refuses (unknown prompt, a state that is not a ranking of its answers): a 4xx."""


def db_path_for(batch: Path) -> Path:
    return batch.with_name(batch.name.removesuffix(".jsonl") + ".labels.db")


def _permutation(value, k: int) -> bool:
    """`value` lists each of 0 .. k-1 once, as whole numbers (not true/false)."""
    return (
        isinstance(value, list)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and sorted(value) == list(range(k))
    )


class Store:
    def __init__(self, path: Path, items: list[Item] | None = None, batch: Path | None = None, min_labels: int = 1):
        """Open the labels at `path`, creating them for `items` (the batch read from `batch`) if new. With `items`
        given, the database must hold labels of those very prompts and answers."""
        self.path, self.min_labels = Path(path), min_labels
        new = not self.path.exists()
        if new and items is None:
            raise DataError(f"{self.path}: no such labels database")
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
        except sqlite3.DatabaseError as e:  # not writable, or not a database at all
            raise DataError(
                f"{self.path}: cannot open or create the labels database ({e}); make {self.path.parent} writable, "
                "or give another place with --db (a file alignkit label made, or none yet)"
            ) from e
        if not new:
            try:
                new = not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone()
            except sqlite3.DatabaseError as e:
                raise DataError(
                    f"{self.path}: not a labels database ({e}); give --db a file alignkit label made, or a new name"
                ) from e
            if new and items is None:
                raise DataError(f"{self.path}: no labels in it (not a labels database alignkit label made)")
        self.lock = threading.Lock()
        if new:
            with self._write():
                # made by another process while this one waited for the lock (two started at once): opened as is
                if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
                    for statement in filter(str.strip, SCHEMA.split(";")):
                        self.db.execute(statement)
                    meta = {
                        "schema_version": str(SCHEMA_VERSION),
                        "batch": str(batch),
                        "batch_fingerprint": fingerprint(items),
                        "created": str(time.time()),
                    }
                    self.db.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
                    self.db.executemany("INSERT INTO counts VALUES (?, 0, 0)", [(n,) for n in range(len(items))])
                    self.db.executemany(
                        "INSERT INTO items VALUES (?, ?, ?, ?, ?)",
                        [
                            (n, i.line, json.dumps(i.prompt), json.dumps(i.responses), json.dumps(i.provenance))
                            for n, i in enumerate(items)
                        ],
                    )
        self.meta = dict(self.db.execute("SELECT key, value FROM meta"))
        if self.meta.get("schema_version") != str(SCHEMA_VERSION):
            raise DataError(
                f"{self.path}: labels database of schema version {self.meta.get('schema_version')}, this "
                f"alignkit reads version {SCHEMA_VERSION}; use the alignkit that made it, or move the file aside"
            )
        if items is not None and self.meta["batch_fingerprint"] != fingerprint(items):
            raise DataError(
                f"{self.path}: holds labels of other prompts or answers than {batch} has now (the batch changed after "
                "labelling began); restore the batch, or move the database aside to start over"
            )
        rows = self.db.execute("SELECT id, line, prompt, responses, provenance FROM items ORDER BY id").fetchall()
        self.items = [Item(line, json.loads(p), json.loads(r), json.loads(v)) for _, line, p, r, v in rows]

    def close(self) -> None:
        self.db.close()

    class _Tx:
        def __init__(self, store):
            self.store = store

        def __enter__(self):
            self.store.lock.acquire()
            try:
                self.store.db.execute("BEGIN IMMEDIATE")
            except BaseException:  # the database stayed locked by another process past the timeout: nothing begun
                self.store.lock.release()
                raise

        def __exit__(self, kind, value, tb):
            try:
                self.store.db.execute("COMMIT" if kind is None else "ROLLBACK")
            finally:
                self.store.lock.release()

    def _write(self):
        return Store._Tx(self)

    def _read(self, sql: str, args=()) -> list[tuple]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    # -- states --------------------------------------------------------------------------------------------------
    def initial(self, labeller: str, item: int) -> dict:
        """A fresh view: the answers in an order of this labeller's own (never the sampling order), unranked."""
        k = len(self.items[item].responses)
        seed = int.from_bytes(hashlib.sha256(f"{labeller}\0{item}".encode()).digest()[:8], "big")
        display = list(range(k))
        random.Random(seed).shuffle(display)
        return {"order": display, "ties": [False] * k, "thumbs": {}, "none": False, "text": "", "display": display}

    def check_state(self, item: int, state) -> dict:
        k = len(self.items[item].responses)
        if not isinstance(state, dict):
            raise BadAction("'state' must be an object")
        order, ties, thumbs = state.get("order"), state.get("ties"), state.get("thumbs", {})
        if not _permutation(order, k):
            raise BadAction(f"'state.order' must list each of the {k} answers once (0 to {k - 1}), best first")
        if not isinstance(ties, list) or len(ties) != k or not all(isinstance(t, bool) for t in ties) or ties[0]:
            raise BadAction(f"'state.ties' must be {k} true/false values, the first false")
        if not isinstance(thumbs, dict) or any(
            k_ not in {str(n) for n in range(k)} or v not in (1, -1) for k_, v in thumbs.items()
        ):
            raise BadAction("'state.thumbs' maps an answer's index (as text) to 1 (up) or -1 (down)")
        text = state.get("text", "")
        if not isinstance(text, str) or len(text) > MAX_TEXT:
            raise BadAction(f"'state.text' must be text of at most {MAX_TEXT} characters")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: no JSON answer or export file could hold it
            raise BadAction("'state.text' must be text (it holds a lone UTF-16 surrogate)") from None
        if not isinstance(state.get("none", False), bool):
            raise BadAction("'state.none' must be true or false")
        display = state.get("display")
        if not _permutation(display, k):
            raise BadAction("'state.display' must be the order the answers were shown in")
        return {
            "order": order,
            "ties": ties,
            "thumbs": thumbs,
            "none": state.get("none", False),
            "text": text,
            "display": display,
        }

    def _item(self, item) -> int:
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < len(self.items):
            raise BadAction(f"no prompt {item!r}: the batch has prompts 0 to {len(self.items) - 1}")
        return item

    # -- writes ----------------------------------------------------------------------------------------------------
    def _insert(self, labeller: str, item: int, kind: str, state: dict) -> int:
        cur = self.db.execute(
            "INSERT INTO actions (labeller, item, kind, state, at) VALUES (?, ?, ?, ?, ?)",
            (labeller, item, kind, json.dumps(state), time.time()),
        )
        self._progress(labeller, item)
        return cur.lastrowid

    def _progress(self, labeller: str, item: int) -> None:
        """Where the labeller stands on the prompt after its actions, and the prompt's counts to match."""
        rows = self.db.execute(
            "SELECT id, kind FROM actions WHERE labeller = ? AND item = ? AND undone = 0 ORDER BY id",
            (labeller, item),
        ).fetchall()
        old = self.db.execute(
            "SELECT status FROM progress WHERE labeller = ? AND item = ?", (labeller, item)
        ).fetchone()
        old, status = old[0] if old else None, None
        kinds = [k for _, k in rows]
        if not rows:
            self.db.execute("DELETE FROM progress WHERE labeller = ? AND item = ?", (labeller, item))
        else:
            if "submit" in kinds:
                status = "done"
            else:
                last = next((k for k in reversed(kinds) if k in ("skip", "reopen")), None)
                status = "skipped" if last == "skip" else "open"
            self.db.execute(
                "INSERT OR REPLACE INTO progress VALUES (?, ?, ?, ?)", (labeller, item, status, rows[-1][0])
            )
        if old != status:
            done = (status == "done") - (old == "done")
            claims = (status in ("done", "open")) - (old in ("done", "open"))
            self.db.execute(
                "UPDATE counts SET done = done + ?, claims = claims + ? WHERE item = ?", (done, claims, item)
            )

    def act(self, labeller: str, item, kind: str, state) -> int:
        """Store one action of a labeller (an edit of the view, a skip, a submit); returns its id once committed."""
        item = self._item(item)
        if kind not in KINDS:
            raise BadAction(f"unknown action {kind!r}; one of {', '.join(KINDS)}")
        state = self.check_state(item, state)
        if kind == "submit" and state["text"].strip() in self.items[item].responses:
            n = self.items[item].responses.index(state["text"].strip())
            raise BadAction(
                f"the answer written is answer {state['display'].index(n) + 1} as it stands; rank that one first "
                "instead, or change the text"
            )
        with self._write():
            return self._insert(labeller, item, kind, state)

    def draft(self, labeller: str, item: int) -> dict | None:
        row = self.db.execute(
            "SELECT state FROM actions WHERE labeller = ? AND item = ? AND undone = 0 ORDER BY id DESC LIMIT 1",
            (labeller, item),
        ).fetchone()
        return json.loads(row[0]) if row else None

    def open(self, labeller: str, item=None) -> dict | None:
        """The prompt `item` (coming back to one skipped or submitted), or the labeller's next one: the prompt they
        were on, else one they have not seen that the fewest others have done or are doing. None when none is left."""
        with self._write():
            if item is not None:
                item = self._item(item)
                draft = self.draft(labeller, item)
                self._insert(labeller, item, "reopen" if draft else "open", draft or self.initial(labeller, item))
                return self._view(labeller, item)
            row = self.db.execute(
                "SELECT item FROM progress WHERE labeller = ? AND status = 'open' ORDER BY last DESC LIMIT 1",
                (labeller,),
            ).fetchone()
            if row is None:
                row = self.db.execute(
                    """SELECT c.item FROM counts c INDEXED BY counts_by_claims
                       WHERE c.done < ?
                         AND NOT EXISTS (SELECT 1 FROM progress p WHERE p.labeller = ? AND p.item = c.item)
                       ORDER BY c.claims, c.item LIMIT 1""",
                    (self.min_labels, labeller),
                ).fetchone()
                if row is None:
                    return None
                self._insert(labeller, row[0], "open", self.initial(labeller, row[0]))
            return self._view(labeller, row[0])

    def undo(self, labeller: str) -> dict | None:
        """Undo the labeller's last edit, skip or submit: its prompt comes back as it was before. None if nothing is
        left to undo."""
        with self._write():
            row = self.db.execute(
                f"SELECT id, item, kind FROM actions WHERE labeller = ? AND undone = 0 AND kind IN "
                f"({', '.join('?' * len(KINDS))}) ORDER BY id DESC LIMIT 1",
                (labeller, *KINDS),
            ).fetchone()
            if row is None:
                return None
            action, item, kind = row
            self.db.execute("UPDATE actions SET undone = 1 WHERE id = ?", (action,))
            before = self.db.execute(
                "SELECT state FROM actions WHERE labeller = ? AND item = ? AND undone = 0 AND id < ? "
                "ORDER BY id DESC LIMIT 1",
                (labeller, item, action),
            ).fetchone()
            state = json.loads(before[0]) if before else self.initial(labeller, item)
            self._insert(labeller, item, "undo", state)
            return {**self._view(labeller, item), "undid": kind}

    # -- reads -----------------------------------------------------------------------------------------------------
    def _view(self, labeller: str, item: int) -> dict:
        status = self.db.execute(
            "SELECT status FROM progress WHERE labeller = ? AND item = ?", (labeller, item)
        ).fetchone()
        it = self.items[item]
        return {
            "item": item,
            "prompt": it.prompt,
            "responses": it.responses,
            "state": self.draft(labeller, item),
            "status": status[0] if status else "new",
        }

    def counters(self, labeller: str) -> dict:
        with self.lock:
            mine = dict(
                self.db.execute(
                    "SELECT status, count(*) FROM progress WHERE labeller = ? GROUP BY status", (labeller,)
                ).fetchall()
            )
            waiting, labels = self.db.execute(
                "SELECT coalesce(sum(done < ?), 0), coalesce(sum(done), 0) FROM counts", (self.min_labels,)
            ).fetchone()
            (seen,) = self.db.execute(
                "SELECT count(*) FROM progress p JOIN counts c ON c.item = p.item WHERE p.labeller = ? AND c.done < ?",
                (labeller, self.min_labels),
            ).fetchone()
        left, complete = waiting - seen, len(self.items) - waiting
        return {
            "done": mine.get("done", 0),
            "skipped": mine.get("skipped", 0),
            "open": mine.get("open", 0),
            "left": left + mine.get("open", 0),
            "complete": complete,
            "labels": labels,
            "total": len(self.items),
            "min_labels": self.min_labels,
        }

    def history(self, labeller: str) -> list[dict]:
        rows = self._read("SELECT item, status FROM progress WHERE labeller = ? ORDER BY last DESC", (labeller,))
        return [{"item": i, "status": s, "line": self.items[i].line} for i, s in rows]

    def labellers(self) -> list[str]:
        return [name for (name,) in self._read("SELECT DISTINCT labeller FROM progress ORDER BY labeller")]

    def submissions(self) -> list[dict]:
        """Each labeller's latest submitted state of each prompt they did, oldest first."""
        rows = self._read(
            """SELECT a.id, a.labeller, a.item, a.state, a.at FROM actions a
               WHERE a.kind = 'submit' AND a.undone = 0 AND a.id = (
                   SELECT max(b.id) FROM actions b
                   WHERE b.labeller = a.labeller AND b.item = a.item AND b.kind = 'submit' AND b.undone = 0)
               ORDER BY a.id"""
        )
        return [
            {"action": i, "labeller": who, "item": item, "state": json.loads(s), "at": at}
            for i, who, item, s, at in rows
        ]

    def drafts(self) -> list[dict]:
        """Every labeller's current state of every prompt they have seen (thumbs live there, whatever its status)."""
        rows = self._read(
            """SELECT a.labeller, a.item, a.state, a.at, p.status FROM progress p JOIN actions a ON a.id = p.last
               ORDER BY a.id"""
        )
        return [
            {"labeller": who, "item": item, "state": json.loads(s), "at": at, "status": status}
            for who, item, s, at, status in rows
        ]

    def action_ids(self) -> set[int]:
        return {i for (i,) in self._read("SELECT id FROM actions")}


def ranks_of(state: dict) -> list[int]:
    """The view's ranking as ranks per answer (1 = best; tied answers share the better rank, as 1, 2, 2, 4)."""
    ranks = [0] * len(state["order"])
    for pos, answer in enumerate(state["order"]):
        ranks[answer] = ranks[state["order"][pos - 1]] if pos and state["ties"][pos] else pos + 1
    return ranks
