"""Does the engine stop working on a request whose client went away? llama.cpp's own server (`xllamacpp.Server`,
SmolLM2-135M, 4 slots, 2 threads): a 400-token chat request, cut after 0.5 s, non-streaming and then streamed; how
long its slot stays busy after the client left (`GET /slots`, `is_processing`).

    python bench/engine_abort.py

Why it matters: batchyard cuts batch requests short to make room for online requests (docs/priority.md) only where
that frees the engine's slot.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefix_engine import Engine

from batchyard.embedded.models import ensure_smollm2

BODY = {
    "model": "m",
    "max_tokens": 400,
    "temperature": 0,
    "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
}


async def main(url: str) -> None:
    root = url[:-3]
    async with httpx.AsyncClient(timeout=60) as c:
        t0 = time.perf_counter()
        r = await c.post(url + "/chat/completions", json=BODY)
        print(
            f"whole request: {time.perf_counter() - t0:.2f} s, {r.json()['usage']['completion_tokens']} tokens"
        )
        for stream in (False, True):
            task = asyncio.create_task(c.post(url + "/chat/completions", json={**BODY, "stream": stream}))
            await asyncio.sleep(0.5)
            task.cancel()
            t0 = time.perf_counter()
            while any(s.get("is_processing") for s in (await c.get(root + "/slots")).json()):  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # polling the engine's state: nothing here could set an Event
            kind = "streamed" if stream else "non-streaming"
            print(f"{kind}: the slot was busy {time.perf_counter() - t0:.3f} s after the client left")


if __name__ == "__main__":
    with Engine(ensure_smollm2(), "on") as eng:
        asyncio.run(main(eng.base_url))
