"""Worker processes (`serve --workers N`, `worker --workers N`): they share batches and the per-upstream limits, a
dead one is replaced while the API keeps serving (up to a point), and SIGTERM stops them all."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Server
from tests.support.batches import chat_line, read_lines, upload, wait_for
from tests.support.fake_upstream import FakeUpstream
from tests.support.processes import WorkerProcess

LINES = 160
SHARD = 10


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def worker_children(pid: int) -> list[int]:
    """Child processes running a worker (multiprocessing's spawn entry point)."""
    found = []
    for child in children(pid):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing" in cmd and b"spawn" in cmd:
            found.append(child)
    return found


class OwnerWatch:
    """Collects the distinct lease owners of running shards, read from the server's SQLite file while it runs."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.owners: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> OwnerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                con = sqlite3.connect(self.db, timeout=1)
                try:
                    rows = con.execute(
                        "SELECT DISTINCT lease_owner FROM shards WHERE status = 'running'"
                    ).fetchall()
                finally:
                    con.close()
                self.owners.update(r[0] for r in rows if r[0])
            except sqlite3.Error:
                pass
            time.sleep(0.02)


def stopped_while_holding_a_lease(srv: Server, pids: list[int], timeout: float = 30) -> int:
    """One of the worker processes `pids`, stopped (SIGSTOP) at a moment it holds a running shard's lease: read
    from the database while it is stopped, so it cannot have ended the shard since."""
    db = srv.data_dir / "batchyard.sqlite3"
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, srv.log()
        names = dict(re.findall(r"worker (worker_[0-9a-f]+) started \(pid (\d+)\)", srv.log()))
        for name, pid in names.items():
            if int(pid) not in pids:
                continue
            os.kill(int(pid), signal.SIGSTOP)
            con = sqlite3.connect(db, timeout=5)
            try:
                held = con.execute(
                    "SELECT COUNT(*) FROM shards WHERE status = 'running' AND lease_owner = ?", (name,)
                ).fetchone()[0]
            finally:
                con.close()
            if held:
                return int(pid)
            os.kill(int(pid), signal.SIGCONT)
        time.sleep(0.05)


def requests(tag: str) -> list[dict[str, object]]:
    reqs = [chat_line(i, x_fake={"delay": 0.05}, user=tag) for i in range(LINES)]
    for r in reqs:
        r["custom_id"] = f"{tag}-{r['custom_id']}"
    return reqs


def assert_exactly_once(client: object, batch_id: str, expected: list[dict[str, object]]) -> None:
    b = wait_for(client, batch_id, timeout=90)  # type: ignore[arg-type]
    assert b.status == "completed", b
    ids = Counter(line["custom_id"] for line in read_lines(client, b.output_file_id))  # type: ignore[arg-type]
    ids.update(line["custom_id"] for line in read_lines(client, b.error_file_id))  # type: ignore[arg-type]
    assert ids == Counter(r["custom_id"] for r in expected)


def test_two_worker_processes_share_a_batch_and_the_concurrency_limit(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server(
        "--upstream", upstream.base_url, "--workers", "2", "--concurrency", "4", "--shard-lines", str(SHARD)
    )
    assert srv.proc is not None
    assert len(worker_children(srv.proc.pid)) == 2
    client = srv.client()
    reqs = requests("pool")
    fid = upload(client, reqs)
    with OwnerWatch(srv.data_dir / "batchyard.sqlite3") as watch:
        b = client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
        assert_exactly_once(client, b.id, reqs)
    assert len(watch.owners) == 2, watch.owners  # both processes ran shards
    # --concurrency is per serve command: split between the two processes (2 each), not 4 each
    assert upstream.stats()["max_in_flight"] <= 4


@pytest.mark.slow
def test_a_dead_worker_process_is_replaced_while_the_api_keeps_serving(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    args = ["--upstream", upstream.base_url, "--workers", "2", "--concurrency", "4"]
    # a long lease: the dead process's shards can only finish in time if its leases are given back at once
    srv = make_server(*args, "--shard-lines", str(SHARD), "--lease-seconds", "60")
    assert srv.proc is not None
    client = srv.client()
    reqs = requests("dead")
    fid = upload(client, reqs)
    b = client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
    before = worker_children(srv.proc.pid)
    victim = stopped_while_holding_a_lease(srv, before)
    subprocess.run(["kill", "-9", str(victim)], check=True)
    killed_at = time.monotonic()
    # the API keeps answering, a new worker process takes the dead one's place, and the batch ends exactly once
    deadline = time.monotonic() + 30
    while True:
        assert srv.proc.poll() is None, srv.log()
        client.batches.retrieve(b.id)
        now = worker_children(srv.proc.pid)
        if len(now) == 2 and victim not in now:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.1)
    assert next(p for p in before if p != victim) in now
    assert_exactly_once(client, b.id, reqs)
    assert time.monotonic() - killed_at < 30, "the dead process's shards waited for their 60 s lease"
    assert "starting a new one" in srv.log()
    assert re.search(r"gave back [1-9]\d* shard lease\(s\) of dead worker", srv.log()), srv.log()


@pytest.mark.slow
def test_a_worker_process_that_keeps_dying_stops_the_server(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server("--upstream", upstream.base_url)
    assert srv.proc is not None
    killed: set[int] = set()
    deadline = time.monotonic() + 60
    while srv.proc.poll() is None:  # kill each new worker process as soon as it appears
        assert time.monotonic() < deadline, srv.log()
        for pid in worker_children(srv.proc.pid):
            if pid not in killed:
                subprocess.run(["kill", "-9", str(pid)], check=False)
                killed.add(pid)
        time.sleep(0.05)
    assert srv.proc.returncode == 1, srv.log()
    assert len(killed) == 6  # the first process and five restarts within the minute
    assert "not restarting it" in srv.log()


def test_worker_command_with_several_processes_runs_batches_and_stops_on_sigterm(
    make_server: Callable[..., Server], upstream: FakeUpstream, tmp_path: Path
) -> None:
    api = make_server("--no-worker")
    w = WorkerProcess(
        [
            "--data-dir",
            str(api.data_dir),
            "--upstream",
            upstream.base_url,
            "--workers",
            "2",
            "--concurrency",
            "4",
            "--shard-lines",
            str(SHARD),
        ],
        tmp_path / "worker.log",
    ).start()
    try:
        assert w.proc is not None
        deadline = time.monotonic() + 30
        while len(worker_children(w.proc.pid)) < 2:
            assert time.monotonic() < deadline and w.proc.poll() is None, w.log()
            time.sleep(0.05)
        kids = worker_children(w.proc.pid)
        client = api.client()
        reqs = requests("cmd")
        fid = upload(client, reqs)
        b = client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
        assert_exactly_once(client, b.id, reqs)
        assert upstream.stats()["max_in_flight"] <= 4
        w.signal(signal.SIGTERM)
        assert w.proc.wait(30) == 0, w.log()
        for kid in kids:  # no child left behind
            assert not Path(f"/proc/{kid}").exists() or b"zombie" in Path(f"/proc/{kid}/status").read_bytes()
    finally:
        w.stop()


def test_serve_with_the_worker_in_process_runs_batches_on_a_thread_and_stops_on_sigterm(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server(
        "--upstream",
        upstream.base_url,
        "--worker-in-process",
        "--concurrency",
        "4",
        "--shard-lines",
        str(SHARD),
    )
    assert srv.proc is not None
    assert worker_children(srv.proc.pid) == []  # no worker process: a thread of the API process
    client = srv.client()
    reqs = requests("thread")
    fid = upload(client, reqs)
    b = client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
    assert_exactly_once(client, b.id, reqs)
    assert upstream.stats()["max_in_flight"] <= 4
    srv.signal(signal.SIGTERM)  # uvicorn shuts down (the worker thread stops with it): a clean exit
    assert srv.proc.wait(30) == 0, srv.log()
    assert "Traceback" not in srv.log()
