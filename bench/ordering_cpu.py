"""CPU a line of a shard's prefix ordering (`prefix_order` + `PrefixScheduler`), on shards of 1,000 lines of the P1
file fresh from the parser, as `ShardRunner` opens them.

    python bench/ordering_cpu.py [--lines 50000] [--line-bytes 4000]
    PYTHONPATH=<an export of another commit>/src python bench/ordering_cpu.py   # the same on that code
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson
from common import make_input, workdir

from batchyard.domain.ordering import PrefixScheduler, prefix_order


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=50_000)
    ap.add_argument("--line-bytes", type=int, default=4000)
    a = ap.parse_args()
    inp = workdir() / "input.jsonl"
    make_input(inp, a.lines, a.line_bytes)
    spent = 0.0
    with open(inp, "rb") as f:
        while shard := [orjson.loads(raw) for raw in itertools.islice(f, 1000)]:
            t0 = time.process_time()
            PrefixScheduler(prefix_order(shard))
            spent += time.process_time() - t0
    inp.unlink()
    print(f"prefix ordering: {spent / a.lines * 1e6:.2f} us CPU a line")


if __name__ == "__main__":
    main()
