"""Prefix ordering against a real engine: llama.cpp's own HTTP server (`xllamacpp.Server`, the binding the embedded
engine uses) serving SmolLM2-135M on this machine's CPU, a fresh engine for every run.

    python bench/prefix_engine.py [--lines 160] [--groups 8] [--prompt-words 450] [--cache on,off] [--random 48]
                                  [--shard-lines N] [--baseline-src DIR]

Runs, for each RAM prompt-cache setting of the engine (`cache_ram_mib` default = on, 0 = off):
- direct: the engine driven by a minimal client in file order, as many requests in flight as it has slots;
- batchyard --no-prefix-ordering, and batchyard with its prefix ordering (the default), both with --concurrency
  equal to the slots, the file uploaded and the output downloaded through the API;
on a chat file whose lines share `--groups` system prompts of ~600 tokens (lines shuffled, `max_tokens` 16), and
(with the cache on) a file of `--random` lines with no shared prefix. Prints wall seconds, the ratios to file order in
the same run, and the share of prompt tokens the engine answered from its cache (`usage`).

`--shard-lines N` cuts the file into shards of N lines (batchyard's default is 1,000: a 160-line file is one shard),
which is how a large file meets prefix ordering: each shard holds some lines of every prompt. `--baseline-src DIR`
adds a run of batchyard from another source tree (`PYTHONPATH=DIR`, e.g. an export of an earlier commit) with its
prefix ordering, for a before/after in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import BatchyardServer
from tests.support.llama_server import SLOTS
from tests.support.llama_server import LlamaServer as Engine

from batchyard.embedded.models import ensure_smollm2

WORDS = [
    "river",
    "mountain",
    "quiet",
    "engine",
    "answer",
    "carefully",
    "history",
    "science",
    "bright",
    "window",
    "garden",
    "story",
    "market",
    "simple",
    "winter",
    "summer",
    "number",
    "letter",
    "friend",
    "travel",
    "ocean",
    "forest",
    "music",
    "paper",
    "light",
    "shadow",
    "country",
    "city",
    "village",
    "question",
    "problem",
    "reason",
    "method",
    "result",
    "system",
    "process",
    "value",
    "change",
    "order",
    "pattern",
    "signal",
    "record",
    "detail",
]


@dataclass
class Run:
    name: str
    seconds: float
    prompt_tokens: int
    cached_tokens: int

    @property
    def cached_share(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def system_prompt(rng: random.Random, words: int, tag: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"You are assistant number {tag}. Follow these notes: {text}"


def make_file(path: Path, lines: int, groups: int, words: int, seed: int = 7) -> None:
    """`lines` chat requests over `groups` distinct system prompts (groups == lines: no shared prefix), shuffled."""
    rng = random.Random(seed)
    prompts = [system_prompt(rng, words, g) for g in range(groups)]
    reqs = []
    for i in range(lines):
        body = {
            "model": "smollm2",
            "max_tokens": 16,
            "temperature": 0,
            "messages": [
                {"role": "system", "content": prompts[i % groups]},
                {"role": "user", "content": f"Question {i}: name one {rng.choice(WORDS)}."},
            ],
        }
        reqs.append({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    rng.shuffle(reqs)
    path.write_text("".join(json.dumps(r) + "\n" for r in reqs))


def usage_of(body: dict[str, Any]) -> tuple[int, int]:
    u = body.get("usage") or {}
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is None:
        cached = (body.get("timings") or {}).get("cache_n", 0)
    return int(u.get("prompt_tokens", 0)), int(cached or 0)


async def drive_direct(base_url: str, lines: list[dict[str, Any]]) -> tuple[int, int]:
    todo = iter(lines)
    totals = [0, 0]
    async with httpx.AsyncClient(timeout=600) as client:

        async def lane() -> None:
            for req in todo:
                r = await client.post(base_url + "/chat/completions", json=req["body"])
                r.raise_for_status()
                p, c = usage_of(r.json())
                totals[0] += p
                totals[1] += c

        await asyncio.gather(*(lane() for _ in range(SLOTS)))
    return totals[0], totals[1]


def direct(model: Path, cache: str, path: Path) -> Run:
    with Engine(model, cache) as eng:
        t0 = time.perf_counter()
        p, c = asyncio.run(drive_direct(eng.base_url, [json.loads(x) for x in path.read_text().splitlines()]))
        return Run("direct, file order", time.perf_counter() - t0, p, c)


def through_batchyard(
    model: Path,
    cache: str,
    path: Path,
    ordering: bool,
    work: Path,
    shard_lines: int | None = None,
    src: str | None = None,
) -> Run:
    flag = "--prefix-ordering" if ordering else "--no-prefix-ordering"
    env = None if src is None else {**os.environ, "PYTHONPATH": src}
    with Engine(model, cache) as eng, tempfile.TemporaryDirectory(dir=work) as d:
        args = ["--upstream", eng.base_url, "--concurrency", str(SLOTS), flag, "--attempt-timeout", "900"]
        if shard_lines:
            args += ["--shard-lines", str(shard_lines)]
        with BatchyardServer(Path(d), *args, env=env) as srv:
            client = OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=900)
            t0 = time.perf_counter()
            f = client.files.create(file=path.open("rb"), purpose="batch")
            b = client.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            while b.status not in ("completed", "failed", "expired", "cancelled"):
                time.sleep(0.2)
                b = client.batches.retrieve(b.id)
            assert b.status == "completed" and b.output_file_id, b
            out = client.files.content(b.output_file_id).text
            took = time.perf_counter() - t0
    p = c = 0
    ok = 0
    for line in out.splitlines():
        rec = json.loads(line)
        pp, cc = usage_of(rec["response"]["body"])
        p, c, ok = p + pp, c + cc, ok + 1
    assert b.request_counts is not None and b.request_counts.failed == 0, b.request_counts
    name = "batchyard, prefix ordering" if ordering else "batchyard, --no-prefix-ordering"
    if src is not None:
        name += f" ({Path(src).parent.name})"
    return Run(name, took, p, c)


def show(title: str, runs: list[Run]) -> None:
    base = runs[0].seconds
    print(f"\n{title}")
    for r in runs:
        print(
            f"  {r.name:34} {r.seconds:7.1f} s   {base / r.seconds:5.2f}x file order   "
            f"cached {r.cached_share * 100:5.1f}% of {r.prompt_tokens} prompt tokens",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=160)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--prompt-words", type=int, default=450)  # ~600 tokens with the system prompt's frame
    ap.add_argument("--cache", default="on,off")
    ap.add_argument(
        "--random", type=int, default=48, help="lines of the file with no shared prefix (0: skip)"
    )
    ap.add_argument("--only", default="direct,off,on")
    ap.add_argument("--shard-lines", type=int, default=None)
    ap.add_argument(
        "--baseline-src", default=None, help="another source tree to run as well (its src/ folder)"
    )
    args = ap.parse_args()
    sl = args.shard_lines
    model = ensure_smollm2()
    which = args.only.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shared = work / "shared.jsonl"
        make_file(shared, args.lines, args.groups, args.prompt_words)
        for cache in args.cache.split(",") if args.lines else []:  # --lines 0: the random file alone
            runs = []
            if "direct" in which:
                runs.append(direct(model, cache, shared))
            if "off" in which:
                runs.append(through_batchyard(model, cache, shared, False, work, sl))
            if args.baseline_src:
                runs.append(through_batchyard(model, cache, shared, True, work, sl, args.baseline_src))
            if "on" in which:
                runs.append(through_batchyard(model, cache, shared, True, work, sl))
            shards = f", shards of {sl} lines" if sl else ""
            show(
                f"{args.lines} lines over {args.groups} shared system prompts{shards}, engine RAM prompt cache {cache}",
                runs,
            )
        if args.random:
            rand = work / "random.jsonl"
            make_file(rand, args.random, args.random, args.prompt_words // 3)
            runs = [direct(model, "on", rand)]
            if args.baseline_src:
                runs.append(through_batchyard(model, "on", rand, True, work, sl, args.baseline_src))
            runs.append(through_batchyard(model, "on", rand, True, work, sl))
            show(f"{args.random} lines, no shared prefix, RAM prompt cache on", runs)


if __name__ == "__main__":
    main()
