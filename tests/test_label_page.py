"""The labelling page in a real browser (Debian's chromium through Playwright), through the real `alignkit label`
server: rank by keys and by drag, a tie, none acceptable, thumbs, a better answer written; skip and come back, undo,
reload; text typed just before the tab closes; a next prompt that fails to load after a stored submit; two labellers
at once; model text shown as text; the token on another host."""

import os
import shutil
from pathlib import Path

import pytest
from labelling import REPO, XSS, chromium, make_batch, request, server

from alignkit.label import export
from alignkit.label.store import Store, db_path_for

playwright = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' installs playwright")


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    # the page's Content-Security-Policy would refuse Playwright's own injected waits; bypassed, the test also shows
    # that the page is safe without it (model text never reaches the DOM as markup)
    context = browser.new_context(viewport={"width": 1000, "height": 900}, bypass_csp=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(e))
    page.on("dialog", lambda d: errors.append(f"dialog: {d.message}"))
    yield page
    context.close()
    assert not errors, errors


def texts(page) -> list[str]:
    return page.locator("#answers .text").all_inner_texts()


def ranks(page) -> list[str]:
    return page.locator("#answers .rank").all_inner_texts()


def key_of(page, text: str) -> str:
    return page.locator("#answers li", has_text=text).get_attribute("data-key")


def saved(page):
    """Wait until every post the page made has been answered (no request for half a second)."""
    page.wait_for_load_state("networkidle")


def stored(batch: Path) -> list[dict]:
    store = Store(db_path_for(batch))
    try:
        return export.rankings(store)
    finally:
        store.close()


def test_rank_by_keys_and_drag_tie_none_thumbs_and_a_better_answer(page, tmp_path):
    batch = make_batch(tmp_path / "batch.jsonl", prompts=2, k=4)
    with server(batch, "--labeller", "ann") as (base, url, proc):
        page.goto(url)
        page.wait_for_selector("#answers li")
        assert page.locator("#conversation").inner_text().endswith("What is the capital of Land0?")
        shown = texts(page)
        assert sorted(shown) == sorted(f"The capital of Land0 is City{j}." for j in range(4))
        # the order shown is the labeller's own, never the sampling order
        assert shown != [f"The capital of Land0 is City{j}." for j in range(4)]

        # keys: City2 to the top (its number, then up arrows)
        page.keyboard.press(key_of(page, "City2."))
        for _ in range(3):
            page.keyboard.press("ArrowUp")
        assert texts(page)[0].endswith("City2.")
        # drag: City0 onto the second place
        page.locator("#answers li", has_text="City0.").drag_to(page.locator("#answers li").nth(1))
        assert texts(page)[:2] == ["The capital of Land0 is City2.", "The capital of Land0 is City0."]
        # drag down: the top answer onto the last place, then back up by keys
        page.locator("#answers li").nth(0).drag_to(page.locator("#answers li").nth(3))
        assert texts(page)[3].endswith("City2.")
        page.keyboard.press(key_of(page, "City2."))
        for _ in range(3):
            page.keyboard.press("ArrowUp")
        order = texts(page)
        assert order[0].endswith("City2.") and order[1].endswith("City0.")
        # a tie: the fourth with the third
        page.keyboard.press(key_of(page, order[3][-6:]))
        page.keyboard.press("t")
        assert ranks(page) == ["1", "2", "3", "=3"]
        # thumbs: up on the best by key, down on the last by its button
        page.keyboard.press(key_of(page, "City2."))
        page.keyboard.press("+")
        page.locator("#answers li").nth(3).locator("button.down").click()
        # none acceptable, and a better answer
        page.keyboard.press("n")
        assert page.locator("#none").is_checked()
        page.keyboard.press("w")
        page.keyboard.type("The capital of Land0 is Zed.")
        page.keyboard.press("Escape")
        shot = tmp_path / "label.png"
        page.screenshot(path=shot, full_page=True)
        if os.environ.get("ALIGNKIT_SCREENSHOTS"):  # README's picture: ALIGNKIT_SCREENSHOTS=1 pytest -k drag
            shutil.copy(shot, REPO / "docs" / "img" / "label.png")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('#conversation').innerText.includes('Land1')")
        assert "Submitted." in page.locator("#message").inner_text()
        assert "You: 1 done, 1 left" in page.locator("#counter").inner_text()

    (row,) = stored(batch)
    answers = row["responses"]
    assert answers[0] == "The capital of Land0 is Zed." and row["ranks"][0] == 1  # written: ranked first
    by_text = dict(zip(answers, row["ranks"]))
    assert [by_text[t] for t in order] == [2, 3, 4, 4]  # the page's order, the tie kept, below the written one
    assert row["provenance"]["none_acceptable"] and row["provenance"]["labeller"] == "ann"
    store = Store(db_path_for(batch))
    try:
        thumbs = {(t["completion"][0]["content"], t["label"]) for t in export.thumbs(store)}
        assert thumbs == {(order[0], True), (order[3], False)}
        assert [d["messages"][-1]["content"] for d in export.demonstrations(store)] == ["The capital of Land0 is Zed."]
    finally:
        store.close()


