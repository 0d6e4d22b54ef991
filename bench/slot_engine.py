"""Prefix ordering against a simulated engine with llama.cpp's slot rules: how many prompt prefills a batch costs,
in seconds instead of the minutes `bench/prefix_engine.py` takes on the real engine, and with no CPU to share (the
prefill count does not depend on the machine's load, which on this shared machine moves wall times by 2x).

    python bench/slot_engine.py [--lines 160] [--groups 8] [--shard-lines 20] [--slots 4] [--baseline-src DIR]

The engine (an aiohttp server in this process) has `--slots` slots. Like llama.cpp's server with its RAM prompt cache
off (`cache_ram_mib` 0), a slot keeps only the prompt it served last: a request goes to the idle slot that holds its
system prompt, else to the idle slot used least recently (evicting what it held); with no slot idle it queues. A
request whose slot does not hold its prompt pays a prefill (`--prefill-ms`), then every request decodes
(`--decode-ms`). Printed: prefills (the fewest possible is one a prompt group), the cached share of prompt tokens as
`usage` reports it, and wall seconds, for the engine driven directly in file order (as many in flight as slots) and
for batchyard (`--concurrency` = slots, `--shard-lines N`) with prefix ordering, from this tree and optionally from
another source tree (`--baseline-src`, e.g. an export of an earlier commit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import BatchyardServer
from tests.support.slot_engine import PROMPT_TOKENS, SYSTEM_TOKENS, RunningSlotEngine, shared_prompt_lines


async def direct(port: int, reqs: list[dict[str, Any]], slots: int) -> None:
    import httpx

    queue = deque(reqs)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:

        async def lane() -> None:
            while queue:
                r = queue.popleft()
                (await c.post("/v1/chat/completions", json=r["body"])).raise_for_status()

        await asyncio.gather(*(lane() for _ in range(slots)))


def through_batchyard(
    port: int, reqs: list[dict[str, Any]], args: argparse.Namespace, src: str | None
) -> dict[str, Any]:
    env = None if src is None else {**os.environ, "PYTHONPATH": src}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        server = BatchyardServer(
            work,
            "--upstream",
            f"http://127.0.0.1:{port}/v1",
            "--concurrency",
            str(args.slots),
            "--workers",
            "1",
            "--shard-lines",
            str(args.shard_lines),
            "--online-priority",
            "off",
            env=env,
        )
        with server:
            client = OpenAI(base_url=server.base_url, api_key="sk-bench", max_retries=0)
            data = "".join(json.dumps(r) + "\n" for r in reqs).encode()
            start = time.perf_counter()
            f = client.files.create(file=("in.jsonl", data), purpose="batch")
            b = client.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            while b.status not in ("completed", "failed", "cancelled", "expired"):
                time.sleep(0.05)
                b = client.batches.retrieve(b.id)
            wall = time.perf_counter() - start
            assert b.status == "completed", b
            assert b.request_counts is not None and b.request_counts.completed == len(reqs), b.request_counts
    return {"wall": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=160)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--shard-lines", type=int, default=20)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--prefill-ms", type=float, default=200.0)
    ap.add_argument("--decode-ms", type=float, default=40.0)
    ap.add_argument("--baseline-src", default=None)
    ap.add_argument("--runs", type=int, default=1)
    args = ap.parse_args()
    reqs = shared_prompt_lines(args.lines, args.groups)
    print(
        f"{args.lines} lines over {args.groups} system prompts, shards of {args.shard_lines} lines, {args.slots} slots, "
        f"prefill {args.prefill_ms:.0f} ms, decode {args.decode_ms:.0f} ms (fewest prefills: {args.groups})"
    )
    sides: list[tuple[str, str | None]] = [
        ("direct, file order", "direct"),
        ("batchyard, prefix ordering", None),
    ]
    if args.baseline_src:
        sides.append((f"batchyard ({Path(args.baseline_src).parent.name})", args.baseline_src))
    base = None
    for _ in range(args.runs):
        for name, src in sides:
            with RunningSlotEngine(args.slots, args.prefill_ms / 1000, args.decode_ms / 1000) as eng:
                if src == "direct":
                    start = time.perf_counter()
                    asyncio.run(direct(eng.port, reqs, args.slots))
                    wall = time.perf_counter() - start
                else:  # from the upload to the batch's end, the server's start not counted
                    wall = through_batchyard(eng.port, reqs, args, src)["wall"]
                e = eng.engine
            hits = e.requests - e.prefills
            cached = hits * SYSTEM_TOKENS / (e.requests * PROMPT_TOKENS)
            if src == "direct":
                base = wall
            ratio = f"{base / wall:5.2f}x file order" if base else ""
            print(f"  {name:34s} prefills {e.prefills:4d}   cached {cached:6.1%}   {wall:6.1f} s  {ratio}")


if __name__ == "__main__":
    main()
