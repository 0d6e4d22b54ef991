"""The embedded engine running requests as streams (`LLMEngine.streamed`, the default) against whole, in one process.

    python bench/embedded_streams.py [--requests 16] [--max-tokens 64] [--rounds 2]

Printed, alternated `--rounds` times: the seconds and process CPU for `--requests` chat completions at once on the 4
slots, whole and as streams (the same tokens either way, temperature 0); then one 200-token answer whose caller
goes away after 0.2 s, and the seconds until the engine's one slot serves the next request (as streams it stops at
its next token; whole it finishes first).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson

from batchyard.upstreams.embedded import CHAT_MODEL, EmbeddedUpstream


def body(i: int, max_tokens: int) -> bytes:
    messages = [{"role": "user", "content": f"Tell me about topic {i}."}]
    return orjson.dumps(
        {"model": CHAT_MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    )


async def throughput(requests: int, max_tokens: int, rounds: int) -> None:
    up = EmbeddedUpstream(slots=4, embeddings=False)
    await up.start()
    assert up._llm is not None
    try:
        for _ in range(rounds):
            for streamed in (False, True):
                up._llm.streamed = streamed
                t0, c0 = time.perf_counter(), time.process_time()
                answers = await asyncio.gather(
                    *(
                        up.call("/v1/chat/completions", body(i, max_tokens), timeout=600)
                        for i in range(requests)
                    )
                )
                tokens = sum(orjson.loads(a.body)["usage"]["completion_tokens"] for a in answers)
                print(
                    f"{'streams' if streamed else 'whole  '}: {requests} requests, {tokens} tokens in "
                    f"{time.perf_counter() - t0:.2f} s, process CPU {time.process_time() - c0:.2f} s"
                )
    finally:
        await up.close()


async def stop_then_next() -> None:
    up = EmbeddedUpstream(slots=1, embeddings=False)
    await up.start()
    assert up._llm is not None
    try:
        for streamed in (False, True):
            up._llm.streamed = streamed
            gone = asyncio.create_task(up.call("/v1/chat/completions", body(0, 200), timeout=600))
            await asyncio.sleep(0.2)
            t0 = time.perf_counter()
            gone.cancel()
            await up.call("/v1/chat/completions", body(1, 1), timeout=600)
            print(
                f"{'streams' if streamed else 'whole  '}: a 200-token answer left after 0.2 s, the next request "
                f"served {time.perf_counter() - t0:.2f} s later"
            )
    finally:
        await up.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    asyncio.run(throughput(a.requests, a.max_tokens, a.rounds))
    asyncio.run(stop_then_next())


if __name__ == "__main__":
    main()
