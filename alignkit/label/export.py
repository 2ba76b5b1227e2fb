"""What people labelled, in the stages' own formats: rankings (the reward stage's, ties kept), demonstrations (the
sft stage's), thumbs (prompt, completion, label: TRL's unpaired-preference format), each row with its provenance;
and how far labellers agree. The rounds read people's rankings through `rankings()`; the export writes the same."""

from __future__ import annotations

import datetime
import itertools
from pathlib import Path

from .. import files
from .batch import messages
from .store import Store, ranks_of


def _provenance(store: Store, item: int, who: str, at: float, state: dict) -> dict:
    it = store.items[item]
    return {
        **it.provenance,
        "labeller": who,
        "time": datetime.datetime.fromtimestamp(at, datetime.timezone.utc).isoformat(timespec="seconds"),
        "display_order": state["display"],
        "batch": store.meta["batch"],
        "batch_line": it.line,
        "none_acceptable": state["none"],
        "written": bool(state["text"].strip()),
    }


def rankings(store: Store) -> list[dict]:
    """One row per labeller and prompt submitted: the sampled answers and, where the labeller wrote a better one,
    that answer too, ranked first."""
    rows = []
    for sub in store.submissions():
        it, state = store.items[sub["item"]], sub["state"]
        responses, ranks = list(it.responses), ranks_of(state)
        if state["text"].strip():
            responses, ranks = [state["text"].strip(), *responses], [1, *(r + 1 for r in ranks)]
        rows.append(
            {
                "prompt": it.prompt,
                "responses": responses,
                "ranks": ranks,
                "provenance": _provenance(store, sub["item"], sub["labeller"], sub["at"], state),
            }
        )
    return rows


def demonstrations(store: Store) -> list[dict]:
    """The better answers people wrote, as conversations ending in that answer."""
    return [
        {
            "messages": [
                *messages(store.items[s["item"]].prompt),
                {"role": "assistant", "content": s["state"]["text"].strip()},
            ],
            "provenance": _provenance(store, s["item"], s["labeller"], s["at"], s["state"]),
        }
        for s in store.submissions()
        if s["state"]["text"].strip()
    ]


def thumbs(store: Store) -> list[dict]:
    """Each thumb up (label true) or down (false) given to an answer, submitted or not."""
    rows = []
    for d in store.drafts():
        it = store.items[d["item"]]
        for answer, up in sorted(d["state"]["thumbs"].items(), key=lambda kv: int(kv[0])):
            rows.append(
                {
                    "prompt": messages(it.prompt),
                    "completion": [{"role": "assistant", "content": it.responses[int(answer)]}],
                    "label": up == 1,
                    "provenance": _provenance(store, d["item"], d["labeller"], d["at"], d["state"]),
                }
            )
    return rows


def _pairs(ranks: list[int]) -> dict[tuple[int, int], int]:
    """For each pair of answers (a < b) the labeller ordered strictly: +1 if a is better, -1 if b is."""
    return {
        (a, b): (1 if ranks[a] < ranks[b] else -1)
        for a, b in itertools.combinations(range(len(ranks)), 2)
        if ranks[a] != ranks[b]
    }


def _tau_b(x: list[int], y: list[int]) -> float | None:
    """Kendall's tau-b of two rankings of the same answers (ties allowed); None where either is all ties."""
    conc = disc = tx = ty = 0
    for a, b in itertools.combinations(range(len(x)), 2):
        dx, dy = (x[a] > x[b]) - (x[a] < x[b]), (y[a] > y[b]) - (y[a] < y[b])
        if dx and dy:
            conc, disc = conc + (dx == dy), disc + (dx != dy)
        elif dx:
            ty += 1
        elif dy:
            tx += 1
    denominator = ((conc + disc + tx) * (conc + disc + ty)) ** 0.5
    return (conc - disc) / denominator if denominator else None


def _compare(a: dict[int, list[int]], b: dict[int, list[int]]) -> dict:
    shared = sorted(set(a) & set(b))
    agree = total = 0
    taus = []
    for item in shared:
        pa, pb = _pairs(a[item]), _pairs(b[item])
        both = set(pa) & set(pb)
        total += len(both)
        agree += sum(pa[p] == pb[p] for p in both)
        tau = _tau_b(a[item], b[item])
        if tau is not None:
            taus.append(tau)
    return {
        "prompts": len(shared),
        "pairs": total,
        "agreement": round(agree / total, 4) if total else None,
        "kendall_tau": round(sum(taus) / len(taus), 4) if taus else None,
    }


def agreement(store: Store, judge=None) -> dict:
    """Pairwise agreement (the share of answer pairs both ordered the same way, among those both ordered) and mean
    Kendall's tau-b, between every two labellers on the prompts both did, and of each labeller against `judge`
    (judge(prompt, answers) -> ranks) where one is given. Written answers are left out: only one labeller saw them."""
    by: dict[str, dict[int, list[int]]] = {}
    for sub in store.submissions():
        by.setdefault(sub["labeller"], {})[sub["item"]] = ranks_of(sub["state"])
    out = {
        "labellers": {who: len(items) for who, items in sorted(by.items())},
        "between": [{"a": a, "b": b, **_compare(by[a], by[b])} for a, b in itertools.combinations(sorted(by), 2)],
    }
    if judge is not None:
        wanted = sorted({i for items in by.values() for i in items})
        judged = {i: list(judge(store.items[i].prompt, list(store.items[i].responses))) for i in wanted}
        out["judge"] = [{"labeller": who, **_compare(items, judged)} for who, items in sorted(by.items())]
    return out


def write(store: Store, out: Path, judge=None) -> dict[str, int]:
    """The export folder: rankings.jsonl, demonstrations.jsonl, thumbs.jsonl and agreement.json, each replaced
    whole. Returns the rows written per file."""
    out.mkdir(parents=True, exist_ok=True)
    # one read transaction: every file from the same snapshot, though a server goes on writing to the database
    store.db.execute("BEGIN")
    try:
        made = {
            "rankings.jsonl": rankings(store),
            "demonstrations.jsonl": demonstrations(store),
            "thumbs.jsonl": thumbs(store),
        }
        agreed = agreement(store, judge)
    finally:
        store.db.execute("COMMIT")
    for name, rows in made.items():
        files.write_jsonl(out / name, rows)
    files.write_json(out / "agreement.json", agreed)
    return {name: len(rows) for name, rows in made.items()}
