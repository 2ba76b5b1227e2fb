"""`alignkit label` without a browser: bad input refused before the server starts, every request checked (token,
origin, host, body), labellers at the same instant, --min-labels, the export (which trains as it is), agreement,
and a kill -9 that loses no acknowledged action. Through the real command, on 127.0.0.1."""

import http.client
import json
import os
import signal
import socket
import threading
import time

import pytest
from conftest import TINY, alignkit
from labelling import make_batch, request, server, token_of

from alignkit.label.batch import read
from alignkit.label.store import Store, db_path_for


def test_a_bad_batch_or_place_is_refused_before_the_server_starts(tmp_path, capsys):
    batch = make_batch(tmp_path / "batch.jsonl")
    lines = batch.read_text().splitlines()

    (tmp_path / "shape.jsonl").write_text(lines[0] + '\n{"text": "not a ranking"}\n')
    code, out, err = alignkit(capsys, "label", tmp_path / "shape.jsonl", "--port", "0")
    assert code == 2 and "Traceback" not in err
    assert (
        f"{tmp_path / 'shape.jsonl'}:2: not a row of alignkit sample's format: it needs 'prompt' and 'responses'"
        in err
    )

    (tmp_path / "cut.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    code, out, err = alignkit(capsys, "label", tmp_path / "cut.jsonl", "--port", "0")
    assert code == 2 and f"{tmp_path / 'cut.jsonl'}:3: not a JSON object" in err and "cut off" in err

    (tmp_path / "latin.jsonl").write_bytes(lines[0].encode() + b"\n" + "caf\xe9".encode("latin-1") + b"\n")
    code, out, err = alignkit(capsys, "label", tmp_path / "latin.jsonl", "--port", "0")
    assert code == 2 and f"{tmp_path / 'latin.jsonl'}:2: not UTF-8" in err

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, out, err = alignkit(capsys, "label", batch, "--port", port)
    assert code == 2 and f"port {port} on 127.0.0.1 is in use; give another with --port N" in err

    code, out, err = alignkit(capsys, "label", batch, "--db", "/proc/alignkit/labels.db")
    assert code == 2 and "/proc/alignkit: not writable" in err and "--db FILE" in err
    code, out, err = alignkit(capsys, "label", tmp_path / "none.jsonl")
    assert code == 2 and "none.jsonl: no such file or folder" in err
    code, out, err = alignkit(capsys, "label", batch, "--port", "70000")
    assert code == 2 and "--port 70000: give a port from 1 to 65535" in err
    code, out, err = alignkit(capsys, "label", batch, "--export", tmp_path / "cut.jsonl")
    assert code == 2 and "a file, not a folder; give a folder" in err
    code, out, err = alignkit(capsys, "label", batch, "--db", tmp_path / "latin.jsonl", "--export", tmp_path / "x")
    assert code == 2 and f"{tmp_path / 'latin.jsonl'}: cannot open or create the labels database" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()

    # labels of one batch are never read as labels of another
    assert not db_path_for(batch).exists()  # nothing above made a database
    Store(db_path_for(batch), read(batch), batch).close()
    make_batch(batch, prompts=4)
    code, out, err = alignkit(capsys, "label", batch, "--port", "0")
    assert code == 2 and "holds labels of other prompts or answers than" in err


def test_an_empty_database_file_is_made_a_labels_database_and_line_separators_inside_answers_are_text(
    tmp_path, capsys
):
    # an empty file (as a kill while the database was being made leaves it) is begun afresh; answers holding
    # U+2028, U+2029 or U+0085, which str.splitlines takes for line ends, are read as the text they are
    batch = make_batch(tmp_path / "batch.jsonl")
    rows = [json.loads(line) for line in batch.read_text().splitlines()]
    rows[0]["responses"][1] = "first\u2028second\u2029third\x85fourth"
    batch.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert "\u2028" in batch.read_text(encoding="utf-8")  # raw, as other tools write them
    (tmp_path / "empty.db").write_bytes(b"")
    code, out, err = alignkit(capsys, "label", batch, "--db", tmp_path / "empty.db", "--export", tmp_path / "out")
    assert code == 0, err
    assert read(batch)[0].responses[1] == rows[0]["responses"][1]
    # and what alignkit writes escapes them, so that any reader that splits lines so reads it whole
    from alignkit import files

    files.write_jsonl(tmp_path / "w.jsonl", rows)
    text = (tmp_path / "w.jsonl").read_text(encoding="utf-8")
    assert not {"\u2028", "\u2029", "\x85"} & set(text)
    assert [json.loads(line) for line in text.splitlines()] == rows


def test_two_servers_started_at_once_on_a_new_database_both_open_it(tmp_path):
    import sqlite3

    # both find no labels database and wait for the write lock (held here by a third connection, as the first
    # of two processes would hold it while it makes the tables); before, the second then failed with "table meta
    # already exists"
    batch = make_batch(tmp_path / "batch.jsonl")
    items, path = read(batch), db_path_for(batch)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")  # as the first process sets it before it takes the lock
    holder.execute("BEGIN IMMEDIATE")
    opened, failed = [], []

    def start():
        try:
            opened.append(Store(path, items, batch))
        except Exception as e:  # noqa: BLE001 (what failed is the assert's message)
            failed.append(repr(e))

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # both have looked for the tables and wait on the lock (10 s timeout)
    assert not opened and not failed
    holder.execute("ROLLBACK")
    holder.close()
    for thread in threads:
        thread.join()
    assert not failed and len(opened) == 2
    assert [s.items for s in opened] == [items, items]
    assert opened[0].act("ann", 0, "edit", opened[0].initial("ann", 0)) > 0
    assert opened[1].meta == opened[0].meta  # one database, made once
    for store in opened:
        store.close()


def test_a_write_that_times_out_on_a_locked_database_leaves_the_store_usable(tmp_path):
    import sqlite3

    batch = make_batch(tmp_path / "batch.jsonl")
    store = Store(db_path_for(batch), read(batch), batch)
    store.db.execute("PRAGMA busy_timeout = 100")
    other = sqlite3.connect(db_path_for(batch), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock past the timeout
    state = store.initial("ann", 0)
    with pytest.raises(sqlite3.OperationalError):
        store.act("ann", 0, "edit", state)
    assert not store.lock.locked()  # before: held for good, and every later request waited on it forever
    other.execute("ROLLBACK")
    other.close()
    assert store.act("ann", 0, "edit", state) > 0
    store.close()


def test_an_export_reads_one_snapshot_while_a_server_goes_on_writing(tmp_path, monkeypatch):
    from alignkit.label import export

    batch = make_batch(tmp_path / "batch.jsonl")
    mine, server_side = (Store(db_path_for(batch), read(batch), batch) for _ in range(2))
    first = server_side.initial("ann", 0)
    server_side.act("ann", 0, "submit", {**first, "text": "A better answer."})
    original = export.rankings

    def rankings_then_a_submission(store):
        rows = original(store)
        state = server_side.initial("bob", 1)  # lands between the rankings and the demonstrations being read
        server_side.act("bob", 1, "submit", {**state, "text": "Another better answer."})
        return rows

    monkeypatch.setattr(export, "rankings", rankings_then_a_submission)
    made = export.write(mine, tmp_path / "out")
    assert made["rankings.jsonl"] == made["demonstrations.jsonl"] == 1  # the same snapshot: ann's alone
    mine.close()
    server_side.close()


def test_every_request_is_checked_and_a_bad_one_gets_a_4xx(tmp_path):
    batch = make_batch(tmp_path / "batch.jsonl")
    with server(batch) as (base, url, proc):
        token = token_of(base)
        status, body = request(base, "GET", "/api/next?labeller=ann")
        assert status == 403 and "access token" in body["error"]
        status, view = request(base, "GET", "/api/next?labeller=ann", token=token)
        assert status == 200 and view["view"]["item"] == 0
        state = view["view"]["state"]
        action = {"labeller": "ann", "item": 0, "kind": "edit", "state": state}

        assert request(base, "POST", "/api/action", action)[0] == 403  # no token
        status, body = request(base, "POST", "/api/action", action, token=token, origin="http://evil.example")
        assert status == 403 and "Origin" in body["error"]
        status, body = request(base, "POST", "/api/action", action, token=token, origin=None)
        assert status == 403
        port = base.rsplit(":", 1)[1]
        status, body = request(base, "GET", "/", headers={"Host": f"evil.example:{port}"})
        assert status == 403 and "127.0.0.1" in body["error"]  # a rebound DNS name reaches nothing

        bad = [
            (b"{not json", "JSON object"),
            ({**action, "state": {**state, "order": state["order"][:-1]}}, "'state.order' must list each of the 4"),
            ({**action, "state": {**state, "ties": [True, False, False, False]}}, "'state.ties'"),
            ({**action, "state": {**state, "thumbs": {"7": 1}}}, "'state.thumbs'"),
            ({**action, "item": 99}, "no prompt 99: the batch has prompts 0 to 2"),
            ({**action, "kind": "delete"}, "unknown action 'delete'"),
            ({**action, "labeller": "<b>"}, "a labeller's name"),
            ({**action, "kind": "submit", "state": {**state, "text": "The capital of Land0 is City2."}}, "rank that"),
            # states that the status page, the export and a round could not read back: refused, never stored
            ({**action, "kind": "submit", "state": {**state, "order": [*state["order"], "x"]}}, "'state.order'"),
            (
                {**action, "state": {**state, "order": [True if o == 1 else o for o in state["order"]]}},
                "'state.order'",
            ),
            ({**action, "state": {**state, "display": [*state["display"], None]}}, "'state.display'"),
            ({**action, "state": {**state, "text": "\ud800"}}, "lone UTF-16 surrogate"),
            (b"[" * 100_000, "JSON object"),  # nested past Python's limit
        ]
        for body, message in bad:
            status, answer = request(base, "POST", "/api/action", body, token=token)
            assert status == 400 and message in answer["error"], (body, answer)
        for item in ("x", "%C2%B2", "9" * 5000):  # a superscript two is a digit to str.isdigit, not to int()
            assert request(base, "GET", f"/api/next?labeller=ann&item={item}", token=token)[0] == 400
        assert request(base, "GET", "/api/status", token=token)[0] == 200
        assert request(base, "GET", "/nowhere/../../etc/passwd", token=token)[0] == 404
        status, ok = request(base, "POST", "/api/action", action, token=token)
        assert status == 200 and ok["action"] > 0  # still serving, and a good request lands
    output = proc.stdout.read()
    assert "Traceback" not in output and "error" not in output.lower()


def test_labellers_at_the_same_instant_each_prompt_until_min_labels(tmp_path):
    batch = make_batch(tmp_path / "batch.jsonl", prompts=2)
    with server(batch, "--min-labels", "2") as (base, url, proc):
        token = token_of(base)

        def next_(who):
            return request(base, "GET", f"/api/next?labeller={who}", token=token)[1]

        seen = {"ann": [], "bob": []}
        for _ in range(2):
            views = {who: next_(who)["view"] for who in seen}
            assert views["ann"]["item"] != views["bob"]["item"]  # each on a prompt the other is not doing
            assert next_("ann")["view"]["item"] == views["ann"]["item"]  # a reload gives the same prompt back
            results, barrier = {}, threading.Barrier(2)

            def submit(who):
                body = {"labeller": who, "item": views[who]["item"], "kind": "submit", "state": views[who]["state"]}
                barrier.wait()
                results[who] = request(base, "POST", "/api/action", body, token=token)

            threads = [threading.Thread(target=submit, args=(who,)) for who in seen]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert [results[w][0] for w in seen] == [200, 200]  # both land
            for who in seen:
                seen[who].append(views[who]["item"])
        assert sorted(seen["ann"]) == sorted(seen["bob"]) == [0, 1]  # each prompt to each, none twice
        last = next_("ann")
        assert last["view"] is None and last["counters"]["complete"] == 2 and last["counters"]["labels"] == 4
        status, polled = request(base, "GET", "/api/counters?labeller=bob", token=token)
        assert status == 200 and polled["counters"]["done"] == 2 and polled["counters"]["complete"] == 2
    store = Store(db_path_for(batch))  # the counts kept beside each action agree with where everyone stands
    try:
        kept = store.db.execute("SELECT item, done, claims FROM counts ORDER BY item").fetchall()
        stands = store.db.execute("SELECT item, status FROM progress").fetchall()
    finally:
        store.close()
    assert (
        kept
        == [
            (i, sum(s == "done" for j, s in stands if j == i), sum(s in ("done", "open") for j, s in stands if j == i))
            for i in range(2)
        ]
        == [(0, 2, 2), (1, 2, 2)]
    )


def submit(base, token, who, item, order, ties=(), thumbs=None, text="", none=False):
    view = request(base, "GET", f"/api/next?labeller={who}&item={item}", token=token)[1]["view"]
    k = len(view["responses"])
    state = {
        **view["state"],
        "order": list(order),
        "ties": [pos in ties for pos in range(k)],
        "thumbs": thumbs or {},
        "text": text,
        "none": none,
    }
    status, body = request(
        base, "POST", "/api/action", {"labeller": who, "item": item, "kind": "submit", "state": state}, token=token
    )
    assert status == 200, body


def test_the_export_trains_as_it_is_and_says_how_far_labellers_agree(tmp_path, capsys):
    batch = make_batch(tmp_path / "batch.jsonl", prompts=2)
    judge = tmp_path / "judge.py"
    judge.write_text("def rank(prompt, answers):\n    return [1, 2, 3, 4]\n")
    with server(batch) as (base, url, proc):
        token = token_of(base)
        # prompt 0: ann 0 > 1 = 2 > 3 and a better answer of her own; bob 1 > 0 > 2 > 3
        submit(base, token, "ann", 0, [0, 1, 2, 3], ties={2}, thumbs={"3": -1, "0": 1}, text="Land0's capital: X.")
        submit(base, token, "bob", 0, [1, 0, 2, 3])
        # prompt 1: ann alone, none acceptable
        submit(base, token, "ann", 1, [3, 2, 1, 0], none=True)
    out = tmp_path / "export"
    code, stdout, err = alignkit(capsys, "label", batch, "--export", out)  # without a judge: labellers alone
    assert code == 0, err
    assert "judge" not in json.loads((out / "agreement.json").read_text())
    code, stdout, err = alignkit(capsys, "label", batch, "--export", out, "--judge", f"{judge}:rank")
    assert code == 0, err
    assert "3 rankings.jsonl, 1 demonstrations.jsonl, 2 thumbs.jsonl" in stdout
    rankings = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    assert [(r["provenance"]["labeller"], r["provenance"]["batch_line"]) for r in rankings] == [
        ("ann", 1),
        ("bob", 1),
        ("ann", 2),
    ]
    ann0 = rankings[0]
    assert ann0["responses"][0] == "Land0's capital: X." and ann0["ranks"] == [1, 2, 3, 3, 5]
    assert rankings[1]["ranks"] == [2, 1, 3, 4] and rankings[2]["ranks"] == [4, 3, 2, 1]
    assert rankings[2]["provenance"]["none_acceptable"] and not ann0["provenance"]["none_acceptable"]
    assert ann0["provenance"]["round"] == 2 and ann0["provenance"]["written"]  # the batch's provenance, and more
    assert sorted(ann0["provenance"]["display_order"]) == [0, 1, 2, 3] and "time" in ann0["provenance"]
    demo = json.loads((out / "demonstrations.jsonl").read_text())
    assert demo["messages"][-1] == {"role": "assistant", "content": "Land0's capital: X."}
    thumbs = [json.loads(line) for line in (out / "thumbs.jsonl").read_text().splitlines()]
    assert [(t["completion"][0]["content"][-6:], t["label"]) for t in thumbs] == [("City0.", True), ("City3.", False)]

    # by hand, prompt 0: ann orders 5 of the 6 pairs (1 = 2 ties), bob all 6; they disagree on (0, 1) alone: 4 of 5.
    # Kendall's tau-b: concordant 4, discordant 1, ann's tie 1 -> (4 - 1) / sqrt(5 * 6)
    agreement = json.loads((out / "agreement.json").read_text())
    assert agreement["labellers"] == {"ann": 2, "bob": 1}
    (between,) = agreement["between"]
    assert between["prompts"] == 1 and between["pairs"] == 5 and between["agreement"] == 0.8
    assert between["kendall_tau"] == pytest.approx(3 / 30**0.5, abs=1e-4)
    # against the judge's 1 > 2 > 3 > 4: bob 5 of 6 pairs; ann 5 of 5 on prompt 0 and 0 of 6 on prompt 1
    judged = {j["labeller"]: j for j in agreement["judge"]}
    assert judged["bob"]["agreement"] == pytest.approx(5 / 6, abs=1e-4)
    assert judged["ann"]["pairs"] == 11 and judged["ann"]["agreement"] == pytest.approx(5 / 11, abs=1e-4)

    # the files train as they are: a recipe naming them validates (every row read)
    code, stdout, err = alignkit(
        capsys,
        "validate",
        TINY,
        f"stages.sft.dataset.path={out / 'demonstrations.jsonl'}",
        f"stages.reward.dataset.path={out / 'rankings.jsonl'}",
    )
    assert code == 0, err


def test_a_kill_9_loses_no_acknowledged_action_and_the_restart_resumes(tmp_path):
    batch = make_batch(tmp_path / "batch.jsonl", prompts=8)
    acknowledged, stop = [], threading.Event()
    with server(batch) as (base, url, proc):
        token = token_of(base)
        views = {f"l{n}": request(base, "GET", f"/api/next?labeller=l{n}", token=token)[1]["view"] for n in range(4)}

        def labeller(who):
            view, deadline = views[who], time.time() + 20
            for n in range(500):  # bounded in count and in time
                if stop.is_set() or time.time() > deadline:
                    return
                order = view["state"]["order"]
                order = order[1:] + order[:1]
                view["state"] = {**view["state"], "order": order, "text": f"draft {n}"}
                body = {"labeller": who, "item": view["item"], "kind": "edit", "state": view["state"]}
                try:
                    status, answer = request(base, "POST", "/api/action", body, token=token, timeout=5)
                except (OSError, http.client.HTTPException):
                    return  # the server is gone (an answer cut off was not acknowledged)
                if status == 200:
                    acknowledged.append((answer["action"], who, n))

        threads = [threading.Thread(target=labeller, args=(who,)) for who in views]
        for t in threads:
            t.start()
        while len(acknowledged) < 40:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of the labellers' posts
        proc.wait()
        for t in threads:
            t.join()
    assert len(acknowledged) >= 40
    stored = Store(db_path_for(batch))
    try:
        assert {a for a, _, _ in acknowledged} <= stored.action_ids()
        last = {who: max((n for _, w, n in acknowledged if w == who), default=None) for who in views}
    finally:
        stored.close()
    with server(batch) as (base, url, proc):  # restarted: each labeller is back on their prompt and draft
        token = token_of(base)
        for who, view in views.items():
            again = request(base, "GET", f"/api/next?labeller={who}", token=token)[1]["view"]
            assert again["item"] == view["item"]
            if last[who] is not None:
                assert int(again["state"]["text"].split()[1]) >= last[who]
