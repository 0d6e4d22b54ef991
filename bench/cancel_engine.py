"""How long llama.cpp keeps working on a cancelled batch: batch lines sent as streams against sent whole.

    python bench/cancel_engine.py [--lines 8] [--max-tokens 400] [--runs 2]

llama.cpp's own server (`xllamacpp.Server`, SmolLM2-135M, 4 slots, 2 threads) behind `batchyard serve --concurrency 4
--cancel-grace 0`: a batch of long chat lines (`--max-tokens`, one story each) fills the 4 slots, then it is
cancelled through the SDK. Printed per setting of `--stream-batch-lines` (`auto`: streams, the default; `off`: whole
requests, as before): the seconds from the cancel to the batch's `cancelled` status, and from the cancel to the
moment no engine slot works any more (`GET /slots`, `is_processing`; polled every 20 ms). A fresh engine and server
per run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import BatchyardServer
from tests.support.llama_server import LlamaServer

from batchyard.embedded.models import ensure_smollm2


def one_run(model: Path, mode: str, lines: int, max_tokens: int) -> tuple[float, float]:
    body = {"model": "m", "max_tokens": max_tokens, "temperature": 0}
    data = "".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {**body, "seed": i, "messages": [{"role": "user", "content": f"Write story {i}."}]},
            }
        )
        + "\n"
        for i in range(lines)
    )
    env = {**os.environ, "BATCHYARD_STREAM_BATCH_LINES": mode}
    with (
        LlamaServer(model) as eng,
        tempfile.TemporaryDirectory() as d,
        BatchyardServer(
            Path(d), "--upstream", eng.base_url, "--concurrency", "4", "--cancel-grace", "0", env=env
        ) as srv,
    ):
        client = OpenAI(base_url=srv.base_url, api_key="x")
        f = client.files.create(file=("in.jsonl", data.encode()), purpose="batch")
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        deadline = time.monotonic() + 120
        while eng.busy_slots() < 4:
            if time.monotonic() > deadline:
                raise RuntimeError("the batch never filled the engine")
            time.sleep(0.05)
        time.sleep(0.5)  # every slot is generating
        t0 = time.perf_counter()
        client.batches.cancel(b.id)
        cancelled = idle = None
        while cancelled is None or idle is None:
            now = time.perf_counter() - t0
            if cancelled is None and client.batches.retrieve(b.id).status == "cancelled":
                cancelled = now
            if idle is None and eng.busy_slots() == 0:
                idle = now
            if now > 600:
                raise RuntimeError("the engine did not go idle in 10 minutes")
            time.sleep(0.02)
        return cancelled, idle


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    model = ensure_smollm2()
    for _ in range(args.runs):
        for mode in ("auto", "off"):
            cancelled, idle = one_run(model, mode, args.lines, args.max_tokens)
            kind = "streams" if mode == "auto" else "whole requests"
            print(
                f"--stream-batch-lines {mode} ({kind}): cancelled after {cancelled:.2f} s, "
                f"the engine idle after {idle:.2f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
