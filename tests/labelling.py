"""Helpers for the labelling page's tests: a batch as `alignkit sample` writes it, the real `alignkit label` server
in a subprocess on 127.0.0.1 (stopped by the test), its JSON endpoints, and Debian's chromium through Playwright."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'


def make_batch(path: Path, prompts: int = 3, k: int = 4, xss: bool = False) -> Path:
    rows = []
    for i in range(prompts):
        answers = [f"The capital of Land{i} is City{j}." for j in range(k)]
        if xss and i == 0:
            answers[-1] = XSS
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is the capital of Land{i}?"}],
                "responses": answers,
                "ranks": None,
                "provenance": {"prompt": f"prompts.jsonl:{i + 1}", "k": k, "round": 2},
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@contextmanager
def server(target: Path, *args: str, host: str | None = None, port: str | None = "0"):
    """`alignkit label TARGET --port 0 ARGS` (with `port=None`, and no host, as README writes it: the defaults):
    yields (base URL, the URL it printed, the process); stopped after."""
    where = (["--port", port] if port is not None else []) + (["--host", host] if host is not None else [])
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignkit", "label", str(target), *where, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    try:
        printed, lines = None, []
        deadline = time.time() + 30
        while printed is None and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if m := re.search(r"open (http://\S+)", line):
                printed = m.group(1)
        assert printed, f"alignkit label did not start:\n{''.join(lines)}{proc.stdout.read() if proc.poll() else ''}"
        base = printed.split("?")[0].rstrip("/")
        yield base, printed, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def request(
    base: str,
    method: str,
    path: str,
    body=None,
    *,
    token: str | None = None,
    origin: str | None = "same",
    headers: dict | None = None,
    timeout: float = 10,
) -> tuple[int, dict | str]:
    """One HTTP request; returns (status, JSON or text). origin "same" sends the server's own Origin."""
    h = dict(headers or {})
    if token is not None:
        h["X-Alignkit-Token"] = token
    if origin is not None:
        h["Origin"] = base if origin == "same" else origin
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    req = urllib.request.Request(base + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read().decode()
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def token_of(base: str, url: str | None = None) -> str:
    status, page = request(base, "GET", (url or base + "/").removeprefix(base))
    assert status == 200, page
    return re.search(r'name="alignkit-token" content="([^"]+)"', page).group(1)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Debian's chromium is needed by the page's tests: apt-get install chromium (.ci/run does)"
    return path
