"""Threads of the embedded engine: tokens/s of SmolLM2-135M through batchyard's embedded upstream with 1, 2 and
"all cores" llama.cpp threads (and llama.cpp's own choice, `auto`), against llama.cpp's own HTTP server
(`xllamacpp.Server`, the binding the embedded engine uses) on the same model, machine and thread counts, in one run;
on the machine as it is, and with `--busy N` processes spinning on a core each (a busy machine).

    python bench/embedded_threads.py [--requests 32] [--max-tokens 48] [--busy 1] [--slots 4]

Every configuration gets a fresh engine, one warm-up request, then `--requests` chat requests (temperature 0,
`ignore_eos` so each generates exactly `--max-tokens` tokens) from `--slots` lanes at once, as batchyard's
dispatcher drives an upstream with --concurrency equal to the slots. Prints completion tokens per second (the load
average of the machine when each run started beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.llama_server import LlamaServer

from batchyard.embedded.models import ensure_smollm2
from batchyard.upstreams.embedded import CHAT_MODEL, EmbeddedUpstream

TOPICS = ["rivers", "mountains", "bees", "winter", "markets", "music", "forests", "oceans"]


def bodies(n: int, max_tokens: int) -> list[dict[str, Any]]:
    return [
        {
            "model": CHAT_MODEL,
            "temperature": 0,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "messages": [
                {"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]} ({i})."}
            ],
        }
        for i in range(n)
    ]


async def lanes(
    call: Callable[[dict[str, Any]], Awaitable[int]], reqs: list[dict[str, Any]], slots: int
) -> float:
    """Completion tokens per second of `reqs` sent from `slots` lanes."""
    todo = iter(reqs)
    tokens = 0

    async def lane() -> None:
        nonlocal tokens
        for body in todo:
            tokens += await call(body)

    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(slots)))
    return tokens / (time.perf_counter() - t0)


def _completion_tokens(raw: bytes) -> int:
    return int(orjson.loads(raw)["usage"]["completion_tokens"])


async def through_batchyard(
    model: Path, threads: int | None, reqs: list[dict[str, Any]], slots: int
) -> float:
    up = EmbeddedUpstream(model_path=model, threads=threads, slots=slots, embeddings=False)
    await up.start()
    try:

        async def call(body: dict[str, Any]) -> int:
            resp = await up.call("/v1/chat/completions", orjson.dumps(body), timeout=600)
            assert resp.status == 200, resp.body[:300]
            return _completion_tokens(resp.body)

        await call(reqs[0])  # warm-up
        return await lanes(call, reqs, slots)
    finally:
        await up.close()


def reference(model: Path, threads: int | None, reqs: list[dict[str, Any]], slots: int) -> float:
    with LlamaServer(model, slots=slots, threads=threads) as server:
        return asyncio.run(_drive_reference(server.root, reqs, slots))


async def _drive_reference(url: str, reqs: list[dict[str, Any]], slots: int) -> float:
    async with httpx.AsyncClient(timeout=600) as client:

        async def call(body: dict[str, Any]) -> int:
            r = await client.post(url + "/v1/chat/completions", content=orjson.dumps(body))
            r.raise_for_status()
            return _completion_tokens(r.content)

        await call(reqs[0])
        return await lanes(call, reqs, slots)


def _spin() -> None:
    while True:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument(
        "--busy", type=int, default=1, help="spinning processes for the busy-machine half (0: skip)"
    )
    args = ap.parse_args()
    model = ensure_smollm2()
    cores = os.cpu_count() or 1
    counts: list[int | None] = [*sorted({1, 2, cores})]
    counts.append(None)
    reqs = bodies(args.requests, args.max_tokens)
    print(
        f"{cores} cores; {args.requests} requests x {args.max_tokens} tokens, {args.slots} slots", flush=True
    )
    for busy in sorted({0, args.busy}):
        spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(busy)]
        for p in spinners:
            p.start()
        try:
            print(f"\n{busy} busy process(es) beside the engine", flush=True)
            print(
                f"  {'threads':>8}  {'batchyard embedded':>20}  {'llama.cpp server':>18}  load avg",
                flush=True,
            )
            for threads in counts:
                load = os.getloadavg()[0]
                ours = asyncio.run(through_batchyard(model, threads, reqs, args.slots))
                ref = reference(model, threads, reqs, args.slots)
                label = "auto" if threads is None else str(threads)
                print(f"  {label:>8}  {ours:14.1f} tok/s  {ref:12.1f} tok/s  {load:8.2f}", flush=True)
        finally:
            for p in spinners:
                p.kill()
                p.join()


if __name__ == "__main__":
    main()