def test_a_tie_ends_when_its_answer_reaches_the_top_and_does_not_come_back(page, tmp_path):
    batch = make_batch(tmp_path / "batch.jsonl", prompts=1, k=4)
    with server(batch, "--labeller", "ann") as (base, url, proc):
        page.goto(url)
        page.wait_for_selector("#answers li")
        a, b, c, d = texts(page)
        page.keyboard.press(key_of(page, b[-6:]))
        page.keyboard.press("t")  # B tied with A
        assert ranks(page) == ["1", "=1", "3", "4"]
        page.keyboard.press(key_of(page, a[-6:]))
        page.keyboard.press("ArrowDown")  # A below B: B is first, with nothing to be tied with
        assert texts(page) == [b, a, c, d] and ranks(page) == ["1", "2", "3", "4"]
        page.keyboard.press(key_of(page, d[-6:]))
        for _ in range(3):
            page.keyboard.press("ArrowUp")  # D to the top: B is second again, and not tied with D
        assert texts(page) == [d, b, a, c] and ranks(page) == ["1", "2", "3", "4"]
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('#message').innerText.includes('Submitted')")
        saved(page)
    (row,) = stored(batch)
    assert [dict(zip(row["responses"], row["ranks"]))[t] for t in (d, b, a, c)] == [1, 2, 3, 4]


def test_skip_keeps_the_draft_undo_and_a_reload_resumes(page, tmp_path):
    batch = make_batch(tmp_path / "batch.jsonl", prompts=3)
    with server(batch) as (base, url, proc):
        page.goto(url + "?labeller=bea")
        page.wait_for_selector("#answers li")
        page.keyboard.press("4")
        page.keyboard.press("ArrowUp")
        before_skip = texts(page)
        page.keyboard.press("w")
        page.keyboard.type("half an answer")
        page.keyboard.press("Escape")
        page.keyboard.press("s")
        page.wait_for_function("document.querySelector('#conversation').innerText.includes('Land1')")
        assert "draft is kept" in page.locator("#message").inner_text()
        assert page.locator("#write").input_value() == ""

        # come back to the skipped prompt: its order and its text are as they were
        page.keyboard.press("h")
        page.locator("#history-list button", has_text="Prompt 1").click()
        page.wait_for_function("document.querySelector('#conversation').innerText.includes('Land0')")
        assert texts(page) == before_skip and page.locator("#write").input_value() == "half an answer"

        # undo a move
        page.keyboard.press("1")
        page.keyboard.press("ArrowDown")
        assert texts(page) != before_skip
        page.keyboard.press("z")
        page.wait_for_function("document.querySelector('#message').innerText.startsWith('Undone')")
        assert texts(page) == before_skip

        # undo a submit: the prompt comes back, and it is no longer counted as done
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('#conversation').innerText.includes('Land1')")
        page.keyboard.press("z")
        page.wait_for_function("document.querySelector('#message').innerText.includes('your last submit')")
        assert "Land0" in page.locator("#conversation").inner_text() and texts(page) == before_skip
        assert "You: 0 done" in page.locator("#counter").inner_text()
        assert stored(batch) == []

        # a reload comes back to the same prompt, same order, same draft
        page.keyboard.press("2")
        page.keyboard.press("ArrowUp")
        now = texts(page)
        saved(page)
        page.reload()
        page.wait_for_selector("#answers li")
        assert "Land0" in page.locator("#conversation").inner_text()
        assert texts(page) == now and page.locator("#write").input_value() == "half an answer"


def test_two_labellers_at_once_each_get_their_own_prompt_and_order(browser, tmp_path):
    batch = make_batch(tmp_path / "batch.jsonl", prompts=2)
    with server(batch, "--min-labels", "2") as (base, url, proc):
        pages = {}
        for who in ("ann", "bob"):
            pages[who] = browser.new_context(bypass_csp=True).new_page()
            pages[who].goto(f"{url}?labeller={who}")
        for p in pages.values():
            p.wait_for_selector("#answers li")
        first = {who: p.locator("#conversation").inner_text() for who, p in pages.items()}
        assert first["ann"] != first["bob"]  # nobody waits on the other's prompt
        seen = {who: {} for who in pages}
        for _ in range(2):
            for who, p in pages.items():
                seen[who][p.locator("#conversation").inner_text()] = texts(p)
                p.keyboard.press("Enter")
            for p in pages.values():
                p.wait_for_function("document.querySelector('#message').innerText.startsWith('Submitted')")
                p.locator("#message").evaluate("m => m.textContent = ''")
        for p in pages.values():
            p.wait_for_selector("#finished:not([hidden])")
            assert "You: 2 done, 0 left" in p.locator("#counter").inner_text()
        for p in pages.values():  # each page learns of the other's last submit by itself (it looks every 5 s)
            p.wait_for_function(
                "document.querySelector('#counter').innerText.includes('All: 2 of 2 prompts done (2 labellers each)')",
                timeout=12_000,
            )
        assert seen["ann"].keys() == seen["bob"].keys()  # each prompt to each, once
        assert any(seen["ann"][k] != seen["bob"][k] for k in seen["ann"])  # each their own order
        rows = stored(batch)
        assert sorted((r["provenance"]["labeller"], r["provenance"]["batch_line"]) for r in rows) == [
            ("ann", 1),
            ("ann", 2),
            ("bob", 1),
            ("bob", 2),
        ]
        status, body = request(base, "GET", "/status")
        assert status == 200 and "ann / bob" in body
        for p in pages.values():
            p.context.close()


