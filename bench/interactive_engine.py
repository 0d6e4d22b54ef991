"""Interactive users of an engine while a batch runs on it (llm-d batch-gateway's benchmark #491, on this machine's CPU):
llama.cpp's own server (`xllamacpp.Server`, SmolLM2-135M, 4 slots, 2 threads), a fresh engine per setting.

    python bench/interactive_engine.py [--users 2] [--requests 12] [--lines 240] [--settings auto,3]
        [--users-via engine|batchyard] [--think SECONDS]

`--settings`: batchyard's `--concurrency` values to try, each optionally with its `--online-priority`
(`auto:pause`). `--think`: a user's pause between requests (0.5-1.4x it, not in step with the other users).
                                       [--users-via engine|batchyard]

Measures, in one run:
- idle: `--users` interactive users, each sending `--requests` short chat requests one after the other straight to
  the engine (p50/p99 latency of a whole request: the engine answers without streaming, `max_tokens` 16);
- batch alone: the batch's throughput through batchyard (lines/s while it runs);
- together: the same users while the batch runs, for each `--settings` value of batchyard's `--concurrency`
  (`auto`: the adaptive limit; a number: a fixed one); the users' p50/p99 against idle, and the batch's throughput
  while they were active against its throughput alone.
`--users-via batchyard`: the users send their requests through batchyard's front door (`POST /v1/chat/completions`
on the same `batchyard serve` that runs the batch; idle: on one that runs none) instead of straight to the engine,
as teams that point one base URL at batchyard do; the idle figure is then batchyard's idle too.
Goal (issue 13): p99 <= 1.3x idle while the batch keeps >= 0.8 of its throughput alone.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BatchyardServer
from prefix_engine import Engine, make_file

from batchyard.embedded.models import ensure_smollm2

QUESTION = {
    "model": "smollm2",
    "max_tokens": 16,
    "temperature": 0,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant. Answer in one short sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
}


async def users(base_url: str, n: int, requests: int, think: float = 0.0) -> list[float]:
    """Latencies of `n` users each sending `requests` requests in sequence, `think` seconds apart."""
    lat: list[float] = []
    async with httpx.AsyncClient(timeout=600) as client:

        async def user(u: int) -> None:
            for i in range(requests):
                body = {
                    **QUESTION,
                    "messages": [
                        *QUESTION["messages"][:1],
                        {"role": "user", "content": f"{u}/{i}: capital of France?"},
                    ],
                }
                t0 = time.perf_counter()
                r = await client.post(base_url + "/chat/completions", json=body)
                r.raise_for_status()
                lat.append(time.perf_counter() - t0)
                if think and i + 1 < requests:
                    await asyncio.sleep(think * (0.5 + (u * 7 + i * 3) % 10 / 10))  # 0.5-1.4x, not in step

        await asyncio.gather(*(user(u) for u in range(n)))
    return lat


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


class BatchRun:
    """A batch through batchyard on `engine`, watched from a thread: completed lines over time."""

    def __init__(self, engine: Engine, path: Path, work: Path, setting: str) -> None:
        self.engine, self.path, self.work = engine, path, work
        self.concurrency, _, self.priority = setting.partition(":")  # e.g. "auto:pause"
        self.samples: list[tuple[float, int]] = []  # (time, completed lines)
        self.base_url: str | None = None  # batchyard's, once it serves (its front door, for --users-via)
        self.done = threading.Event()
        self.users_done = threading.Event()  # batchyard serves until then (the users may go through it)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            args = [
                "--upstream",
                self.engine.base_url,
                "--concurrency",
                self.concurrency,
                "--attempt-timeout",
                "900",
                *(["--online-priority", self.priority] if self.priority else []),
            ]
            with tempfile.TemporaryDirectory(dir=self.work) as d, BatchyardServer(Path(d), *args) as srv:
                self.base_url = srv.base_url
                client = OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=900)
                f = client.files.create(file=self.path.open("rb"), purpose="batch")
                b = client.batches.create(
                    input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
                )
                while b.status not in ("completed", "failed", "expired", "cancelled"):
                    time.sleep(0.25)
                    b = client.batches.retrieve(b.id)
                    if b.request_counts is not None:
                        self.samples.append((time.perf_counter(), b.request_counts.completed))
                assert b.status == "completed", b
                self.users_done.wait(1800)
        except BaseException as e:
            self.error = e
        finally:
            self.done.set()

    def rate(self, t0: float, t1: float) -> float:
        """Lines a second completed between t0 and t1 (from the samples around them)."""
        inside = [(t, n) for t, n in self.samples if t0 <= t <= t1]
        if len(inside) < 2:
            return 0.0
        (ta, na), (tb, nb) = inside[0], inside[-1]
        return (nb - na) / (tb - ta) if tb > ta else 0.0


def idle_users(eng: Engine, args: argparse.Namespace, work: Path) -> list[float]:
    """The users' latencies on an idle engine: straight to it, or through a batchyard that runs no batch. Each
    user's first two requests warm the path up (the engine's first prompts, batchyard's first connections) and are
    not counted, as they are not in the measurement with the batch (the path is warm by then)."""
    if args.users_via == "engine":
        asyncio.run(users(eng.base_url, args.users, 2))
        return asyncio.run(users(eng.base_url, args.users, args.requests, args.think))
    with (
        tempfile.TemporaryDirectory(dir=work) as d,
        BatchyardServer(Path(d), "--upstream", eng.base_url) as srv,
    ):
        asyncio.run(users(srv.base_url, args.users, 2))
        return asyncio.run(users(srv.base_url, args.users, args.requests, args.think))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=2)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--lines", type=int, default=240)
    ap.add_argument(
        "--settings",
        default="auto,3",
        help="comma-separated batchyard settings to try: CONCURRENCY[:ONLINE_PRIORITY], e.g. auto,auto:pause",
    )
    ap.add_argument("--think", type=float, default=0.0, help="seconds a user waits between requests (about)")
    ap.add_argument(
        "--users-via",
        choices=("engine", "batchyard"),
        default="engine",
        help="where the interactive users send their requests: straight to the engine, or through batchyard's "
        "front door (the server that runs the batch)",
    )
    args = ap.parse_args()
    via = f" (users via {args.users_via})"
    model = ensure_smollm2()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        batch = work / "batch.jsonl"
        make_file(batch, args.lines, args.lines, 60)  # no shared prefix: every line is full work
        with Engine(model, "on") as eng:
            idle = idle_users(eng, args, work)
        p50_idle, p99_idle = statistics.median(idle), pct(idle, 0.99)
        print(
            f"idle{via}: users p50 {p50_idle * 1000:.0f} ms, p99 {p99_idle * 1000:.0f} ms (n={len(idle)}; "
            f"slowest {', '.join(f'{x * 1000:.0f}' for x in sorted(idle)[-3:])} ms)",
            flush=True,
        )
        for setting in args.settings.split(","):
            with Engine(model, "on") as eng:
                run = BatchRun(eng, batch, work, setting)
                th = threading.Thread(target=run.run, daemon=True)
                th.start()
                while not run.samples and not run.done.is_set():
                    time.sleep(0.2)
                time.sleep(8)  # let the batch reach its pace
                t_before = time.perf_counter()
                time.sleep(8)
                alone = run.rate(t_before, time.perf_counter())
                target = eng.base_url if args.users_via == "engine" else run.base_url
                assert target is not None, "batchyard is not serving"
                t0 = time.perf_counter()
                lat = asyncio.run(users(target, args.users, args.requests, args.think))
                t1 = time.perf_counter()
                together = run.rate(t0, t1)
                run.users_done.set()
                run.done.wait(1800)
                th.join(5)
                if run.error is not None:
                    raise run.error
            p50, p99 = statistics.median(lat), pct(lat, 0.99)
            share = together / alone if alone else float("nan")
            print(
                f"{setting}{via}: batch alone {alone:.2f} lines/s, with users {together:.2f} lines/s "
                f"({share:.2f} of alone); users p50 {p50 * 1000:.0f} ms ({p50 / p50_idle:.2f}x idle), "
                f"p99 {p99 * 1000:.0f} ms ({p99 / p99_idle:.2f}x idle)",
                flush=True,
            )


if __name__ == "__main__":
    main()
