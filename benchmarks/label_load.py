"""How fast does `alignkit label` answer many labellers at once? Starts the real server on 127.0.0.1 over a batch
of --prompts prompts, then --labellers simulated labellers (threads, each its own connection) each take a prompt,
make two edits (moves of the ranking), submit, and take the next, for --actions posts each or --seconds at most,
waiting --think seconds on average (uniform from 0 to twice that) between a labeller's posts. Prints p50/p99
latency of the posts (each one SQLite transaction) and of taking a prompt, and actions per second; every post is
checked to land (HTTP 200).

    python benchmarks/label_load.py [--labellers 50] [--actions 60] [--think 0.5]
    python benchmarks/label_load.py --think 0      # saturation: every labeller posting back to back
"""

import argparse
import http.client
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labellers", type=int, default=50)
    parser.add_argument("--actions", type=int, default=60, help="posts per labeller (bounded)")
    parser.add_argument("--seconds", type=float, default=120, help="time limit of the whole load")
    parser.add_argument("--think", type=float, default=0.5, help="seconds between one labeller's posts")
    parser.add_argument("--prompts", type=int, default=2000)
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="label-load-"))
    batch = folder / "samples.jsonl"
    batch.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": f"What is the capital of Land{i}?"}],
                    "responses": [f"The capital of Land{i} is City{j}." for j in range(4)],
                    "ranks": None,
                    "provenance": {},
                }
            )
            + "\n"
            for i in range(args.prompts)
        )
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "alignkit", "label", str(batch), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = re.search(r"open (http://\S+)", server.stdout.readline() + server.stdout.readline()).group(1)
        host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
        page = http.client.HTTPConnection(host, int(port))
        page.request("GET", "/")
        token = re.search(r'alignkit-token" content="([^"]+)"', page.getresponse().read().decode()).group(1)
        headers = {"X-Alignkit-Token": token, "Origin": f"http://{host}:{port}", "Content-Type": "application/json"}
        posts, opens, failures = [], [], []
        start, deadline = time.perf_counter(), time.perf_counter() + args.seconds

        def labeller(n: int) -> None:
            who = f"labeller{n}"
            conn = http.client.HTTPConnection(host, int(port), timeout=30)

            def call(method, path, body=None):
                t = time.perf_counter()
                conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
                r = conn.getresponse()
                data = json.loads(r.read())
                return r.status, data, time.perf_counter() - t

            status, data, took = call("GET", f"/api/next?labeller={who}")
            opens.append(took)
            view, made = data["view"], 0
            while made < args.actions and time.perf_counter() < deadline and view is not None:
                for kind in ("edit", "edit", "submit"):
                    time.sleep(random.uniform(0, 2 * args.think))  # not in step with the others
                    order = view["state"]["order"]
                    view["state"]["order"] = order[1:] + order[:1]
                    body = {"labeller": who, "item": view["item"], "kind": kind, "state": view["state"]}
                    status, data, took = call("POST", "/api/action", body)
                    (posts if status == 200 else failures).append(took)
                    made += 1
                status, data, took = call("GET", f"/api/next?labeller={who}")
                opens.append(took)
                view = data["view"]

        threads = [threading.Thread(target=labeller, args=(n,)) for n in range(args.labellers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(10)
    ms = lambda x: f"{1000 * x:.1f} ms"  # noqa: E731
    print(
        f"{args.labellers} labellers, think {args.think} s, {len(posts)} posts in {wall:.1f} s, {len(failures)} failed"
    )
    print(
        f"posts (one transaction each): p50 {ms(statistics.median(posts))}, p99 {ms(percentile(posts, 99))}, "
        f"max {ms(max(posts))}"
    )
    print(f"taking a prompt:              p50 {ms(statistics.median(opens))}, p99 {ms(percentile(opens, 99))}")
    print(f"actions per second: {len(posts) / wall:.1f}")


if __name__ == "__main__":
    main()
