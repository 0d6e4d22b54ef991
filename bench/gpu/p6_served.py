"""The served side of the P6 stand-in: `transformers serve --continuous-batching`, batchyard in front of it, and
the two ways a file goes through: a batch (openai SDK, upload -> output) or straight to the engine."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from p6_common import Budget, PhaseError, Procs, brief, cb_flags, free_port, tail, wait_http


def usage_totals(bodies: list[dict[str, Any]]) -> tuple[int, int, bool]:
    p = c = 0
    exact = True
    for b in bodies:
        u = b.get("usage") or {}
        p += int(u.get("prompt_tokens", 0))
        cc = int(u.get("completion_tokens", 0))
        c += cc
        exact = exact and cc == b.get("_max_tokens", cc)
    return p, c, exact


def drive(base: str, path: Path, concurrency: int, timeout: float) -> dict[str, Any]:
    return asyncio.run(
        _drive(base, [json.loads(x) for x in path.read_text().splitlines()], concurrency, timeout)
    )


async def _drive(base: str, reqs: list[dict[str, Any]], concurrency: int, timeout: float) -> dict[str, Any]:
    import aiohttp  # batchyard's own dependency, and in the GPU machine's image; lighter than httpx at 1,000 in flight

    todo = iter(reqs)
    bodies: list[dict[str, Any]] = []
    errors: list[str] = []
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as client:

        async def lane() -> None:
            for r in todo:
                async with client.post(base + "/chat/completions", json=r["body"]) as resp:
                    if resp.status != 200:
                        errors.append(f"{resp.status} {(await resp.text())[:200]}")
                        continue
                    body = await resp.json()
                body["_max_tokens"] = r["body"]["max_tokens"]
                bodies.append(body)

        t0 = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(min(concurrency, len(reqs)))))
        took = time.perf_counter() - t0
    p, c, exact = usage_totals(bodies)
    return {
        "lines": len(reqs),
        "ok_lines": len(bodies),
        "errors": errors[:3],
        "error_lines": len(errors),
        "prompt_tokens": p,
        "completion_tokens": c,
        "all_max_tokens": exact,
        "wall_s": round(took, 3),
    }


def through_batchyard(base: str, path: Path, limit: float) -> dict[str, Any]:
    from openai import OpenAI

    client = OpenAI(base_url=base, api_key="p6", max_retries=0, timeout=max(limit, 30))
    n = sum(1 for _ in path.open())
    t0 = time.perf_counter()
    with path.open("rb") as fh:
        f = client.files.create(file=fh, purpose="batch")
    t_up = time.perf_counter()
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        if time.perf_counter() - t0 > limit:
            with contextlib.suppress(Exception):
                client.batches.cancel(b.id)
            raise PhaseError(f"batch {b.id} still {b.status} after {limit:.0f}s (limit): {b.request_counts}")
        time.sleep(0.1)
        b = client.batches.retrieve(b.id)
    t_done = time.perf_counter()
    out = client.files.content(b.output_file_id).text if b.output_file_id else ""
    t_out = time.perf_counter()
    err = client.files.content(b.error_file_id).text if b.error_file_id else ""
    bodies = []
    max_tokens = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        max_tokens[r["custom_id"]] = r["body"]["max_tokens"]
    ids = []
    for line in out.splitlines():
        rec = json.loads(line)
        ids.append(rec["custom_id"])
        resp = rec.get("response") or {}
        if resp.get("status_code") == 200:
            body = resp["body"]
            body["_max_tokens"] = max_tokens.get(rec["custom_id"])
            bodies.append(body)
    err_lines = err.splitlines()
    ids += [json.loads(x)["custom_id"] for x in err_lines]
    p, c, exact = usage_totals(bodies)
    return {
        "status": b.status,
        "lines": n,
        "ok_lines": len(bodies),
        "error_lines": len(err_lines) + (len(ids) - len(err_lines) - len(bodies)),
        "errors": [x[:300] for x in err_lines[:3]],
        "each_id_once": sorted(ids) == sorted(max_tokens),
        "prompt_tokens": p,
        "completion_tokens": c,
        "all_max_tokens": exact,
        "upload_s": round(t_up - t0, 3),
        "create_to_completed_s": round(t_done - t_up, 3),
        "wall_s": round(t_out - t0, 3),  # upload -> output downloaded: what the ratio uses
    }


class Engine:
    """`transformers serve MODEL_DIR --continuous-batching` on loopback, the model preloaded, warmed up."""

    def __init__(self, a: argparse.Namespace, wd: Path, procs: Procs) -> None:
        self.port = free_port()
        self.cmd = [a.tf_python, "-m", "transformers.cli.transformers", "serve", str(wd / "model")]
        self.cmd += ["--continuous-batching", "--host", "127.0.0.1", "--port", str(self.port)]
        self.cmd += ["--device", a.device, "--log-level", "warning", *cb_flags(a)]
        self.log = wd / "transformers-serve.log"
        self.proc = procs.start(self.cmd, self.log)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def ready(self, limit: float) -> float:
        return wait_http(f"http://127.0.0.1:{self.port}/health", limit, self.proc, self.log, "serve")

    def warm_up(self, path: Path, concurrency: int, limit: float) -> dict[str, Any]:
        warm = drive(self.url, path, concurrency, limit)
        if warm["error_lines"]:
            raise PhaseError(
                f"warm-up: {warm['error_lines']} requests failed: {warm['errors']}; log:\n{tail(self.log)}"
            )
        return warm


class Batchyards:
    """One `batchyard serve --upstream ENGINE` at a time, with prefix ordering on or off."""

    def __init__(self, a: argparse.Namespace, wd: Path, procs: Procs, budget: Budget, engine: str) -> None:
        self.a, self.wd, self.procs, self.budget, self.engine = a, wd, procs, budget, engine
        self.running: tuple[bool, subprocess.Popen[bytes], str] | None = None

    def url(self, ordering: bool) -> str:
        if self.running is not None:
            if self.running[0] == ordering:
                return self.running[2]
            self.procs.stop(self.running[1])
            self.running = None
        port = free_port()
        data = self.wd / f"batchyard-data-{'order' if ordering else 'noorder'}"
        cmd = [
            sys.executable,
            "-m",
            "batchyard.cli.main",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(data),
        ]
        cmd += [
            "--upstream",
            self.engine,
            "--concurrency",
            str(self.a.concurrency),
            "--attempt-timeout",
            "900",
        ]
        cmd += ["--log-level", "warning", "--prefix-ordering" if ordering else "--no-prefix-ordering"]
        cmd += self.a.batchyard_arg
        log = self.wd / "batchyard.log"
        proc = self.procs.start(cmd, log)
        wait_http(
            f"http://127.0.0.1:{port}/health", self.budget.limit(60, "batchyard"), proc, log, "batchyard"
        )
        self.running = (ordering, proc, f"http://127.0.0.1:{port}/v1")
        return self.running[2]


def serve_side(
    a: argparse.Namespace, wd: Path, files: dict[str, Path], procs: Procs, budget: Budget, ref: dict[str, Any]
) -> dict[str, Any]:
    """Every variant through the server (after its start and warm-up, not counted): {runs, errors, ...}."""
    res: dict[str, Any] = {"runs": {}, "errors": []}
    engine = Engine(a, wd, procs)
    res["serve_cmd"] = " ".join(engine.cmd)
    res["serve_start_s"] = round(engine.ready(budget.limit(a.serve_start_s, "serve")), 2)
    t0 = time.perf_counter()
    warm = engine.warm_up(files["warmup"], a.concurrency, budget.limit(a.serve_start_s, "warm-up"))
    res["warmup"] = {**warm, "wall_s": round(time.perf_counter() - t0, 2)}
    print(f"transformers serve up in {res['serve_start_s']}s, warm-up {res['warmup']['wall_s']}s", flush=True)
    batchyards = Batchyards(a, wd, procs, budget, engine.url)
    for v in a.variants:
        r_ref = (ref.get("files") or {}).get(files[v].name) or {}
        # a run gets a few times the reference's generation time (and at least a minute), within the budget
        limit_s = max(60.0, 6 * float(r_ref.get("gen_s") or 30.0) + 30)
        try:
            limit = budget.limit(limit_s, v)
            if v.endswith("-direct"):
                run = drive(engine.url, files[v], a.concurrency, limit)
            else:
                run = through_batchyard(batchyards.url(not v.endswith("-noorder")), files[v], limit)
        except Exception as e:  # one variant's failure (a phase limit, an HTTP error) ends that variant alone
            res["errors"].append(f"{v}: {type(e).__name__}: {brief(e)}")
            print(f"ERROR {e}", flush=True)
            continue
        res["runs"][v] = run
        print(f"{v}: {json.dumps(run)}", flush=True)
    return res
