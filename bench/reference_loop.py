"""The minimal reference for P1: aiohttp + uvloop, a fixed pool of coroutines, same file, same output lines."""

from __future__ import annotations

import asyncio
import secrets
import sys
import time

import aiohttp
import orjson
import uvloop


async def run(input_path: str, output_path: str, base_url: str, pool: int = 64) -> int:
    url = base_url.rstrip("/") + "/chat/completions"
    done = 0
    with open(input_path, "rb") as src, open(output_path, "wb") as out:
        lines = iter(src)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def lane() -> None:
                nonlocal done
                for raw in lines:
                    req = orjson.loads(raw)
                    async with session.post(
                        url, data=orjson.dumps(req["body"]), headers={"Content-Type": "application/json"}
                    ) as resp:
                        body = orjson.loads(await resp.read())
                        out.write(
                            orjson.dumps(
                                {
                                    "id": f"batch_req_{secrets.token_hex(12)}",
                                    "custom_id": req["custom_id"],
                                    "response": {"status_code": resp.status, "request_id": "", "body": body},
                                    "error": None,
                                }
                            )
                            + b"\n"
                        )
                        done += 1

            await asyncio.gather(*(lane() for _ in range(pool)))
    return done


if __name__ == "__main__":
    t0 = time.perf_counter()
    n = uvloop.run(run(sys.argv[1], sys.argv[2], sys.argv[3]))
    print(f"{n} lines in {time.perf_counter() - t0:.2f}s")