def test_model_and_labeller_text_is_shown_as_text_never_run(page, tmp_path):
    batch = make_batch(tmp_path / "batch.jsonl", prompts=1, xss=True)
    with server(batch, port=None) as (base, url, proc):  # no --host, no --port: as README runs it
        assert base == "http://127.0.0.1:8765"
        page.goto(url + "?labeller=cat")
        page.wait_for_selector("#answers li")
        assert XSS in texts(page)  # shown literally
        status, headers = page.request.get(url).status, page.request.get(url).headers
        assert status == 200 and "script-src 'self'" in headers["content-security-policy"]  # and a second wall
        assert page.evaluate("window.__xss") is None and page.locator("#answers img").count() == 0
        page.keyboard.press("w")
        page.keyboard.type('<img src=x onerror="window.__xss = 3">')
        page.keyboard.press("Escape")
        page.keyboard.press("Enter")
        page.wait_for_selector("#finished:not([hidden])")
        page.keyboard.press("h")
        page.locator("#history-list button").first.click()
        page.wait_for_selector("#answers li")
        assert page.locator("#write").input_value() == '<img src=x onerror="window.__xss = 3">'
        assert page.evaluate("window.__xss") is None


def test_a_server_on_another_host_lets_in_only_the_url_with_its_token(page, tmp_path):
    batch = make_batch(tmp_path / "batch.jsonl", prompts=1)
    with server(batch, host="127.0.0.2") as (base, url, proc):  # not 127.0.0.1: the token is required
        assert "?token=" in url and base.startswith("http://127.0.0.2:")
        status, body = request(base, "GET", "/")
        assert status == 403 and "access token" in body["error"]
        assert request(base, "GET", "/api/status")[0] == 403
        assert request(base, "GET", "/?token=wrong")[0] == 403
        page.goto(base + "/")
        assert "access token" in page.locator("body").inner_text()
        page.goto(url + "&labeller=dan")
        page.wait_for_selector("#answers li")
        assert "token" not in page.url  # kept in a cookie, not in the address bar
        page.keyboard.press("Enter")
        page.wait_for_selector("#finished:not([hidden])")
        page.reload()  # the cookie lets the page in again
        page.wait_for_selector("#finished:not([hidden])")
    assert [r["provenance"]["labeller"] for r in stored(batch)] == ["dan"]


def test_text_typed_just_before_the_page_goes_is_kept(browser, tmp_path):
    # the draft's save waits 0.4 s after the last key; a tab closed before then sends it as the page goes (its
    # pagehide handler: without it, this fails at once)
    batch = make_batch(tmp_path / "batch.jsonl", prompts=3)
    with server(batch) as (base, url, proc):
        context = browser.new_context(bypass_csp=True)
        try:
            for attempt in range(5):
                page = context.new_page()
                page.goto(url + "?labeller=eve")
                page.wait_for_selector("#answers li")
                assert page.locator("#write").input_value() == "".join(f" typed {n}" for n in range(attempt))
                page.keyboard.press("w")
                page.keyboard.type(f" typed {attempt}")
                page.close(run_before_unload=True)
        finally:
            context.close()


def test_a_submit_stored_then_a_next_prompt_that_fails_to_load_says_it_was_submitted(page, tmp_path):
    batch = make_batch(tmp_path / "batch.jsonl", prompts=3)
    with server(batch) as (base, url, proc):
        page.goto(url + "?labeller=fay")
        page.wait_for_selector("#answers li")
        page.route("**/api/next*", lambda route: route.fulfill(status=503, body='{"error": "server busy"}'))
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('#message').innerText.includes('did not load')")
        message = page.locator("#message").inner_text()
        assert message.startswith("Submitted.") and "server busy" in message and "reload the page" in message
        assert "Not submitted" not in message  # before: it said so of a submit the server had stored
        assert len(stored(batch)) == 1
