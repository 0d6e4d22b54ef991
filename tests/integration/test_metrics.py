"""Prometheus metrics as an operator scrapes them: `serve` (its worker a child process) at GET /metrics, and a
`batchyard worker --metrics-port` pool on its own endpoint; exact counts after real batches on the fake upstream."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server
from tests.support.batches import chat_line, jsonl, read_lines, run_batch
from tests.support.fake_upstream import FakeUpstream, prompt_tokens
from tests.support.processes import WorkerProcess, free_port

CHAT = "/v1/chat/completions"


def scrape(url: str, headers: dict[str, str] | None = None) -> str:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/plain; version=")
        return str(r.read().decode())


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, parsed by prometheus-client's own parser: (name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """A sample's value; 0 when the series is absent (a counter that never counted)."""
    return found.get((name, frozenset(labels.items())), 0.0)


def total(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> float:
    return sum(v for (n, _), v in found.items() if n == name)


def _mixed_batch() -> list[dict[str, Any]]:
    """20 lines answered at once, 3 refused (400), 2 answered after one 429 each, 1 still 429 after 2 retries."""
    ok = [chat_line(i) for i in range(20)]
    bad = [chat_line(100 + i, x_fake={"status": 400}) for i in range(3)]
    late = [chat_line(200 + i, x_fake={"status": 429, "fail_times": 1, "retry_after": "0"}) for i in range(2)]
    never = [chat_line(300, x_fake={"status": 429, "fail_times": 99, "retry_after": "0"})]
    return ok + bad + late + never


@pytest.fixture
def serve(make_server: Callable[..., Server], upstream: FakeUpstream) -> Server:
    return make_server(
        "--upstream", upstream.base_url, "--shard-lines", "10", "--max-retries", "2", "--api-key", "sk-test"
    )


def test_a_scrape_of_serve_counts_its_worker_childs_lines_requests_retries_and_tokens(
    serve: Server, upstream: FakeUpstream
) -> None:
    client = serve.client()
    reqs = _mixed_batch()
    b = run_batch(client, reqs)
    assert b.status == "completed" and b.request_counts is not None
    assert (b.request_counts.completed, b.request_counts.failed) == (22, 4)
    assert upstream.stats()["total"] == 30

    m = samples(scrape(serve.root_url + "/metrics"))
    assert value(m, "batchyard_lines_total", endpoint=CHAT, outcome="completed") == 22
    assert value(m, "batchyard_lines_total", endpoint=CHAT, outcome="failed") == 4
    assert total(m, "batchyard_lines_total") == 26
    assert value(m, "batchyard_line_errors_total", code="http_400") == 3
    assert value(m, "batchyard_line_errors_total", code="http_429") == 1
    assert total(m, "batchyard_line_errors_total") == 4
    up = upstream.base_url
    assert value(m, "batchyard_upstream_requests_total", upstream=up, status="200") == 22
    assert value(m, "batchyard_upstream_requests_total", upstream=up, status="400") == 3
    assert value(m, "batchyard_upstream_requests_total", upstream=up, status="429") == 2 + 3
    assert total(m, "batchyard_upstream_requests_total") == 30
    assert value(m, "batchyard_upstream_request_duration_seconds_count", upstream=up) == 30
    assert value(m, "batchyard_upstream_request_duration_seconds_bucket", upstream=up, le="+Inf") == 30
    assert value(m, "batchyard_retries_total", reason="429") == 2 + 2
    assert total(m, "batchyard_retries_total") == 4
    answered = [r for r in reqs if "x_fake" not in r["body"] or r["body"]["x_fake"].get("fail_times") == 1]
    assert len(answered) == 22
    assert value(m, "batchyard_tokens_total", kind="input") == sum(
        prompt_tokens(CHAT, r["body"]) for r in answered
    )
    assert value(m, "batchyard_tokens_total", kind="output") == 3 * 22
    assert value(m, "batchyard_upstream_in_flight", upstream=up) == 0
    assert value(m, "batchyard_upstream_concurrency_limit", upstream=up) >= 1
    assert value(m, "batchyard_upstream_healthy", upstream=up) == 1
    assert value(m, "batchyard_validations_total", result="planned") == 1
    assert value(m, "batchyard_validation_bytes_total") == len(jsonl(reqs))
    assert value(m, "batchyard_shard_claims_total") >= 3
    assert value(m, "batchyard_shard_leases_lost_total") == 0
    assert value(m, "batchyard_shards_quarantined_total") == 0
    # from the store, at scrape time
    assert value(m, "batchyard_batches", status="completed") == 1
    assert value(m, "batchyard_batches", status="in_progress") == 0
    assert value(m, "batchyard_lines_waiting") == 0
    # the API's own requests, by route template
    assert value(m, "batchyard_http_requests_total", method="POST", route="/v1/files", status="200") == 1
    assert value(m, "batchyard_http_requests_total", method="POST", route="/v1/batches", status="200") == 1
    polled = value(
        m, "batchyard_http_requests_total", method="GET", route="/v1/batches/{batch_id}", status="200"
    )
    assert polled >= 1
    assert value(m, "batchyard_http_request_duration_seconds_count", route="/v1/batches/{batch_id}") == polled


def test_an_invalid_batch_and_a_waiting_backlog_show(serve: Server, upstream: FakeUpstream) -> None:
    client = serve.client()
    bad = run_batch(client, [{"custom_id": "x", "method": "POST", "url": CHAT, "body": "not an object"}])
    assert bad.status == "failed"
    slow = [chat_line(i, x_fake={"delay": 1.0}) for i in range(40)]
    fid = client.files.create(file=("slow.jsonl", jsonl(slow)), purpose="batch").id
    b = client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 20
    while client.batches.retrieve(b.id).status != "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    m = samples(scrape(serve.root_url + "/metrics"))
    # the worker counts a validation just after the plan commits: the scrape may come in between
    while value(m, "batchyard_validations_total", result="planned") < 1:
        assert time.monotonic() < deadline
        m = samples(scrape(serve.root_url + "/metrics"))
    assert value(m, "batchyard_validations_total", result="failed") == 1
    assert value(m, "batchyard_validations_total", result="planned") == 1
    assert value(m, "batchyard_batches", status="failed") == 1
    assert value(m, "batchyard_batches", status="in_progress") == 1
    assert 0 < value(m, "batchyard_lines_waiting") <= 40
    client.batches.cancel(b.id)


def test_no_id_key_or_custom_id_is_ever_a_label(serve: Server) -> None:
    client = serve.client()
    b = run_batch(client, [chat_line(i) for i in range(3)] + [chat_line(9, x_fake={"status": 404})])
    assert b.status == "completed"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_abc123notreal")
    with pytest.raises(openai.AuthenticationError):
        serve.client(api_key="sk-wrong-key-secret").batches.list()
    text = scrape(serve.root_url + "/metrics")
    for secret in (b.id, b.input_file_id, b.output_file_id, b.error_file_id, "batch_abc123notreal"):
        assert secret and secret not in text
    for secret in ("req-0", "req-9", "sk-test", "sk-wrong-key-secret"):
        assert secret not in text
    m = samples(text)
    assert (
        value(m, "batchyard_http_requests_total", method="GET", route="/v1/batches/{batch_id}", status="404")
        == 1
    )
    assert value(m, "batchyard_http_requests_total", method="GET", route="/v1/batches", status="401") == 1
    assert value(m, "batchyard_line_errors_total", code="http_404") == 1


def test_metrics_need_no_key_unless_metrics_require_key(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    open_one = make_server("--upstream", upstream.base_url, "--api-key", "sk-a")
    assert "batchyard_batches" in scrape(open_one.root_url + "/metrics")
    guarded = make_server("--upstream", upstream.base_url, "--api-key", "sk-a", "--metrics-require-key")
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
        with pytest.raises(urllib.error.HTTPError) as e:
            scrape(guarded.root_url + "/metrics", headers)
        assert e.value.code == 401
        error = json.loads(e.value.read())["error"]
        assert set(error) == {"message", "type", "param", "code"}
    assert "batchyard_batches" in scrape(guarded.root_url + "/metrics", {"Authorization": "Bearer sk-a"})


def _worker_children(pid: int) -> set[int]:
    """The worker processes `pid` started (multiprocessing's resource tracker is a child too: not counted)."""
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        children = {int(p) for p in fh.read().split()}
    found = set()
    for child in children:
        with contextlib.suppress(OSError), open(f"/proc/{child}/cmdline", "rb") as fh:
            if b"spawn_main" in fh.read():
                found.add(child)
    return found


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        pairs = [item.partition(b"=") for item in fh.read().split(b"\0") if item]
    return {k.decode(): v.decode() for k, _, v in pairs}


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    procs: list[WorkerProcess] = []
    yield procs
    for p in procs:
        p.stop()


def test_a_worker_pool_serves_its_processes_metrics_on_its_own_port(
    make_server: Callable[..., Server],
    upstream: FakeUpstream,
    tmp_path: Path,
    workers: list[WorkerProcess],
) -> None:
    shared = ["--upstream", upstream.base_url, "--data-dir", str(tmp_path / "shared"), "--shard-lines", "10"]
    api = make_server(*shared, "--no-worker")
    port = free_port()
    worker = WorkerProcess(
        [*shared, "--workers", "2", "--concurrency", "8", "--metrics-port", str(port)],
        tmp_path / "worker.log",
    ).start()
    workers.append(worker)
    reqs = [chat_line(i, x_fake={"delay": 0.02}) for i in range(40)] + [
        chat_line(50 + i, x_fake={"status": 400}) for i in range(2)
    ]
    b = run_batch(api.client(), reqs)
    assert b.status == "completed", worker.log()
    assert len(read_lines(api.client(), b.output_file_id)) == 40
    url, up = f"http://127.0.0.1:{port}/metrics", upstream.base_url
    m = samples(scrape(url))
    assert value(m, "batchyard_lines_total", endpoint=CHAT, outcome="completed") == 40
    assert value(m, "batchyard_lines_total", endpoint=CHAT, outcome="failed") == 2
    assert value(m, "batchyard_upstream_requests_total", upstream=upstream.base_url, status="200") == 40
    # each of the two processes holds half of --concurrency 8: the gauge is their sum
    assert value(m, "batchyard_upstream_concurrency_limit", upstream=upstream.base_url) == 8
    assert value(m, "batchyard_upstream_healthy", upstream=upstream.base_url) == 1
    # the API replica (no worker) counts no lines but shows the store's batches
    api_m = samples(scrape(api.root_url + "/metrics"))
    assert total(api_m, "batchyard_lines_total") == 0
    assert value(api_m, "batchyard_batches", status="completed") == 1

    # A child killed with SIGKILL is restarted: its gauges stop counting (no third share), its counters stay.
    assert worker.proc is not None
    before = _worker_children(worker.proc.pid)
    assert len(before) == 2
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while len(after := _worker_children(worker.proc.pid) - before) < 1:
        assert time.monotonic() < deadline, worker.log()
        time.sleep(0.1)
    (new,) = after
    folder = Path(_environ(new)["PROMETHEUS_MULTIPROC_DIR"])
    while not (folder / f"gauge_livesum_{new}.db").exists():  # the new child built its upstreams' gauges
        assert time.monotonic() < deadline, worker.log()
        time.sleep(0.1)
    while (limit := value(samples(scrape(url)), "batchyard_upstream_concurrency_limit", upstream=up)) != 8:
        assert limit <= 8  # never the dead child's share on top of the two live ones
        assert time.monotonic() < deadline, worker.log()
        time.sleep(0.05)
    m = samples(scrape(url))
    assert value(m, "batchyard_upstream_concurrency_limit", upstream=up) == 8
    assert value(m, "batchyard_lines_total", endpoint=CHAT, outcome="completed") == 40


@pytest.fixture
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("BATCHYARD_REQUIRE_SERVICES"):
            raise RuntimeError("promtool is missing (Debian: apt-get install prometheus)")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def test_the_exposition_passes_promtool_check_metrics(serve: Server, promtool: str) -> None:
    client = serve.client()
    b = run_batch(client, [chat_line(i) for i in range(5)] + [chat_line(7, x_fake={"status": 404})])
    assert b.status == "completed"
    text = scrape(serve.root_url + "/metrics")
    assert "batchyard_upstream_request_duration_seconds_bucket" in text
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30, check=False
    )
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()


def test_a_single_process_worker_and_an_in_process_worker_count_in_memory(
    make_server: Callable[..., Server],
    upstream: FakeUpstream,
    tmp_path: Path,
    workers: list[WorkerProcess],
) -> None:
    """One process, no multiprocess directory: the same counts, and prometheus-client's process metrics too."""
    shared = ["--upstream", upstream.base_url, "--data-dir", str(tmp_path / "shared")]
    api = make_server(*shared, "--no-worker")
    port = free_port()
    worker = WorkerProcess(
        [*shared, "--workers", "1", "--metrics-port", str(port)], tmp_path / "w.log"
    ).start()
    workers.append(worker)
    b = run_batch(api.client(), [chat_line(i) for i in range(7)] + [chat_line(9, x_fake={"status": 400})])
    assert b.status == "completed", worker.log()
    m = samples(scrape(f"http://127.0.0.1:{port}/metrics"))
    assert value(m, "batchyard_lines_total", endpoint=CHAT, outcome="completed") == 7
    assert value(m, "batchyard_line_errors_total", code="http_400") == 1
    assert value(m, "batchyard_upstream_requests_total", upstream=upstream.base_url, status="200") == 7
    assert value(m, "process_resident_memory_bytes") > 0

    inproc = make_server("--upstream", upstream.base_url, "--worker-in-process")
    b = run_batch(inproc.client(), [chat_line(i) for i in range(4)])
    assert b.status == "completed"
    m = samples(scrape(inproc.root_url + "/metrics"))
    assert value(m, "batchyard_lines_total", endpoint=CHAT, outcome="completed") == 4
    assert value(m, "batchyard_batches", status="completed") == 1
    assert value(m, "process_resident_memory_bytes") > 0
