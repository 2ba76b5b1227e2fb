"""The labelling web app (Starlette): the page, its JSON endpoints and a status page, over one Store.

Security: the page and the JSON it reads are served to loopback by default; bound anywhere else every request needs
the access token (from the URL printed at start, kept in a cookie). Every state-changing request needs the token in
a header and an Origin equal to the server's own, so another site open in the same browser cannot post. No request
names a file: the page's three files are read once at start."""

from __future__ import annotations

import html
import json
import logging
import re
import secrets
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .store import BadAction, Store

LOCAL = {"127.0.0.1", "localhost", "::1"}
NAME = re.compile(r"^[\w .@-]{1,64}$")
COOKIE = "alignkit_label_token"
log = logging.getLogger("alignkit.label")


def is_local(host: str) -> bool:
    return host in LOCAL


def page_file(name: str) -> str:
    return resources.files("alignkit.label").joinpath("page", name).read_text(encoding="utf-8")


def markdown(text: str) -> str:
    """A small, safe markdown: everything escaped first, then headings, lists, **bold**, *italics* and `code`."""
    out, items = [], []

    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
        s = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", s)
        return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", s)

    def flush():
        if items:
            out.append("<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>")
            items.clear()

    for block in re.split(r"\n\s*\n", text.strip()):
        for line in block.splitlines():
            if m := re.match(r"^\s*[-*]\s+(.*)", line):
                items.append(inline(m.group(1)))
                continue
            flush()
            if m := re.match(r"^(#{1,3})\s+(.*)", line):
                level = len(m.group(1)) + 1
                out.append(f"<h{level}>{inline(m.group(2))}</h{level}>")
            elif line.strip():
                out.append(f"<p>{inline(line)}</p>")
        flush()
    return "\n".join(out)


