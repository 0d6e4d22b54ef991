"""A simulated inference engine with llama.cpp's slot rules, for counting prompt prefills (tests and
`bench/slot_engine.py`).

Like llama.cpp's server with its RAM prompt cache off (`cache_ram_mib` 0), each of `slots` slots keeps only the prompt
it served last: a request goes to the idle slot that holds its system prompt (the first message's content), else to
the idle slot used least recently (evicting what it held); with no slot idle it queues. A request whose slot does not
hold its prompt pays a prefill (`prefill_s`), then every request decodes (`decode_s`). `SlotEngine.prefills` counts
the prefills: the fewest possible for a batch is one a distinct system prompt. `bench/slot_engine.py` checked it
against the real engine: batchyard at d0563a7 on the bench's file had the same cached share of prompt tokens
(67.4 %) on this simulation as on llama.cpp (`bench/prefix_engine.py --shard-lines 20 --cache off`).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import deque
from typing import Any

from aiohttp import web

from tests.support.processes import free_port

PROMPT_TOKENS = 480  # a line's prompt: its system prompt is 450 of them
SYSTEM_TOKENS = 450


class SlotEngine:
    def __init__(self, slots: int, prefill_s: float, decode_s: float) -> None:
        self.prompt: list[str | None] = [None] * slots
        self.busy = [False] * slots
        self.used = [0.0] * slots
        self.queue: deque[asyncio.Future[int]] = deque()
        self.prefill_s, self.decode_s = prefill_s, decode_s
        self.prefills = self.requests = 0
        self.trace: list[
            tuple[float, int, str, bool]
        ] = []  # (when, slot, system prompt, its prompt was there)

    def _pick(self, key: str) -> int | None:
        idle = [i for i, b in enumerate(self.busy) if not b]
        if not idle:
            return None
        same = [i for i in idle if self.prompt[i] == key]
        return same[0] if same else min(idle, key=self.used.__getitem__)

    async def serve(self, key: str) -> bool:
        """One request; True when its prompt was in its slot."""
        slot = self._pick(key)
        while slot is None:
            waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self.queue.append(waiter)
            await waiter
            slot = self._pick(key)
        self.busy[slot] = True
        hit = self.prompt[slot] == key
        self.requests += 1
        self.trace.append((time.monotonic(), slot, key, hit))
        try:
            if not hit:
                self.prefills += 1
                self.prompt[slot] = key
                await asyncio.sleep(self.prefill_s)
            await asyncio.sleep(self.decode_s)
        finally:
            self.busy[slot] = False
            self.used[slot] = time.monotonic()
            if self.queue:
                w = self.queue.popleft()
                if not w.done():
                    w.set_result(0)
        return hit

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        key = str(body["messages"][0]["content"])
        hit = await self.serve(key)
        cached = SYSTEM_TOKENS if hit else 0
        return web.json_response(
            {
                "id": "chatcmpl-sim",
                "object": "chat.completion",
                "created": 1700000000,
                "model": body.get("model", "m"),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
                ],
                "usage": {
                    "prompt_tokens": PROMPT_TOKENS,
                    "completion_tokens": 1,
                    "total_tokens": PROMPT_TOKENS + 1,
                    "prompt_tokens_details": {"cached_tokens": cached},
                },
            }
        )


class RunningSlotEngine:
    """A fresh engine on a loopback port, in a thread of its own."""

    def __init__(self, slots: int, prefill_s: float, decode_s: float) -> None:
        self.engine = SlotEngine(slots, prefill_s, decode_s)
        self.port = free_port()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.engine.handle)
        runner = web.AppRunner(app, access_log=None)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())  # closes the connections and their handlers
        loop.close()

    def __enter__(self) -> RunningSlotEngine:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def shared_prompt_lines(lines: int, groups: int, seed: int = 7) -> list[dict[str, Any]]:
    """`lines` chat request lines over `groups` system prompts, as many lines each, shuffled."""
    rng = random.Random(seed)
    systems = [
        f"System prompt {g}: " + " ".join(f"w{rng.randrange(10**6)}" for _ in range(60))
        for g in range(groups)
    ]
    reqs = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "m",
                "max_tokens": 16,
                "messages": [
                    {"role": "system", "content": systems[i % groups]},
                    {"role": "user", "content": f"question {i}"},
                ],
            },
        }
        for i in range(lines)
    ]
    rng.shuffle(reqs)
    return reqs
