"""P2: validation speed through the server, and its memory; P3: peak memory of a 500,000-line batch vs 5,000.

P2 — a 200 MB / 50,000-line file is uploaded, then a batch is created; validation time is from create until the
batch leaves `validating` (polled every 5 ms), and the RSS of the server and its worker processes together is sampled
every 5 ms meanwhile (goal: >= 500 MB/s, peak < 100 MiB above the idle RSS measured just before). The batch is
then cancelled.
P3 — the same small-line batch of 5,000 and of 500,000 lines (`--max-lines 1000000`) runs to completion against a
zero-cost nginx upstream, each on a fresh server; the ratio of the servers' peak RSS (VmHWM summed over the API
process and its worker processes) is printed (goal <= 1.2).

    python bench/p2_p3_memory.py [--skip-p2] [--skip-p3] [--p3-lines 500000]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BatchyardServer, Nginx, hwm_kib, make_input, rss_kib, workdir
from openai import OpenAI


def p2(wd: Path) -> None:
    inp = wd / "p2.jsonl"
    size = make_input(inp, 50_000, 4000)
    with Nginx(wd) as ng, BatchyardServer(wd, "--upstream", ng.base_url) as srv:
        assert srv.proc is not None
        client = OpenAI(base_url=srv.base_url, api_key="bench", max_retries=0, timeout=600)
        with open(inp, "rb") as fh:
            f = client.files.create(file=("p2.jsonl", fh), purpose="batch")
        time.sleep(1.0)
        idle = rss_kib(srv.proc.pid)
        peak = idle
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, rss_kib(srv.proc.pid))  # type: ignore[union-attr]
                time.sleep(0.005)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.perf_counter()
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        while b.status == "validating":
            time.sleep(0.005)
            b = client.batches.retrieve(b.id)
        elapsed = time.perf_counter() - t0
        stop.set()
        th.join()
        client.batches.cancel(b.id)
        assert b.status == "in_progress", b
    print(
        f"P2 validation: {size / 1e6:.0f} MB in {elapsed:.2f}s = {size / 1e6 / elapsed:.0f} MB/s through the server "
        f"(goal >= 500; includes the HTTP create and 5 ms polling)"
    )
    print(
        f"P2 memory: idle {idle / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB, +{(peak - idle) / 1024:.0f} MiB "
        f"(goal < +100 MiB)"
    )


def p3_run(wd: Path, lines: int) -> tuple[int, float]:
    inp = wd / f"p3-{lines}.jsonl"
    make_input(inp, lines, 300)
    with (
        Nginx(wd) as ng,
        BatchyardServer(
            wd, "--upstream", ng.base_url, "--max-lines", "1000000", "--concurrency", "64"
        ) as srv,
    ):
        assert srv.proc is not None
        client = OpenAI(base_url=srv.base_url, api_key="bench", max_retries=0, timeout=600)
        t0 = time.perf_counter()
        with open(inp, "rb") as fh:
            f = client.files.create(file=(inp.name, fh), purpose="batch")
        b = client.batches.create(
            input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        while b.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.5)
            b = client.batches.retrieve(b.id)
        assert b.status == "completed" and b.output_file_id, b
        client.files.content(b.output_file_id).write_to_file(wd / "out.jsonl")
        return hwm_kib(srv.proc.pid), time.perf_counter() - t0


def p3(lines: int) -> None:
    small, t_small = p3_run(workdir(), 5_000)
    big, t_big = p3_run(workdir(), lines)
    print(
        f"P3 peak RSS: 5,000 lines {small / 1024:.0f} MiB ({t_small:.1f}s); {lines:,} lines {big / 1024:.0f} MiB "
        f"({t_big:.1f}s); ratio {big / small:.2f} (goal <= 1.2)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-p2", action="store_true")
    ap.add_argument("--skip-p3", action="store_true")
    ap.add_argument("--p3-lines", type=int, default=500_000)
    a = ap.parse_args()
    if not a.skip_p2:
        p2(workdir())
    if not a.skip_p3:
        p3(a.p3_lines)


if __name__ == "__main__":
    main()