class Labelling:
    """The app's state: the store, who may post, what the page shows."""

    def __init__(
        self,
        store: Store,
        host: str,
        port: int,
        *,
        token: str | None = None,
        labeller: str = "",
        guidelines: str = "",
        judge=None,
    ):
        self.store, self.host, self.port = store, host, port
        self.token = token or secrets.token_urlsafe(24)
        self.labeller, self.guidelines, self.judge = labeller, guidelines, judge
        self.page = page_file("index.html")
        self.script, self.style = page_file("label.js"), page_file("label.css")

    # -- checks --------------------------------------------------------------------------------------------------
    def allowed_hosts(self) -> set[str]:
        port = f":{self.port}"
        return {"127.0.0.1" + port, "localhost" + port, "[::1]" + port}

    def check(self, request: Request, posting: bool) -> None:
        host = request.headers.get("host", "")
        if is_local(self.host) and host not in self.allowed_hosts():
            # a page of another site that resolves its own name to 127.0.0.1 (DNS rebinding) gets nothing
            raise HTTPException(403, f"this server answers to 127.0.0.1:{self.port} only, not {host!r}")
        given = (
            request.headers.get("x-alignkit-token") or request.cookies.get(COOKIE) or request.query_params.get("token")
        )
        if (posting or not is_local(self.host) or request.url.path.startswith("/api/")) and not secrets.compare_digest(
            (given or "").encode(), self.token.encode()
        ):
            raise HTTPException(403, "no access token, or the wrong one: open the URL alignkit label printed")
        if posting:
            if not secrets.compare_digest(
                (request.headers.get("x-alignkit-token") or "").encode(), self.token.encode()
            ):
                raise HTTPException(403, "a change needs the access token in the X-Alignkit-Token header")
            if request.headers.get("origin") != f"http://{host}":
                raise HTTPException(403, "a change must come from this server's own page (Origin differs)")

    @staticmethod
    def labeller_of(value) -> str:
        if not isinstance(value, str) or not NAME.match(value):
            raise HTTPException(400, "a labeller's name is 1 to 64 letters, digits, spaces or . _ @ -")
        return value

    # -- routes --------------------------------------------------------------------------------------------------
    async def index(self, request: Request) -> Response:
        self.check(request, posting=False)
        body = (
            self.page.replace("{{token}}", html.escape(self.token))
            .replace("{{labeller}}", html.escape(self.labeller))
            .replace("{{guidelines}}", self.guidelines)
            .replace("{{batch}}", html.escape(self.store.meta["batch"]))
        )
        response = HTMLResponse(body, headers=_headers())
        if request.query_params.get("token") == self.token:
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
        return response

    async def asset(self, request: Request) -> Response:
        self.check(request, posting=False)
        name = request.url.path.lstrip("/")
        body, kind = (self.script, "text/javascript") if name == "label.js" else (self.style, "text/css")
        return Response(body, media_type=kind, headers=_headers())

    async def next(self, request: Request) -> Response:
        self.check(request, posting=False)
        who = self.labeller_of(request.query_params.get("labeller"))
        item = request.query_params.get("item")
        if item is not None:
            if not (item.isascii() and item.isdigit() and len(item) <= 18):
                raise HTTPException(400, "'item' is a prompt's number")
            item = int(item)
        view = self.store.open(who, item)
        return JSONResponse({"view": view, "counters": self.store.counters(who)})

    async def counters(self, request: Request) -> Response:
        self.check(request, posting=False)
        return JSONResponse({"counters": self.store.counters(self.labeller_of(request.query_params.get("labeller")))})

    async def history(self, request: Request) -> Response:
        self.check(request, posting=False)
        who = self.labeller_of(request.query_params.get("labeller"))
        return JSONResponse({"items": self.store.history(who)})

    async def act(self, request: Request) -> Response:
        self.check(request, posting=True)
        body = await _json(request)
        who = self.labeller_of(body.get("labeller"))
        action = self.store.act(who, body.get("item"), body.get("kind"), body.get("state"))
        return JSONResponse({"action": action, "counters": self.store.counters(who)})

    async def undo(self, request: Request) -> Response:
        self.check(request, posting=True)
        body = await _json(request)
        who = self.labeller_of(body.get("labeller"))
        view = self.store.undo(who)
        return JSONResponse({"view": view, "counters": self.store.counters(who)})

    async def status_json(self, request: Request) -> Response:
        self.check(request, posting=False)
        return JSONResponse(self.status())

    def status(self) -> dict:
        from .export import agreement

        people = {who: self.store.counters(who) for who in self.store.labellers()}
        return {
            "batch": self.store.meta["batch"],
            "prompts": len(self.store.items),
            "min_labels": self.store.min_labels,
            "complete": self.store.counters("")["complete"],
            "labellers": {who: {k: c[k] for k in ("done", "skipped", "open")} for who, c in people.items()},
            "agreement": agreement(self.store, self.judge),
        }

    async def status_page(self, request: Request) -> Response:
        self.check(request, posting=False)
        s = self.status()
        rows = "".join(
            f"<tr><td>{html.escape(who)}</td><td>{c['done']}</td><td>{c['skipped']}</td><td>{c['open']}</td></tr>"
            for who, c in s["labellers"].items()
        )
        pairs = "".join(
            f"<tr><td>{html.escape(p['a'])} / {html.escape(p['b'])}</td><td>{p['prompts']}</td><td>{p['pairs']}</td>"
            f"<td>{_num(p['agreement'])}</td><td>{_num(p['kendall_tau'])}</td></tr>"
            for p in s["agreement"]["between"]
        ) + "".join(
            f"<tr><td>{html.escape(p['labeller'])} / judge</td><td>{p['prompts']}</td><td>{p['pairs']}</td>"
            f"<td>{_num(p['agreement'])}</td><td>{_num(p['kendall_tau'])}</td></tr>"
            for p in s["agreement"].get("judge", [])
        )
        body = (
            "<!doctype html><meta charset=utf-8><title>alignkit label: status</title>"
            f"<link rel=stylesheet href=label.css><main class=status><h1>Labelling status</h1>"
            f"<p>{html.escape(s['batch'])}: {s['complete']} of {s['prompts']} prompts done by "
            f"{s['min_labels']} labeller(s). <a href=/>Back to labelling</a></p>"
            "<h2>Labellers</h2><table><tr><th>labeller<th>done<th>skipped<th>open</tr>"
            f"{rows}</table><h2>Agreement</h2><table><tr><th>between<th>prompts<th>answer pairs<th>agreement"
            f"<th>Kendall's tau</tr>{pairs}</table></main>"
        )
        return HTMLResponse(body, headers=_headers())


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _headers() -> dict:
    # the page runs only its own script: an answer that holds markup could not run any even if it reached the DOM
    return {
        "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "cache-control": "no-store",
    }


async def _json(request: Request) -> dict:
    if len(await request.body()) > 200_000:
        raise HTTPException(413, "request too large")
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # (RecursionError: nested past Python's limit)
        raise HTTPException(400, "the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the request body must be a JSON object")
    return body


def app(labelling: Labelling) -> Starlette:
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=_headers())

    async def bad_action(request: Request, exc: BadAction) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=400, headers=_headers())

    async def our_bug(request: Request, exc: Exception) -> Response:
        log.exception("alignkit label: error on %s %s", request.method, request.url.path)  # the traceback: here only
        return JSONResponse({"error": "internal error (logged by the server)"}, status_code=500, headers=_headers())

    routes = [
        Route("/", labelling.index),
        Route("/label.js", labelling.asset),
        Route("/label.css", labelling.asset),
        Route("/status", labelling.status_page),
        Route("/favicon.ico", lambda request: Response(status_code=204)),
        Route("/api/next", labelling.next),
        Route("/api/history", labelling.history),
        Route("/api/counters", labelling.counters),
        Route("/api/status", labelling.status_json),
        Route("/api/action", labelling.act, methods=["POST"]),
        Route("/api/undo", labelling.undo, methods=["POST"]),
    ]
    return Starlette(
        routes=routes, exception_handlers={HTTPException: http_error, BadAction: bad_action, Exception: our_bug}
    )
