"""API replicas (`serve --no-worker`) and separate `batchyard worker` processes sharing one store."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Server
from tests.support.batches import chat_line, read_lines, upload, wait_for
from tests.support.fake_upstream import FakeUpstream, expected_text
from tests.support.processes import WorkerProcess


@dataclass
class Backend:
    name: str
    args: list[str]  # --data-dir / --database-url / --storage-url
    env: dict[str, str]


@pytest.fixture(params=["sqlite+local", "postgres+s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite+local":
        return Backend(request.param, ["--data-dir", str(tmp_path / "shared")], {})
    cluster = request.getfixturevalue("pg_cluster")
    weed = request.getfixturevalue("seaweed")
    dsn = asyncio.run(cluster.create_database())
    prefix = uuid.uuid4().hex[:12]
    args = [
        "--data-dir",
        str(tmp_path / "local"),
        "--database-url",
        dsn,
        "--storage-url",
        f"s3://{weed.bucket}/{prefix}",
    ]
    return Backend(request.param, args, {**os.environ, **weed.env()})


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    procs: list[WorkerProcess] = []
    yield procs
    for p in procs:
        p.stop()


def test_two_api_replicas_and_workers_share_state(
    make_server: Callable[..., Server],
    upstream: FakeUpstream,
    workers: list[WorkerProcess],
    tmp_path: Path,
    backend: Backend,
) -> None:
    common = ["--upstream", upstream.base_url, "--lease-seconds", "2", "--shard-lines", "10", *backend.args]
    api1 = make_server(*common, "--no-worker", env=backend.env)
    api2 = make_server(*common, "--no-worker", env=backend.env)
    reqs = [chat_line(i, x_fake={"delay": 0.05}) for i in range(120)]
    fid = upload(api1.client(), reqs)
    assert api2.client().files.retrieve(fid).bytes > 0  # uploaded through one replica, served by the other
    b = api2.client().batches.create(
        input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h"
    )
    time.sleep(1.0)
    assert api1.client().batches.retrieve(b.id).status == "validating"  # no worker anywhere yet
    for i in range(2):
        workers.append(
            WorkerProcess(
                [*common, "--concurrency", "4"], tmp_path / f"w{i}.log", backend.env or None
            ).start()
        )
    done = wait_for(api1.client(), b.id, timeout=60)
    assert done.status == "completed", [w.log() for w in workers]
    out = read_lines(api2.client(), done.output_file_id)
    assert Counter(x["custom_id"] for x in out) == Counter(r["custom_id"] for r in reqs)


@pytest.mark.slow
def test_killing_workers_and_servers_repeatedly_keeps_exactly_once(
    make_server: Callable[..., Server],
    upstream: FakeUpstream,
    workers: list[WorkerProcess],
    tmp_path: Path,
    backend: Backend,
) -> None:
    """Two API replicas and three workers; about ten kill -9s of random workers and API replicas while a
    2,000-line batch runs on a slow upstream, and one worker paused (SIGSTOP) past its lease then resumed."""
    rng = random.Random(11)
    common = ["--upstream", upstream.base_url, "--lease-seconds", "1.5", "--shard-lines", "20", *backend.args]
    apis = [make_server(*common, "--no-worker", env=backend.env) for _ in range(2)]
    reqs = [chat_line(i, x_fake={"delay": 0.08}) for i in range(2000)]
    client = apis[0].client()
    b = client.batches.create(
        input_file_id=upload(client, reqs), endpoint="/v1/chat/completions", completion_window="24h"
    )
    wargs = [*common, "--concurrency", "8", "--max-shards", "2"]
    for i in range(3):
        workers.append(WorkerProcess(wargs, tmp_path / f"w{i}.log", backend.env or None).start())
    worker_kills = api_kills = 0
    paused: WorkerProcess | None = None
    deadline = time.monotonic() + 60
    while worker_kills + api_kills < 10 and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.3, 0.7))
        live_api = next(a for a in apis if a.proc and a.proc.poll() is None)
        if live_api.client().batches.retrieve(b.id).status == "completed":
            break
        if rng.random() < 0.3:  # an API replica dies; a new one takes its place
            victim_api = rng.choice([a for a in apis if a.proc and a.proc.poll() is None])
            victim_api.kill()
            api_kills += 1
            apis.append(make_server(*common, "--no-worker", env=backend.env))
        else:
            victim = rng.choice([w for w in workers if w.proc and w.proc.poll() is None and w is not paused])
            victim.kill()
            worker_kills += 1
            workers.append(
                WorkerProcess(wargs, tmp_path / f"w{len(workers)}.log", backend.env or None).start()
            )
        if paused is None and worker_kills == 2:
            # A worker paused past its lease must not be able to commit after it resumes.
            paused = rng.choice([w for w in workers if w.proc and w.proc.poll() is None])
            paused.signal(signal.SIGSTOP)
    if paused is not None:
        time.sleep(2.0)  # longer than the lease: its shards are taken over
        paused.signal(signal.SIGCONT)
    assert worker_kills + api_kills >= 6, "the batch finished before enough kills"
    client = next(a for a in apis if a.proc and a.proc.poll() is None).client()
    done = wait_for(client, b.id, timeout=120)
    assert done.status == "completed"
    out = read_lines(client, done.output_file_id)
    assert read_lines(client, done.error_file_id) == []
    assert Counter(x["custom_id"] for x in out) == Counter(r["custom_id"] for r in reqs)  # each exactly once
    by_id = {r["custom_id"]: r for r in reqs}
    for x in out:
        assert x["response"]["body"]["choices"][0]["message"]["content"] == expected_text(
            by_id[x["custom_id"]]["body"]
        )
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (
        2000,
        2000,
        0,
    )
    # Lines dispatched more than once are at most those in flight at the worker kills (2 shards x 20 lines
    # each), plus the paused worker's shards; killing API replicas redoes nothing.
    redone = sum(c - 1 for c in upstream.stats()["by_key"].values() if c > 1)
    assert redone <= (worker_kills + 1) * 2 * 20
