"""Shard commits per second on the SQLite store with `synchronous=NORMAL` against `FULL` (WAL both): the cost of
making every shard commit and status change survive a power loss (store/sqlite.py's docstring).

    python bench/sqlite_sync.py [--shards 300] [--dir /path/on/the/disk/to/measure]

Each round plans a batch of `--shards` one-line shards and claims and completes them one after the other (two
transactions a shard), on a fresh database; NORMAL and FULL alternate twice.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from batchyard.domain.models import BatchRecord, FileRecord, ShardResult, Usage
from batchyard.domain.states import BatchStatus
from batchyard.domain.validation import ShardPlan
from batchyard.store.sqlite import SQLiteStore


async def commits_per_second(mode: str, path: Path, shards: int) -> float:
    class Connection(sqlite3.Connection):
        def execute(
            self, sql: str, *args: Any
        ) -> sqlite3.Cursor:  # the store sets FULL: force the mode measured
            if sql.startswith("PRAGMA synchronous"):
                sql = f"PRAGMA synchronous={mode}"
            return super().execute(sql, *args)

    real = sqlite3.connect
    sqlite3.connect = lambda *a, **k: real(*a, factory=Connection, **k)  # type: ignore[assignment]
    store = SQLiteStore(path)
    try:
        await store.open()
    finally:
        sqlite3.connect = real  # type: ignore[assignment]
    now = int(time.time())
    f = FileRecord(
        id="file-1", owner="o", bytes=1, created_at=now, expires_at=None, filename="f", purpose="batch",
        blob_key="files/file-1", sha256="",
    )  # fmt: skip
    await store.insert_file(f)
    b = BatchRecord(
        id="batch_1", owner="o", endpoint="/v1/chat/completions", input_file_id=f.id, completion_window="24h",
        status=BatchStatus.VALIDATING, created_at=now, expires_at=now + 86400,
    )  # fmt: skip
    await store.insert_batch(b)
    assert await store.claim_validation("v", 30) is not None
    await store.plan_batch(b.id, "v", [ShardPlan(i, i, i + 1, i + 1, 1) for i in range(shards)], shards, "m")
    started = time.perf_counter()
    for i in range(shards):
        claim = await store.claim_shard("w", 30)
        assert claim is not None
        await store.complete_shard(claim, ShardResult(1, 0, Usage(), f"parts/{i}.out", None), 0)
    took = time.perf_counter() - started
    await store.close()
    return shards / took


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=300)
    ap.add_argument("--dir", default=None, help="where the databases go (the disk to measure)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for i, mode in enumerate(("NORMAL", "FULL", "NORMAL", "FULL")):
            rate = await commits_per_second(mode, Path(d) / f"{i}.sqlite3", args.shards)
            print(f"synchronous={mode:6}  {rate:5.0f} shard commits/s (claim + complete)", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
