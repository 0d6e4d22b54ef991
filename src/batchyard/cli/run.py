"""`batchyard run`: one-shot mode. INPUT.jsonl -> OUTPUT.jsonl through the same validator, shards and line formats as
the server, without HTTP. State lives beside the output (`OUTPUT.jsonl.batchyard/`), so an interrupted run started
again with the same input and output continues where it stopped; the state is removed once the output is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from batchyard import ids
from batchyard.blobs.local import LocalBlobStore
from batchyard.cli.outcome import ErrorTally
from batchyard.cli.progress import ProgressBar
from batchyard.config import Settings
from batchyard.domain.models import BatchRecord, FileRecord
from batchyard.domain.states import TERMINAL, BatchStatus
from batchyard.execution.worker import Worker
from batchyard.store.sqlite import SQLiteStore
from batchyard.upstreams.factory import build_router

log = logging.getLogger("batchyard.run")
OWNER = "run"
WINDOW_S = 7 * 24 * 3600


@dataclass
class RunResult:
    status: str
    completed: int
    failed: int
    errors: list[dict[str, object]]  # a failed validation's errors
    tally: ErrorTally = field(default_factory=ErrorTally)  # the error lines by code


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _endpoint_of(path: Path) -> str:
    """The url of the first line that has one (the validator then checks every line against it)."""
    with open(path, "rb") as fh:
        for raw in fh:
            if raw.strip():
                with contextlib.suppress(orjson.JSONDecodeError):
                    obj = orjson.loads(raw)
                    if isinstance(obj, dict) and isinstance(obj.get("url"), str):
                        return str(obj["url"])
                break
    return "/v1/chat/completions"


async def _start_batch(store: SQLiteStore, blobs: LocalBlobStore, inp: Path, digest: str) -> str:
    fid = ids.file_id()
    writer = await blobs.open_writer(f"files/{fid}")
    with open(inp, "rb") as fh:
        while chunk := await asyncio.to_thread(fh.read, 1 << 20):
            await writer.write(chunk)
    info = await writer.commit()
    now = int(await store.now())
    await store.insert_file(
        FileRecord(
            id=fid,
            owner=OWNER,
            bytes=info.size,
            created_at=now,
            filename=inp.name,
            purpose="batch",
            blob_key=info.key,
            sha256=info.sha256,
        )
    )
    bid = ids.batch_id()
    await store.insert_batch(
        BatchRecord(
            id=bid,
            owner=OWNER,
            endpoint=_endpoint_of(inp),
            input_file_id=fid,
            completion_window="7d",
            status=BatchStatus.VALIDATING,
            created_at=now,
            expires_at=now + WINDOW_S,
            metadata={"input_sha256": digest},
        )
    )
    return bid


async def _write_outputs(
    store: SQLiteStore, blobs: LocalBlobStore, batch: BatchRecord, out: Path, errors: Path | None
) -> None:
    """Write the output file (and the error file, or error lines after the outputs when no --errors), atomically."""
    targets: list[tuple[Path, list[str | None]]] = []
    if errors is None:
        targets.append((out, [batch.output_file_id, batch.error_file_id]))
    else:
        targets.append((out, [batch.output_file_id]))
        targets.append((errors, [batch.error_file_id]))
    for path, file_ids in targets:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            for fid in file_ids:
                if fid is None:
                    continue
                rec = await store.get_file(OWNER, fid)
                if rec is None:
                    continue
                async for chunk in blobs.stream(rec.blob_key):
                    await asyncio.to_thread(fh.write, chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


async def run_file(
    inp: Path, out: Path, errors: Path | None, settings: Settings, quiet: bool = False
) -> RunResult:
    state = out.with_name(out.name + ".batchyard")
    state.mkdir(parents=True, exist_ok=True)
    lock = open(state / "lock", "w")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise SystemExit(f"another `batchyard run` is writing {out}") from None
    settings = settings.replace(data_dir=state)
    store = SQLiteStore(settings.database_path)
    blobs = LocalBlobStore(settings.blob_root)
    router = build_router(settings)
    await store.open()
    try:
        await store.release_all()  # we hold the lock: any lease left is from an interrupted run
        digest = await asyncio.to_thread(_sha256, inp)
        page = await store.list_batches(OWNER, limit=1, after=None)
        batch = page.items[0] if page.items else None
        if batch is None or (batch.metadata or {}).get("input_sha256") != digest:
            if batch is not None and not quiet:
                print(f"{out}: the input changed since the interrupted run; starting over", file=sys.stderr)
            await store.close()
            shutil.rmtree(state / "blobs", ignore_errors=True)
            for f in state.glob("batchyard.sqlite3*"):
                f.unlink()
            store = SQLiteStore(settings.database_path)
            await store.open()
            bid = await _start_batch(store, blobs, inp, digest)
        else:
            bid = batch.id
            if not quiet:
                print(
                    f"resuming {bid} ({batch.completed + batch.failed}/{batch.total} lines done)",
                    file=sys.stderr,
                )
        worker = Worker(store, blobs, router, settings)
        final = await _drive(worker, store, bid, quiet)
        if final.status == BatchStatus.FAILED:  # nothing to resume: the state goes as after a finished run
            result = RunResult(str(final.status), 0, 0, (final.errors or []))
        else:
            await _write_outputs(store, blobs, final, out, errors)
            result = RunResult(str(final.status), final.completed, final.failed, [])
            if final.failed:
                result.tally = await _tally(store, blobs, final.error_file_id)
    finally:
        await store.close()
        await router.aclose()
    shutil.rmtree(state, ignore_errors=True)
    lock.close()
    return result


async def _tally(store: SQLiteStore, blobs: LocalBlobStore, file_id: str | None) -> ErrorTally:
    """The error file's lines counted by code."""
    tally = ErrorTally()
    rec = await store.get_file(OWNER, file_id) if file_id else None
    if rec is None:
        return tally
    rest = b""
    async for chunk in blobs.stream(rec.blob_key):
        *whole, rest = (rest + chunk).split(b"\n")
        tally.add_lines(whole)
    tally.add_lines([rest])
    return tally


async def _drive(worker: Worker, store: SQLiteStore, bid: str, quiet: bool) -> BatchRecord:
    await worker.router.start()
    task = asyncio.create_task(worker.run(), name="worker")
    bar: ProgressBar | None = None
    try:
        while True:
            b = await store.get_batch(OWNER, bid)
            assert b is not None
            if task.done():
                task.result()  # re-raise the worker's failure
            if not quiet and b.total and bar is None:
                bar = ProgressBar(b.total, "batchyard run")
            if bar is not None:
                bar.update(b.completed + b.failed, b.failed, str(b.status))
            if b.status in TERMINAL:
                return b
            await asyncio.sleep(0.2)
    finally:
        if bar is not None:
            bar.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def print_errors(errors: list[dict[str, object]]) -> None:
    for e in errors:
        where = f"line {e.get('line')}" if e.get("line") is not None else "file"
        param = f" ({e['param']})" if e.get("param") else ""
        print(f"  {where}: {e.get('code')}{param}: {e.get('message')}", file=sys.stderr)
