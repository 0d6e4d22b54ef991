"""Where `--concurrency auto` sits against a small real engine: llama.cpp's server (`xllamacpp.Server`, SmolLM2-135M,
4 slots) fresh, one batch through batchyard, and the lanes and concurrency limit its running shard reports in the
worker's debug log (one line a heartbeat).

    python bench/adaptive_on_engine.py [--lines 120]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BatchyardServer
from prefix_engine import SLOTS, Engine, make_file

from batchyard.embedded.models import ensure_smollm2

BEAT = re.compile(r"(\d+) done, (\d+) lanes, concurrency limit (\d+)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=120)
    args = ap.parse_args()
    model = ensure_smollm2()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path = work / "batch.jsonl"
        make_file(path, args.lines, args.lines, 60)  # no shared prefix
        args_ = ("--log-level", "debug")
        with Engine(model, "on") as eng, BatchyardServer(work, "--upstream", eng.base_url, *args_) as srv:
            client = OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
            f = client.files.create(file=path.open("rb"), purpose="batch")
            b = client.batches.create(
                input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            started = time.perf_counter()
            while b.status not in ("completed", "failed", "expired", "cancelled"):
                time.sleep(0.5)
                b = client.batches.retrieve(b.id)
            took = time.perf_counter() - started
            beats = BEAT.findall((work / "server.log").read_text())
    print(f"{b.status} in {took:.1f} s; the engine has {SLOTS} slots; heartbeats (done, lanes, limit):")
    for done, lanes, limit in beats:
        print(f"  {done:>5} done  {lanes:>4} lanes  limit {limit}")


if __name__ == "__main__":
    main()
