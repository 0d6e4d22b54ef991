"""P6 on a GPU without vLLM: `transformers serve` (continuous batching) behind batchyard, against transformers'
own offline batch generation (`generate_batch`) on the same prompts, with a model built on the spot.

    python bench/gpu/p6_transformers.py [--out DIR]      # on the GPU machine (bench/gpu/run_transformers.sh)
    python bench/gpu/p6_transformers.py --dry-run        # the same path on the CPU, tiny model, in ~2 minutes

Phases, each with its own time limit inside an overall budget (--budget-s):
1. inputs: one chat file per variant (below), each with its own prompts (a prompt seen by an engine once is in its
   prefix cache: no two runs share one); max_tokens fixed, temperature 0; the model has no EOS token, so every
   request generates exactly max_tokens tokens on both sides.
2. build (tf_side.py build): a byte-level BPE tokenizer trained on the prompts' text, a Qwen2-shaped model with
   random weights (Qwen2.5-0.5B's shape on the GPU, hidden 64 and 2 layers for --dry-run), saved to a directory.
3. reference (tf_side.py reference, its own process, which frees the GPU when it exits): `generate_batch` over every
   variant's file; timed from the first request's arrival to the last one's end (the load and the continuous
   batching warm-up not counted).
4. `transformers serve MODEL_DIR --continuous-batching` on 127.0.0.1, warmed up with a burst of unrelated requests.
5. batchyard serve --upstream http://127.0.0.1:PORT/v1 (SQLite + a local directory); each batch variant's file
   goes through the openai SDK: upload -> create -> completed -> output downloaded (the ratio is timed over all of
   it); the direct variants drive `transformers serve` itself with the same number of requests in flight.

Variants: prefix (8 system prompts of ~600 tokens shared by all lines, shuffled), random (no shared prefix),
prefix-noorder (batchyard --no-prefix-ordering), prefix-direct and random-direct (no batchyard). The results go to
OUT/p6_transformers.json and OUT/p6_transformers.md (a markdown table); the last line printed is the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GOAL = 0.95  # P6's goal against vLLM's own batch runner, applied to this stand-in too
VARIANTS = ("prefix", "random", "prefix-direct", "random-direct", "prefix-noorder")
_WORDS = (
    "river stone light window garden market engine signal harbor lantern mountain letter pattern music silver "
    "forest number bridge machine winter summer island museum paper rocket planet history science ocean valley "
    "village castle desert library kitchen doctor teacher farmer pilot sailor painter student friend stranger "
    "morning evening shadow mirror thunder candle feather crystal meadow canyon glacier volcano comet orbit "
    "circuit network database compiler protocol archive ledger contract budget invoice report summary outline "
    "draft review answer question method reason result example detail record change order value system design "
    "careful quick gentle bright quiet ancient modern simple complex hidden open narrow broad steady rapid calm "
    "explain describe compare remember imagine consider measure collect arrange follow write read build carry"
)
WORDS = _WORDS.split()


class PhaseError(RuntimeError):
    pass


class Procs:
    """Every process the bench starts, each in its own process group, stopped together at the end."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log, "ab") as fh:
            fh.write(("$ " + " ".join(cmd) + "\n").encode())
            fh.flush()
            p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.running.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # stragglers left in its group
            os.killpg(p.pid, signal.SIGKILL)
        if p in self.running:
            self.running.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self.running)):
            self.stop(p, grace=5.0)


class Budget:
    def __init__(self, total: float) -> None:
        self.total = total
        self.t0 = time.monotonic()

    def left(self) -> float:
        return self.total - (time.monotonic() - self.t0)

    def limit(self, phase_s: float, name: str) -> float:
        left = self.left()
        if left < 5:
            raise PhaseError(f"{name}: skipped, the overall budget is spent")
        return min(phase_s, left)


def brief(e: Exception) -> str:
    """An error's first line and the last line of the log it carries: what the summary keeps."""
    lines = [x for x in str(e).splitlines() if x.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1].strip()[:300]}"


