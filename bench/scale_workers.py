"""Issue 4 benchmark: batch throughput with 1, 2 and 4 `batchyard worker` processes against a latency-bound upstream
(every request takes --delay seconds; each worker keeps a fixed --concurrency in flight). Prints each rate and its
ratio to the 1-worker rate measured in the same run (goal: >= 3.2x at 4 workers).

    python bench/scale_workers.py [--lines 1600] [--delay 0.2] [--concurrency 16] [--shard-lines 50]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import TERMINAL, BatchyardServer, free_port, tiny_chat_batch, wait_port, workdir
from openai import OpenAI


def start_upstream(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_upstream", "--port", str(port)],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.DEVNULL,
    )
    wait_port(port)
    return proc


def one_run(
    n_workers: int, lines: int, delay: float, concurrency: int, shard_lines: int, upstream: str
) -> float:
    wd = workdir()
    common = [
        "--upstream",
        upstream,
        "--shard-lines",
        str(shard_lines),
        "--lease-seconds",
        "10",
        "--log-level",
        "warning",
    ]
    data = ["--data-dir", str(wd / "batchyard-data")]
    with BatchyardServer(wd, "--no-worker", *common) as srv:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "batchyard.cli.main",
                    "worker",
                    *common,
                    *data,
                    "--concurrency",
                    str(concurrency),
                    "--max-shards",
                    "4",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(n_workers)
        ]
        try:
            client = OpenAI(base_url=srv.base_url, api_key="bench", max_retries=0)
            f = client.files.create(
                file=("in.jsonl", tiny_chat_batch(lines, x_fake={"delay": delay})), purpose="batch"
            )
            time.sleep(1.0)  # workers up and polling
            t0 = time.perf_counter()
            b = client.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            while b.status not in TERMINAL:
                time.sleep(0.05)
                b = client.batches.retrieve(b.id)
            elapsed = time.perf_counter() - t0
            assert b.status == "completed" and b.request_counts and b.request_counts.completed == lines, b
            return lines / elapsed
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=1600)
    ap.add_argument("--delay", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--shard-lines", type=int, default=50)
    a = ap.parse_args()
    port = free_port()
    up = start_upstream(port)
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1] / "src"))
    try:
        ideal = a.concurrency / a.delay
        print(
            f"upstream: {a.delay * 1000:.0f} ms per request; {a.concurrency} in flight per worker "
            f"(ideal {ideal:.0f} lines/s per worker); {a.lines} lines"
        )
        base = None
        for n in (1, 2, 4):
            rate = one_run(n, a.lines, a.delay, a.concurrency, a.shard_lines, f"http://127.0.0.1:{port}/v1")
            base = base or rate
            print(f"{n} worker(s): {rate:7.1f} lines/s  x{rate / base:.2f} vs 1 worker")
    finally:
        up.terminate()
        up.wait(10)


if __name__ == "__main__":
    main()
