"""What an operator sees of `batchyard serve` in its log, and how it stops: the startup summary (with no secret in it),
the access log and the `x-request-id` of every response, JSON lines from the API and its worker processes, upstream
failures with a hint, and Ctrl-C / SIGTERM sent to the process group as a terminal sends it: exit 0, no ERROR."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import Server
from tests.support.batches import chat_line, read_lines, run_batch, upload, wait_for
from tests.support.fake_upstream import FakeUpstream
from tests.support.postgres import PostgresCluster
from tests.support.processes import ROOT, free_port

REQUEST_ID = re.compile(r"req_[0-9a-f]{32}")


def log_text(srv: Server) -> str:
    return srv.log_path.read_text(errors="replace")


def wait_for_log(srv: Server, needle: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while needle not in (text := log_text(srv)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not logged within {timeout}s:\n{text[-3000:]}")
        time.sleep(0.05)
    return text


# -- the startup summary --


def test_startup_summary_names_the_store_storage_upstream_and_no_secret(
    make_server: Callable[..., Server], upstream: FakeUpstream, pg_cluster: PostgresCluster
) -> None:
    db_url = asyncio.run(pg_cluster.create_database())
    db_name = db_url.rsplit("/", 1)[1]
    with_password = db_url.replace("postgres@", "postgres:pg-s3cret-pw@")
    with_user_info = upstream.base_url.replace("http://", "http://alice:up-userinfo-pw@")
    srv = make_server(
        "--database-url",
        with_password,
        "--upstream",
        with_user_info,
        "--upstream-api-key",
        "sk-upstream-s3cret",
        "--api-key",
        "sk-client-s3cret",
    )
    text = wait_for_log(srv, "auth: ")
    assert f"listening on http://127.0.0.1:{srv.port} (dashboard /, API /v1, docs /docs)" in text
    assert f"store: PostgreSQL postgres@127.0.0.1:{pg_cluster.port}/{db_name}" in text
    assert f"storage: local directory {srv.data_dir.resolve() / 'blobs'}" in text
    assert "workers: 1 process, 4 shards at once" in text
    assert f"upstream {upstream.base_url}: models *, concurrency auto (from 64, at most 512)" in text
    assert "auth: 1 API key(s)" in text
    assert text.count("listening on") == 1  # once, from the API process
    for secret in ("pg-s3cret-pw", "up-userinfo-pw", "alice", "sk-upstream-s3cret", "sk-client-s3cret"):
        assert secret not in text


def test_startup_summary_lists_routes_fixed_limits_and_embedded_models(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    # --no-worker: nothing loads the embedded model; the API process still routes to it
    srv = make_server(
        "--upstream", f"gpt-*={upstream.base_url}", "--concurrency", "7", "--embedded", "--no-worker"
    )
    text = wait_for_log(srv, "auth: ")
    assert f"upstream {upstream.base_url}: models gpt-*, concurrency 7" in text
    assert "embedded models: smollm2-135m-instruct, multilingual-e5-small (in process)" in text
    assert "workers: none (--no-worker" in text
    assert "auth: off (no --api-key)" in text
    assert f"store: SQLite {srv.data_dir.resolve() / 'batchyard.sqlite3'}" in text


# -- the access log and x-request-id --


def test_every_response_has_a_request_id_and_an_access_line(make_server: Callable[..., Server]) -> None:
    srv = make_server("--api-key", "sk-test", "--max-batch-file-bytes", "1000", "--no-worker")
    client = srv.client()
    seen: dict[int, str] = {}

    listed = client.files.with_raw_response.list()
    seen[listed.status_code] = listed.headers["x-request-id"]
    with pytest.raises(openai.NotFoundError) as nf:
        client.batches.retrieve("batch_doesnotexist")
    seen[404] = nf.value.response.headers["x-request-id"]
    with pytest.raises(openai.AuthenticationError) as unauth:
        srv.client(api_key="sk-wrong").files.list()
    seen[401] = unauth.value.response.headers["x-request-id"]
    with pytest.raises(openai.BadRequestError) as bad:  # a request the API's validation refuses
        client.batches.create(input_file_id="file-x", endpoint="/v1/nope", completion_window="24h")  # type: ignore[arg-type]
    seen[400] = bad.value.response.headers["x-request-id"]
    with pytest.raises(openai.APIStatusError) as big:
        client.files.create(file=("big.jsonl", b"x" * 5000), purpose="batch")
    assert big.value.status_code == 413
    seen[413] = big.value.response.headers["x-request-id"]
    assert nf.value.request_id == seen[404]  # the SDK reads it as OpenAI's
    assert set(seen) == {200, 404, 401, 400, 413}
    for rid in seen.values():
        assert REQUEST_ID.fullmatch(rid), rid
    assert len(set(seen.values())) == len(seen)

    text = wait_for_log(srv, seen[413])
    access = r"INFO batchyard\.access: {} {} {} [0-9.]+ms {}"
    assert re.search(access.format("GET", "/v1/files", 200, seen[200]), text)
    assert re.search(access.format("GET", "/v1/batches/batch_doesnotexist", 404, seen[404]), text)
    assert re.search(access.format("GET", "/v1/files", 401, seen[401]), text)
    assert re.search(access.format("POST", "/v1/batches", 400, seen[400]), text)
    assert re.search(access.format("POST", "/v1/files", 413, seen[413]), text)
    assert "/health" not in text  # probes only at DEBUG (Server.start polled it)
    assert "sk-test" not in text and "sk-wrong" not in text


def test_a_client_request_id_is_logged_beside_ours_not_echoed(make_server: Callable[..., Server]) -> None:
    srv = make_server("--no-worker")
    req = urllib.request.Request(
        srv.base_url + "/models",
        headers={"x-request-id": "from-the-client", "x-client-request-id": "trace-42"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        rid = r.headers["x-request-id"]
    assert REQUEST_ID.fullmatch(rid)
    text = wait_for_log(srv, rid)
    assert re.search(rf"GET /v1/models 200 [0-9.]+ms {rid} \(client id trace-42\)\n", text)
    assert "from-the-client" not in text  # x-client-request-id comes first
    # a path cannot forge a line, a header with a tab is not logged
    evil = urllib.request.Request(
        srv.root_url + "/v1/files/%0aERROR%20forged", headers={"x-request-id": "a\tb"}
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(evil, timeout=10)
    rid = e.value.headers["x-request-id"]
    text = wait_for_log(srv, rid)
    assert re.search(rf"GET /v1/files/%0aERROR%20forged 4\d\d [0-9.]+ms {rid}\n", text)
    assert not any(x.startswith("ERROR") for x in text.splitlines())


# -- JSON lines --


def test_json_format_from_the_api_and_the_worker_processes(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server(
        "--upstream", upstream.base_url, "--workers", "2", "--shard-lines", "5", "--log-format", "json"
    )
    client = srv.client()
    batch = run_batch(client, [chat_line(i) for i in range(20)])
    assert batch.status == "completed"
    rid = client.batches.with_raw_response.retrieve(batch.id).headers["x-request-id"]
    wait_for_log(srv, rid)
    srv.stop()
    records = [json.loads(line) for line in log_text(srv).splitlines()]  # every line is one JSON object
    for r in records:
        assert {"ts", "level", "logger", "msg", "pid"} <= r.keys()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["ts"])
    access = next(r for r in records if r.get("request_id") == rid and r["logger"] == "batchyard.access")
    assert access["method"] == "GET" and access["path"] == f"/v1/batches/{batch.id}"
    assert access["status"] == 200 and access["duration_ms"] > 0
    api_pid = access["pid"]
    assert any(r["msg"].startswith("batchyard ") and "listening on" in r["msg"] for r in records)
    started = [r for r in records if re.fullmatch(r"worker worker_[0-9a-f]+ started \(pid \d+\)", r["msg"])]
    assert len({r["pid"] for r in started}) == 2 and api_pid not in {r["pid"] for r in started}
    assert all(r["msg"].endswith(f"(pid {r['pid']})") for r in started)
    assert all(r["level"] != "ERROR" for r in records)


# -- upstream failures with a hint --


def failure_lines(srv: Server) -> list[str]:
    return [x for x in log_text(srv).splitlines() if "batchyard.upstreams:" in x]


def test_a_401_upstream_is_logged_once_with_the_key_hint(make_server: Callable[..., Server]) -> None:
    with FakeUpstream(api_key="the-right-key") as guarded:
        srv = make_server("--upstream", guarded.base_url, "--upstream-api-key", "sk-wrong-upstream-key")
        batch = run_batch(srv.client(), [chat_line(i) for i in range(30)])
    assert batch.request_counts is not None and batch.request_counts.failed == 30
    lines = failure_lines(srv)
    assert len(lines) == 1, lines  # 30 failures, one line (the next within 30 s would carry a count)
    assert lines[0].split(": ", 1)[1] == (
        f"upstream {guarded.base_url} answered 401 (invalid_api_key): check --upstream-api-key / api_key_env"
    )
    assert "WARNING" in lines[0]
    assert "sk-wrong-upstream-key" not in log_text(srv) and "the-right-key" not in log_text(srv)


def test_a_404_upstream_hints_at_v1_and_a_dead_one_at_the_server(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    srv = make_server(
        "--upstream", upstream.root_url, "--upstream", f"dead={dead}", "--max-retries", "0", "--no-embedded"
    )
    lines = [chat_line(i) for i in range(4)] + [chat_line(i, model="dead") for i in range(4, 8)]
    batch = run_batch(srv.client(), lines)
    assert batch.request_counts is not None and batch.request_counts.failed == 8
    found = failure_lines(srv)
    assert any(
        x.endswith(f"upstream {upstream.root_url} answered 404: does the upstream URL end in /v1?")
        for x in found
    ), found
    connect = (
        rf"upstream {re.escape(dead)} failed \(connect: .+\): is the server running at {re.escape(dead)}\?$"
    )
    assert any(re.search(connect, x) for x in found), found
    assert len(found) == 2


def test_a_429_is_logged_as_rate_limited_with_a_count_after_30_s(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server("--upstream", upstream.base_url, "--max-retries", "0")
    batch = run_batch(srv.client(), [chat_line(i, x_fake={"status": 429}) for i in range(5)])
    assert batch.request_counts is not None and batch.request_counts.failed == 5
    (line,) = failure_lines(srv)
    assert line.endswith(
        f"upstream {upstream.base_url} answered 429 (rate_limit_exceeded): "
        "rate limited: lower --concurrency or set rpm/tpm"
    ), line


# -- Ctrl-C and SIGTERM --


class Serve:
    """`batchyard serve` in a process group of its own, as a shell runs a command: a terminal's Ctrl-C is SIGINT to
    the whole group (the API process and its worker children)."""

    def __init__(self, data_dir: Path, upstream: FakeUpstream, *args: str) -> None:
        self.port = free_port()
        self.stderr_path = data_dir.parent / f"{data_dir.name}-{time.monotonic_ns()}.stderr"
        self.stdout_path = self.stderr_path.with_suffix(".stdout")
        cmd = [sys.executable, "-m", "batchyard.cli.main", "serve", "--port", str(self.port), "--data-dir",
               str(data_dir), "--upstream", upstream.base_url, "--lease-seconds", "30", *args]  # fmt: skip
        with open(self.stderr_path, "wb") as err, open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, start_new_session=True)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="k", max_retries=2)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, self.stderr()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, self.stderr()
                time.sleep(0.05)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def interrupt(self, sig: int) -> int:
        os.killpg(self.proc.pid, sig)
        return self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def start(upstream: FakeUpstream, *args: str) -> Serve:
        s = Serve(tmp_path / "data", upstream, *args)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def assert_clean_stop(s: Serve, code: int) -> None:
    err = s.stderr()
    assert code == 0, err
    for bad in ("ERROR", "Traceback", "starting a new one", "Aborted", "KeyboardInterrupt"):
        assert bad not in err, err
    assert s.stdout_path.read_text() == ""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_idle_serve_stops_cleanly(
    serve: Callable[..., Serve], upstream: FakeUpstream, sig: int, workers: str
) -> None:
    s = serve(upstream, "--workers", workers)  # signalled at once: the workers may still be starting
    assert_clean_stop(s, s.interrupt(sig))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_stopped_mid_batch_hands_leases_back_and_resumes(
    serve: Callable[..., Serve], upstream: FakeUpstream, tmp_path: Path, sig: int
) -> None:
    args = ("--shard-lines", "10", "--concurrency", "4", "--max-shards", "2")
    s = serve(upstream, *args)
    reqs = [chat_line(i, x_fake={"delay": 0.2}) for i in range(100)]
    batch_id = s.client.batches.create(
        input_file_id=upload(s.client, reqs), endpoint="/v1/chat/completions", completion_window="24h"
    ).id
    deadline = time.monotonic() + 30
    while upstream.stats()["total"] < 12:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert_clean_stop(s, s.interrupt(sig))
    assert "worker" in s.stderr()
    db = sqlite3.connect(tmp_path / "data" / "batchyard.sqlite3")
    try:
        held = db.execute("SELECT count(*) FROM shards WHERE lease_owner IS NOT NULL AND status <> 'done'")
        assert held.fetchone() == (0,)  # handed back: a restart resumes at once, not after --lease-seconds
        assert db.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone() == (
            "in_progress",
        )
    finally:
        db.close()

    again = serve(upstream, *args)
    started = time.monotonic()
    done = wait_for(again.client, batch_id, timeout=60)
    assert done.status == "completed"
    assert time.monotonic() - started < 25  # well before the 30 s leases would have run out
    out = read_lines(again.client, done.output_file_id)
    assert Counter(x["custom_id"] for x in out) == Counter(r["custom_id"] for r in reqs)
    assert_clean_stop(again, again.interrupt(signal.SIGINT))


def test_worker_pool_stops_cleanly_on_ctrl_c(tmp_path: Path, upstream: FakeUpstream) -> None:
    err_path = tmp_path / "worker.stderr"
    cmd = [sys.executable, "-m", "batchyard.cli.main", "worker", "--workers", "2", "--data-dir",
           str(tmp_path / "data"), "--upstream", upstream.base_url]  # fmt: skip
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stderr=err, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while err_path.read_text().count(" started") < 2:  # both children run their worker
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = err_path.read_text()
    assert code == 0, text
    for bad in ("ERROR", "Traceback", "starting a new one", "Aborted"):
        assert bad not in text, text