def tail(path: Path, n: int = 2500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def run_phase(procs: Procs, name: str, cmd: list[str], log: Path, limit: float) -> float:
    """Run `cmd` to its end within `limit` seconds; its wall time."""
    t0 = time.perf_counter()
    p = procs.start(cmd, log)
    try:
        rc = p.wait(limit)
    except subprocess.TimeoutExpired:
        procs.stop(p)
        raise PhaseError(f"{name}: still running after {limit:.0f}s (limit); log:\n{tail(log)}") from None
    procs.stop(p)
    if rc != 0:
        raise PhaseError(f"{name}: exit status {rc}; log:\n{tail(log)}")
    return time.perf_counter() - t0


def wait_http(url: str, limit: float, proc: subprocess.Popen[bytes], log: Path, name: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if proc.poll() is not None:
            raise PhaseError(f"{name}: exited with {proc.returncode} before answering; log:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.25)
    raise PhaseError(f"{name}: {url} not answering 200 after {limit:.0f}s; log:\n{tail(log)}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------------


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_file(path: Path, variant: str, a: argparse.Namespace, model: str, seed: int) -> None:
    """`a.n` chat lines: over `a.groups` shared system prompts (prefix variants), shuffled, or each with its own."""
    rng = random.Random(seed)
    shared = variant.startswith("prefix")
    systems = [f"You are assistant {g}. Notes: {words(rng, a.prefix_words)}" for g in range(a.groups)]
    lines = []
    for i in range(a.n):
        system = (
            systems[i % a.groups] if shared else f"You are assistant {i}. Notes: {words(rng, a.prefix_words)}"
        )
        body = {
            "model": model,
            "max_tokens": a.max_tokens,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Question {i}: {words(rng, a.question_words)}?"},
            ],
        }
        lines.append(
            {"custom_id": f"{variant}-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
        )
    rng.shuffle(lines)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def write_inputs(a: argparse.Namespace, wd: Path, model: str) -> dict[str, Path]:
    files = {}
    for k, v in enumerate(a.variants):
        files[v] = wd / f"{v}.jsonl"
        make_file(files[v], v, a, model, a.seed + 1000 * k)
    # the server's warm-up: as many requests as will be in flight, prompts of the same length (its continuous
    # batching captures CUDA graphs per batch shape as they come; generate_batch captures them before it starts),
    # none shared with a measured file
    warm = wd / "warmup.jsonl"
    wa = argparse.Namespace(**{**vars(a), "n": min(a.concurrency, a.n), "max_tokens": 16})
    make_file(warm, "warmup", wa, model, a.seed + 99)
    files["warmup"] = warm
    with open(wd / "corpus.txt", "w") as fh:  # what the tokenizer is trained on
        fh.write("<|system|>\n<|user|>\n<|assistant|>\n")
        for f in files.values():
            for line in f.read_text().splitlines():
                for m in json.loads(line)["body"]["messages"]:
                    fh.write(m["content"] + "\n")
    return files


# ------------------------------------------------------------------------------------------------------------
# the served side
# ------------------------------------------------------------------------------------------------------------


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


def serve_side(
    a: argparse.Namespace, wd: Path, files: dict[str, Path], procs: Procs, budget: Budget, ref: dict[str, Any]
) -> dict[str, Any]:
    res: dict[str, Any] = {"runs": {}, "errors": []}
    model = str(wd / "model")
    port = free_port()
    cmd = [a.tf_python, "-m", "transformers.cli.transformers", "serve", model, "--continuous-batching"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--device", a.device, "--log-level", "warning"]
    for opt in ("cb_block_size", "cb_num_blocks", "cb_max_batch_tokens", "cb_max_memory_percent"):
        if getattr(a, opt) is not None:
            cmd += ["--" + opt.replace("_", "-"), str(getattr(a, opt))]
    tlog = wd / "transformers-serve.log"
    tf = procs.start(cmd, tlog)
    res["serve_cmd"] = " ".join(cmd)
    res["serve_start_s"] = round(
        wait_http(
            f"http://127.0.0.1:{port}/health", budget.limit(a.serve_start_s, "serve"), tf, tlog, "serve"
        ),
        2,
    )
    engine = f"http://127.0.0.1:{port}/v1"
    t0 = time.perf_counter()
    warm = drive(engine, files["warmup"], a.concurrency, budget.limit(a.serve_start_s, "warm-up"))
    res["warmup"] = {**warm, "wall_s": round(time.perf_counter() - t0, 2)}
    if warm["error_lines"]:
        raise PhaseError(
            f"warm-up: {warm['error_lines']} requests failed: {warm['errors']}; log:\n{tail(tlog)}"
        )
    print(f"transformers serve up in {res['serve_start_s']}s, warm-up {res['warmup']['wall_s']}s", flush=True)

    by: dict[bool, tuple[subprocess.Popen[bytes], str]] = {}

    def batchyard(ordering: bool) -> str:
        if ordering in by:
            return by[ordering][1]
        for p, _ in by.values():  # one batchyard at a time
            procs.stop(p)
        by.clear()
        bport = free_port()
        data = wd / f"batchyard-data-{'order' if ordering else 'noorder'}"
        bcmd = [
            sys.executable,
            "-m",
            "batchyard.cli.main",
            "serve",
            "--port",
            str(bport),
            "--data-dir",
            str(data),
        ]
        bcmd += ["--upstream", engine, "--concurrency", str(a.concurrency), "--attempt-timeout", "900"]
        bcmd += ["--log-level", "warning", "--prefix-ordering" if ordering else "--no-prefix-ordering"]
        bcmd += a.batchyard_arg
        blog = wd / "batchyard.log"
        bp = procs.start(bcmd, blog)
        wait_http(
            f"http://127.0.0.1:{bport}/health", budget.limit(60, "batchyard serve"), bp, blog, "batchyard"
        )
        by[ordering] = (bp, f"http://127.0.0.1:{bport}/v1")
        return by[ordering][1]

    for v in a.variants:
        r_ref = (ref.get("files") or {}).get(files[v].name) or {}
        # a run gets a few times the reference's generation time (and at least a minute), within the budget
        limit_s = max(60.0, 6 * float(r_ref.get("gen_s") or 30.0) + 30)
        try:
            limit = budget.limit(limit_s, v)
            if v.endswith("-direct"):
                run = drive(engine, files[v], a.concurrency, limit)
            else:
                run = through_batchyard(batchyard(not v.endswith("-noorder")), files[v], limit)
        except Exception as e:  # one variant's failure (a phase limit, an HTTP error) ends that variant alone
            res["errors"].append(f"{v}: {type(e).__name__}: {brief(e)}")
            print(f"ERROR {e}", flush=True)
            continue
        res["runs"][v] = run
        print(f"{v}: {json.dumps(run)}", flush=True)
    return res


# ------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------


def rows(
    a: argparse.Namespace, ref: dict[str, Any], served: dict[str, Any], files: dict[str, Path]
) -> list[dict]:
    out = []
    for v in a.variants:
        r = (ref.get("files") or {}).get(files[v].name)
        s = (served.get("runs") or {}).get(v)
        row: dict[str, Any] = {"variant": v, "lines": a.n, "max_tokens": a.max_tokens}
        if r:
            row |= {
                "ref_prompt_tokens": r["prompt_tokens"],
                "ref_completion_tokens": r["completion_tokens"],
                "ref_gen_s": r["gen_s"],
                "ref_tok_s": r["tok_s"],
            }
        if s:
            tok_s = s["completion_tokens"] / s["wall_s"] if s["wall_s"] > 0 else None
            row |= {
                "served_prompt_tokens": s["prompt_tokens"],
                "served_completion_tokens": s["completion_tokens"],
                "served_wall_s": s["wall_s"],
                "served_tok_s": round(tok_s, 1) if tok_s else None,
                "served_ok_lines": s["ok_lines"],
                "served_error_lines": s["error_lines"],
            }
            if "create_to_completed_s" in s:
                row["create_to_completed_s"] = s["create_to_completed_s"]
                row["upload_s"] = s["upload_s"]
        if r and s:
            row["same_tokens"] = (
                r["prompt_tokens"] == s["prompt_tokens"] and r["completion_tokens"] == s["completion_tokens"]
            )
            row["ratio"] = (
                round(row["served_tok_s"] / r["tok_s"], 3) if row.get("served_tok_s") and r["tok_s"] else None
            )
            ok = s["ok_lines"] == a.n and not s["error_lines"] and s.get("each_id_once", True)
            row["ok"] = bool(ok and r["results"] == a.n and not r["failed"] and row["same_tokens"])
        out.append(row)
    by_name = {r["variant"]: r for r in out}
    for r in out:  # batchyard against the same engine driven directly: what batchyard itself costs
        d = by_name.get(r["variant"].split("-")[0] + "-direct")
        if d is not None and d is not r and r.get("served_tok_s") and d.get("served_tok_s"):
            r["ratio_vs_direct"] = round(r["served_tok_s"] / d["served_tok_s"], 3)
    return out


def markdown(a: argparse.Namespace, summary: dict[str, Any]) -> str:
    def f(x: Any, spec: str = "") -> str:
        return "—" if x is None else format(x, spec)

    head = (
        f"P6 (transformers stand-in), {summary['date']}, {summary.get('device') or '?'}, torch "
        f"{summary.get('torch') or '?'}, transformers {summary.get('transformers') or '?'} "
        f"(attention {summary.get('attn_implementation') or '?'}); model: "
        f"{summary.get('model_desc')}; {a.n} lines a file, max_tokens {a.max_tokens}, temperature 0, no EOS; "
        f"batchyard --concurrency {a.concurrency}{' (DRY RUN: tiny model on the CPU, not a measurement)' if a.dry_run else ''}"
    )
    lines = [
        head,
        "",
        "| variant | reference tok/s (gen s) | served: how | served tok/s (wall s) | ratio | vs direct | prompt / completion tokens | same tokens | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        how = (
            "direct to `transformers serve`"
            if r["variant"].endswith("-direct")
            else (
                "batchyard, upload→output"
                + (" (`--no-prefix-ordering`)" if r["variant"].endswith("-noorder") else "")
            )
        )
        lines.append(
            f"| {r['variant']} | {f(r.get('ref_tok_s'), ',.0f')} ({f(r.get('ref_gen_s'), '.2f')}) | {how} | "
            f"{f(r.get('served_tok_s'), ',.0f')} ({f(r.get('served_wall_s'), '.2f')}) | {f(r.get('ratio'), '.3f')} | "
            f"{f(r.get('ratio_vs_direct'), '.3f')} | "
            f"{f(r.get('ref_prompt_tokens'))} / {f(r.get('ref_completion_tokens'))} | {f(r.get('same_tokens'))} | "
            f"{f(r.get('ok'))} |"
        )
    if summary["errors"]:
        lines += ["", "Errors: " + "; ".join(summary["errors"])]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--dry-run", action="store_true", help="tiny model on the CPU, few lines: checks the path"
    )
    ap.add_argument("--out", help="where the JSON and markdown results go (default $OUT, else the work dir)")
    ap.add_argument("--workdir", help="inputs, model, logs (default: a new temp dir)")
    ap.add_argument("--n", type=int, help="lines a file (default 1000; --dry-run 8)")
    ap.add_argument(
        "--max-tokens", type=int, help="tokens generated by every request (default 128; --dry-run 8)"
    )
    ap.add_argument("--groups", type=int, default=8, help="shared system prompts in the prefix files")
    ap.add_argument(
        "--prefix-words", type=int, help="words a system prompt (~tokens; default 600; --dry-run 40)"
    )
    ap.add_argument("--question-words", type=int, default=20)
    ap.add_argument(
        "--concurrency",
        type=int,
        help="requests in flight, batchyard and direct (default 1000: a whole file, as generate_batch has it)",
    )
    ap.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, in order; of {VARIANTS}"
    )
    ap.add_argument(
        "--tf-python", default=sys.executable, help="the python with torch + transformers[serving]"
    )
    ap.add_argument("--device", help="transformers serve --device (default cuda:0; --dry-run cpu)")
    ap.add_argument("--budget-s", type=float, help="overall limit (default 440; --dry-run 170)")
    ap.add_argument("--build-s", type=float, default=150)
    ap.add_argument("--reference-s", type=float, default=200)
    ap.add_argument("--serve-start-s", type=float, default=150)
    ap.add_argument("--seed", type=int, default=1234)
    for opt in ("--cb-block-size", "--cb-num-blocks", "--cb-max-batch-tokens"):
        ap.add_argument(opt, type=int, help="continuous batching, both sides (default: transformers' own)")
    ap.add_argument("--cb-max-memory-percent", type=float)
    ap.add_argument("--batchyard-arg", action="append", default=[], help="more `batchyard serve` options")
    a = ap.parse_args(argv)
    dry = a.dry_run
    for k, gpu, cpu in (
        ("n", 1000, 8),
        ("max_tokens", 128, 8),
        ("prefix_words", 600, 40),
        ("concurrency", 1000, 4),
        ("device", "cuda:0", "cpu"),
        ("budget_s", 440.0, 170.0),
    ):
        if getattr(a, k) is None:
            setattr(a, k, cpu if dry else gpu)
    if dry:  # a small paged cache: transformers sizes it from the machine's memory otherwise (slow on a CPU)
        for k, v in (("cb_block_size", 32), ("cb_num_blocks", 256), ("cb_max_batch_tokens", 512)):
            if getattr(a, k) is None:
                setattr(a, k, v)
    a.variants = [v for v in a.variants.split(",") if v]
    if bad := [v for v in a.variants if v not in VARIANTS]:
        ap.error(f"unknown variants {bad}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    budget = Budget(a.budget_s)
    wd = Path(a.workdir or tempfile.mkdtemp(prefix="p6tf-"))
    wd.mkdir(parents=True, exist_ok=True)
    out = Path(a.out or os.environ.get("OUT") or wd)
    out.mkdir(parents=True, exist_ok=True)
    procs = Procs()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    errors: list[str] = []
    ref: dict[str, Any] = {}
    served: dict[str, Any] = {}
    build: dict[str, Any] = {}
    times: dict[str, float] = {}
    model = wd / "model"
    print(
        f"P6 transformers: work dir {wd}, results to {out}, budget {a.budget_s:.0f}s, variants {a.variants}"
    )
    try:
        files = write_inputs(a, wd, str(model))
        tf_env = [a.tf_python, str(HERE / "tf_side.py")]
        cpu = ["--cpu"] if a.device == "cpu" else []
        preset = "tiny" if a.dry_run else "gpu"
        cmd = [
            *tf_env,
            "build",
            "--dir",
            str(model),
            "--preset",
            preset,
            "--corpus",
            str(wd / "corpus.txt"),
            *cpu,
        ]
        times["build_s"] = run_phase(procs, "build", cmd, wd / "build.log", budget.limit(a.build_s, "build"))
        build = json.loads((model / "p6-build.json").read_text())
        print(f"built in {times['build_s']:.1f}s: {json.dumps(build)}", flush=True)
        cmd = [*tf_env, "reference", "--dir", str(model), "--max-tokens", str(a.max_tokens)]
        cmd += ["--result", str(wd / "reference.json"), "--device", a.device]
        for opt in ("cb_block_size", "cb_num_blocks", "cb_max_batch_tokens", "cb_max_memory_percent"):
            if getattr(a, opt) is not None:
                cmd += ["--" + opt.replace("_", "-"), str(getattr(a, opt))]
        cmd += [str(files[v]) for v in a.variants]
        try:
            times["reference_s"] = run_phase(
                procs, "reference", cmd, wd / "reference.log", budget.limit(a.reference_s, "reference")
            )
        except (
            PhaseError
        ) as e:  # the files it finished are kept; the served runs go on (the GPU is free again)
            errors.append(brief(e))
            print(f"ERROR {e}", flush=True)
        with contextlib.suppress(OSError, ValueError):
            ref = json.loads((wd / "reference.json").read_text())
        served = serve_side(a, wd, files, procs, budget, ref)
        errors += served.get("errors", [])
    except Exception as e:  # whatever stopped the run, the summary still says what was measured before it
        errors.append(brief(e) if isinstance(e, PhaseError) else f"{type(e).__name__}: {brief(e)}")
        print(f"ERROR {e}", flush=True)
    finally:
        procs.stop_all()
        if out.resolve() != wd.resolve():  # the logs travel with the results ($OUT on the GPU machine)
            for log in ("build.log", "reference.log", "transformers-serve.log", "batchyard.log"):
                with contextlib.suppress(OSError):
                    shutil.copyfile(wd / log, out / f"p6-{log}")
    files = {v: wd / f"{v}.jsonl" for v in a.variants}
    summary: dict[str, Any] = {
        "bench": "p6_transformers",
        "date": dt.date.today().isoformat(),
        "dry_run": a.dry_run,
        "device": ref.get("device"),
        "torch": ref.get("torch"),
        "transformers": ref.get("transformers"),
        "attn_implementation": ref.get("attn_implementation"),
        "model_desc": (
            f"Qwen2-shaped, {build['params'] / 1e6:.1f}M params, random weights, {build['dtype']}, tokenizer "
            f"vocab {build['vocab_tokenizer']} (model {build['vocab_model']})"
            if build
            else None
        ),
        "n": a.n,
        "max_tokens": a.max_tokens,
        "concurrency": a.concurrency,
        "cb": {k: getattr(a, k) for k in ("cb_block_size", "cb_num_blocks", "cb_max_batch_tokens")},
        "build": build,
        "reference_load_s": ref.get("load_s"),
        "phases_s": {k: round(v, 1) for k, v in times.items()},
        "serve_start_s": served.get("serve_start_s"),
        "warmup": served.get("warmup"),
        "rows": rows(a, ref, served, files),
        "errors": errors,
        "total_s": round(budget.total - budget.left(), 1),
        "goal": GOAL,
        "workdir": str(wd),
    }
    summary["ok"] = not errors and all(r.get("ok") for r in summary["rows"])
    md = markdown(a, summary)
    (out / "p6_transformers.md").write_text(md)
    line = json.dumps(summary)
    (out / "p6_transformers.json").write_text(line + "\n")
    print("\n" + md)
    print(line)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
