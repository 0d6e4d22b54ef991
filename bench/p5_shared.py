"""P5b: an upstream shared with interactive traffic. The upstream works on 32 requests at a time (50 ms each) and
queues the rest, as an inference server at capacity does. A few interactive users each send one request at a time
while a batch runs; their latency is measured with batchyard at `--concurrency auto` and at a hand-set 256 (a
"fill the GPU" setting), against their latency with no batch running.

    python bench/p5_shared.py [--slots 32] [--delay 0.05] [--lines 6000] [--users 4]
        [--settings 256,auto] [--users-via engine|batchyard]

`--settings`: batchyard's `--concurrency` values, each optionally with its `--online-priority` (`256:slots`).
`--users-via batchyard`: the users send their requests through batchyard's front door (the server running the
batch) instead of straight to the upstream, so batch lines yield to them (docs/priority.md); the fake upstream
stops working on a request whose client went away, as vLLM does.

What good looks like: `auto` keeps the interactive latency within ~2-3x of the idle one (the limiter holds the
upstream's latency near twice its baseline) while the batch still gets most of the capacity; 256 queues every
interactive request behind the batch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import TERMINAL, BatchyardServer, free_port, tiny_chat_batch, wait_port, workdir
from openai import OpenAI

REPO = Path(__file__).resolve().parents[1]


def interactive(port: int, stop: threading.Event, out: list[float]) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode()
    while not stop.is_set():
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json", "Authorization": "Bearer bench"},
        )
        t = time.perf_counter()
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
        out.append(time.perf_counter() - t)
        time.sleep(0.05)  # a user reads the answer, then asks again


def users(
    port: int, n: int, seconds: float | None, stop: threading.Event
) -> tuple[list[float], list[threading.Thread]]:
    lat: list[float] = []
    threads = [threading.Thread(target=interactive, args=(port, stop, lat), daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    if seconds is not None:
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
    return lat, threads


def p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


def with_batch(setting: str, lines: int, port: int, n_users: int, via: str) -> tuple[float, list[float]]:
    concurrency, _, priority = setting.partition(":")
    wd = workdir()
    with BatchyardServer(
        wd,
        "--upstream",
        f"http://127.0.0.1:{port}/v1",
        "--concurrency",
        concurrency,
        *(["--online-priority", priority] if priority else []),
    ) as srv:
        client = OpenAI(base_url=srv.base_url, api_key="bench", max_retries=0)
        f = client.files.create(file=("in.jsonl", tiny_chat_batch(lines)), purpose="batch")
        t0 = time.perf_counter()
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        time.sleep(2.0)  # let the batch reach its steady state before the users arrive
        stop = threading.Event()
        lat, threads = users(port if via == "engine" else srv.port, n_users, None, stop)
        while b.status not in TERMINAL:
            time.sleep(0.1)
            b = client.batches.retrieve(b.id)
            if b.request_counts and b.request_counts.completed > lines * 0.9:
                stop.set()  # measure the users only while the batch is in full swing
        elapsed = time.perf_counter() - t0
        stop.set()
        for t in threads:
            t.join()
    assert b.status == "completed", b
    return lines / elapsed, lat


def idle_users(port: int, n_users: int, via: str) -> list[float]:
    if via == "engine":
        return users(port, n_users, 5.0, threading.Event())[0]
    with BatchyardServer(workdir(), "--upstream", f"http://127.0.0.1:{port}/v1") as srv:
        users(srv.port, n_users, 1.0, threading.Event())  # warm up
        return users(srv.port, n_users, 5.0, threading.Event())[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--delay", type=float, default=0.05)
    ap.add_argument("--lines", type=int, default=6000)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--settings", default="256,auto")
    ap.add_argument("--users-via", choices=("engine", "batchyard"), default="engine")
    a = ap.parse_args()
    port = free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_upstream", "--port", str(port), "--delay", str(a.delay),
         "--slots", str(a.slots)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    wait_port(port)
    try:
        print(
            f"upstream: {a.slots} slots, {a.delay * 1000:.0f} ms per request (capacity {a.slots / a.delay:.0f}/s); "
            f"{a.users} interactive users; batch of {a.lines} lines"
        )
        idle = idle_users(port, a.users, a.users_via)
        base = statistics.median(idle)
        print(
            f"no batch (users via {a.users_via}): users p50 {base * 1e3:6.0f} ms  p95 {p(idle, 0.95) * 1e3:6.0f} ms"
            f"  p99 {p(idle, 0.99) * 1e3:6.0f} ms (n={len(idle)})"
        )
        for conc in a.settings.split(","):
            rate, lat = with_batch(conc, a.lines, port, a.users, a.users_via)
            print(
                f"batch {conc:>10s} : users p50 {statistics.median(lat) * 1e3:6.0f} ms  p95 {p(lat, 0.95) * 1e3:6.0f} ms "
                f"({statistics.median(lat) / base:4.1f}x idle)  p99 {p(lat, 0.99) * 1e3:6.0f} ms "
                f"({p(lat, 0.99) / p(idle, 0.99):4.1f}x idle's, n={len(lat)}); batch {rate:6.0f} lines/s "
                f"({rate / (a.slots / a.delay):.2f} of capacity)"
            )
    finally:
        up.terminate()
        up.wait(10)


if __name__ == "__main__":
    main()
