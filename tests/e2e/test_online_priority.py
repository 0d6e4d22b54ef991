"""Online requests first, end to end: `batchyard serve` (its worker in a child process) in front of an upstream that
works on 2 requests at a time (0.8 s each; the rest wait in its queue), a batch keeping both slots busy, and online
requests through the front door. With `--online-priority slots` an online request cuts the youngest batch request
(the upstream sees it go, and it is sent once more); with `off` nothing is cut and it waits in the upstream's queue
behind the batch (`pytest -s` prints the latencies). Either way every batch line ends completed, once."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import Server
from tests.support.fake_upstream import FakeUpstream

DELAY = 0.8
LINES = 16


@pytest.fixture
def slow() -> Iterator[FakeUpstream]:
    with FakeUpstream(delay=DELAY, slots=2) as up:
        yield up


def _batch_file(n: int) -> bytes:
    import orjson

    return b"".join(
        orjson.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "m", "messages": [{"role": "user", "content": f"line {i}"}]},
            }
        )
        + b"\n"
        for i in range(n)
    )


def _online_latencies(srv: Server, n: int) -> list[float]:
    out = []
    with httpx.Client(timeout=60, headers={"Authorization": "Bearer sk-test"}) as c:
        for i in range(n):
            t0 = time.monotonic()
            r = c.post(
                srv.base_url + "/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": f"online {i}"}]},
            )
            assert r.status_code == 200, r.text
            out.append(time.monotonic() - t0)
            time.sleep(0.3)
    return out


def _run(srv: Server) -> tuple[list[float], dict[str, int], str]:
    client = srv.client()
    f = client.files.create(file=("in.jsonl", _batch_file(LINES)), purpose="batch")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 30
    while client.batches.retrieve(b.id).status != "in_progress" and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(DELAY / 2)  # both slots busy with batch lines
    lat = _online_latencies(srv, 4)
    while (b := client.batches.retrieve(b.id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline + 60, b.status
        time.sleep(0.1)
    assert b.status == "completed" and b.request_counts is not None
    counts = {"completed": b.request_counts.completed, "failed": b.request_counts.failed}
    assert b.output_file_id is not None
    out = client.files.content(b.output_file_id).text
    ids = sorted(re.findall(r'"custom_id":"(r\d+)"', out))
    assert ids == sorted(f"r{i}" for i in range(LINES))  # every line once
    metrics = httpx.get(srv.root_url + "/metrics", headers={"Authorization": "Bearer sk-test"}).text
    return lat, counts, metrics


@pytest.mark.parametrize("mode", ["slots", "off", "slots-in-process"])
def test_online_requests_cut_ahead_of_batch_lines(
    mode: str, make_server: Callable[..., Server], slow: FakeUpstream
) -> None:
    """`slots-in-process`: the worker on a thread of the API process (two boards' entries in one process)."""
    srv = make_server(
        "--upstream",
        slow.base_url,
        "--api-key",
        "sk-test",
        "--concurrency",
        "2",
        "--shard-lines",
        "4",
        "--online-priority",
        mode.removesuffix("-in-process"),
        *(["--worker-in-process"] if mode.endswith("-in-process") else []),
    )
    slow.reset()
    lat, counts, metrics = _run(srv)
    assert counts == {"completed": LINES, "failed": 0}
    print(f"{mode}: online latencies {[round(x, 2) for x in lat]} s (one request takes {DELAY} s)")
    preempted = re.search(r'batchyard_upstream_requests_total\{[^}]*status="preempted"[^}]*\} (\d+)', metrics)
    stats = slow.stats()
    # no wall time is asserted (a shared machine is noisy): what happened at the upstream is
    if mode.startswith("slots"):
        assert preempted is not None and int(preempted.group(1)) >= 1
        assert stats["streams_cut"] >= 1  # the engine saw the batch request go: its slot was free at once
        assert stats["total"] == LINES + len(lat) + stats["streams_cut"]  # each cut line was sent once more
    else:
        assert preempted is None
        assert stats["streams_cut"] == 0 and stats["total"] == LINES + len(lat)


def test_a_projects_online_requests_in_flight_are_capped(
    make_server: Callable[..., Server], slow: FakeUpstream
) -> None:
    """`--project-online-concurrency 1`: a second request of the same key while its first is in flight gets 429
    rate_limit_exceeded; another key's does not; once the first ended, the key may send again."""
    import concurrent.futures

    srv = make_server(
        "--upstream",
        slow.base_url,
        "--api-key",
        "sk-a",
        "--api-key",
        "sk-b",
        "--project-online-concurrency",
        "1",
    )
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

    def post(key: str, delay: float) -> httpx.Response:
        time.sleep(delay)
        return httpx.post(
            srv.base_url + "/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = pool.submit(post, "sk-a", 0.0)
        second = pool.submit(post, "sk-a", 0.3)
        other = pool.submit(post, "sk-b", 0.3)
        assert first.result().status_code == 200
        refused = second.result()
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.headers["retry-after"] == "1"
        assert other.result().status_code == 200
    assert post("sk-a", 0.0).status_code == 200
