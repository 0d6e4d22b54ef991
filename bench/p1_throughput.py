"""P1 (+P4): a chat batch end to end through batchyard's HTTP API against a zero-cost upstream (nginx answering a fixed
completion), compared with a minimal aiohttp+uvloop loop (64 coroutines) on the same file and upstream.
While batchyard runs, another thread measures the latency of GET /v1/batches/{id} (P4).

    python bench/p1_throughput.py [--lines 50000] [--line-bytes 4000] [--concurrency 64]

Needs Debian's nginx (`apt-get install -y nginx-light`).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BatchyardServer, Nginx, cpu_seconds, make_input, tree_pids, workdir
from openai import OpenAI


def run_reference(inp: Path, out: Path, base_url: str) -> tuple[float, float]:
    """Wall seconds and CPU seconds (interpreter start included) of the reference loop."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, str(Path(__file__).parent / "reference_loop.py"), str(inp), str(out), base_url],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def run_batchyard(inp: Path, base_url: str, out: Path, probe: bool = True) -> tuple[float, list[float]]:
    client = OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    latencies: list[float] = []
    stop = threading.Event()
    t0 = time.perf_counter()
    with open(inp, "rb") as fh:
        f = client.files.create(file=("input.jsonl", fh), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")

    def poll() -> None:
        probe = OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=60)
        while not stop.is_set():
            s = time.perf_counter()
            probe.batches.retrieve(b.id)
            latencies.append(time.perf_counter() - s)
            time.sleep(0.02)

    th = threading.Thread(target=poll, daemon=True)
    if probe:
        th.start()
    t_upload = time.perf_counter() - t0
    seen: dict[str, float] = {}
    while True:
        b = client.batches.retrieve(b.id)
        seen.setdefault(b.status, time.perf_counter() - t0)
        if b.status in ("completed", "failed", "expired", "cancelled"):
            break
        time.sleep(0.1)
    stop.set()
    if probe:
        th.join()
    if b.status != "completed" or b.output_file_id is None:
        sys.exit(f"batch ended {b.status}: {b.errors}")
    t_done = time.perf_counter() - t0
    client.files.content(b.output_file_id).write_to_file(out)
    total = time.perf_counter() - t0
    phases = {"upload+create": t_upload, **seen, "download": total - t_done}
    print("phases (s since upload start): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    return total, latencies


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=50_000)
    ap.add_argument("--line-bytes", type=int, default=4000)
    ap.add_argument("--concurrency", default="auto")
    ap.add_argument(
        "--no-probe", action="store_true", help="do not measure P4 (no GETs while the batch runs)"
    )
    ap.add_argument(
        "--server-arg", action="append", default=[], help="extra `batchyard serve` argument, repeatable"
    )
    a = ap.parse_args()
    wd = workdir()
    inp = wd / "input.jsonl"
    size = make_input(inp, a.lines, a.line_bytes)
    print(f"input: {a.lines} lines, {size / 1e6:.1f} MB")
    with Nginx(wd) as ng:
        ref_s, ref_cpu = run_reference(inp, wd / "ref-out.jsonl", ng.base_url)
        with BatchyardServer(
            wd, "--upstream", ng.base_url, "--concurrency", str(a.concurrency), *a.server_arg
        ) as srv:
            assert srv.proc is not None
            workers = [p for p in tree_pids(srv.proc.pid) if p != srv.proc.pid]
            api_cpu0, workers_cpu0 = cpu_seconds(srv.proc.pid), sum(cpu_seconds(p) for p in workers)
            by_s, lat = run_batchyard(inp, srv.base_url, wd / "by-out.jsonl", not a.no_probe)
            api_cpu = cpu_seconds(srv.proc.pid) - api_cpu0
            workers_cpu = sum(cpu_seconds(p) for p in workers) - workers_cpu0
    n_ref = (wd / "ref-out.jsonl").read_bytes().count(b"\n")
    n_by = (wd / "by-out.jsonl").read_bytes().count(b"\n")
    assert n_ref == n_by == a.lines, (n_ref, n_by)
    print(f"reference loop : {a.lines / ref_s:8.0f} lines/s ({ref_s:.2f}s)")
    print(
        f"batchyard e2e  : {a.lines / by_s:8.0f} lines/s ({by_s:.2f}s, upload+validate+run+finalize+download)"
    )
    print(f"P1 ratio batchyard/reference: {ref_s / by_s:.2f}  (goal >= 0.8)")
    per_line = 1e6 / a.lines
    print(
        f"CPU per line: reference {ref_cpu * per_line:.0f} us (its interpreter start included); batchyard worker "
        f"process(es) {workers_cpu * per_line:.0f} us (validation, execution, finalization), API "
        f"{api_cpu * per_line:.0f} us (upload, polling, download)"
    )
    if lat:
        lat.sort()
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        print(
            f"P4 GET /v1/batches/{{id}} while running: n={len(lat)} median={statistics.median(lat) * 1e3:.1f} ms "
            f"p99={p99 * 1e3:.1f} ms (goal < 25 ms)"
        )


if __name__ == "__main__":
    main()
