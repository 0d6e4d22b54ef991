"""How long the embedded engine keeps working on a cancelled batch: the next batch's one short line waits for it.

    python bench/cancel_embedded.py [--lines 8] [--max-tokens 400] [--runs 2]
    PYTHONPATH=<an export of another commit>/src python bench/cancel_embedded.py   # the same on that code

`batchyard serve` on its defaults (the embedded SmolLM2, 4 slots) with `--cancel-grace 0`: a batch of `--lines`
long chat lines (`--max-tokens`, one story each) runs for 3 s, then it is cancelled through the SDK and a batch of
one 4-token line is created at once. Printed: the seconds from the cancel to the first batch's `cancelled`, and to
the second batch's `completed` (it can only run once the engine's threads are free: with requests run whole they
finished each cancelled story first). A fresh server per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BatchyardServer

MODEL = "smollm2-135m-instruct"


def batch_file(lines: int, max_tokens: int) -> bytes:
    return "".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": MODEL,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "messages": [
                        {"role": "user", "content": f"Write a long story number {i} about a dragon."}
                    ],
                },
            }
        )
        + "\n"
        for i in range(lines)
    ).encode()


def wait(client: OpenAI, batch_id: str, status: str, t0: float) -> float:
    while (got := client.batches.retrieve(batch_id).status) != status:
        if time.perf_counter() - t0 > 600:
            raise RuntimeError(f"batch {batch_id} still {got} after 10 minutes")
        time.sleep(0.02)
    return time.perf_counter() - t0


def one_run(lines: int, max_tokens: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d, BatchyardServer(Path(d), "--cancel-grace", "0") as srv:
        client = OpenAI(base_url=srv.base_url, api_key="x")
        warm = client.files.create(file=("w.jsonl", batch_file(1, 2)), purpose="batch")
        b = client.batches.create(
            input_file_id=warm.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        wait(client, b.id, "completed", time.perf_counter())  # the model is loaded
        long = client.files.create(file=("long.jsonl", batch_file(lines, max_tokens)), purpose="batch")
        short = client.files.create(file=("short.jsonl", batch_file(1, 4)), purpose="batch")
        b = client.batches.create(
            input_file_id=long.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        wait(client, b.id, "in_progress", time.perf_counter())
        time.sleep(3.0)  # every slot is generating
        t0 = time.perf_counter()
        client.batches.cancel(b.id)
        nxt = client.batches.create(
            input_file_id=short.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        cancelled = wait(client, b.id, "cancelled", t0)
        return cancelled, wait(client, nxt.id, "completed", t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--runs", type=int, default=2)
    a = ap.parse_args()
    got = [one_run(a.lines, a.max_tokens) for _ in range(a.runs)]
    for cancelled, served in got:
        print(f"cancelled after {cancelled:.2f} s, the next batch's line served after {served:.2f} s")
    print(f"median: next line served {statistics.median(s for _, s in got):.2f} s after the cancel")


if __name__ == "__main__":
    main()
