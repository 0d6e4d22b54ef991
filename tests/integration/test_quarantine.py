"""A shard whose attempts keep killing their worker process is quarantined: after three deaths with it, its lines end
as `shard_quarantined` error lines instead of being run a fourth time, the batch completes, the server keeps serving
and another key's batch completes (issue 9 item 1)."""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Callable

from tests.conftest import Server
from tests.integration.test_worker_pool import worker_children
from tests.support.batches import chat_line, read_lines, upload, wait_for
from tests.support.fake_upstream import FakeUpstream


def poison_sent(up: FakeUpstream) -> int:
    return sum(b"x_fake" in body for body in up.received())


def test_a_shard_that_kills_its_worker_three_times_is_quarantined(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server(
        "--upstream", upstream.base_url, "--api-key", "sk-a", "--api-key", "sk-b", "--concurrency", "4"
    )
    a, b = srv.client("sk-a"), srv.client("sk-b")
    poison = [chat_line(i, x_fake={"delay": 30}) for i in range(8)]  # never done before its worker is killed
    batch = a.batches.create(
        input_file_id=upload(a, poison), endpoint="/v1/chat/completions", completion_window="24h"
    )
    others = [chat_line(i) for i in range(40)]
    other = b.batches.create(
        input_file_id=upload(b, others), endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert srv.proc is not None
    for death in range(3):  # each attempt of the poison shard dies with its worker process
        deadline = time.monotonic() + 60
        while poison_sent(upstream) < 4 * (death + 1):  # this attempt's four lanes are at the upstream
            assert time.monotonic() < deadline, f"attempt {death + 1} never sent its lines"
            time.sleep(0.05)
        (pid,) = worker_children(srv.proc.pid)
        subprocess.run(["kill", "-9", str(pid)], check=True)
        while pid in worker_children(srv.proc.pid):
            time.sleep(0.05)
    done = wait_for(a, batch.id, timeout=60)
    assert done.status == "completed"
    assert poison_sent(upstream) == 12  # three attempts of four lines; the quarantined fourth sends none
    errs = read_lines(a, done.error_file_id)
    assert read_lines(a, done.output_file_id) == []
    assert Counter(e["custom_id"] for e in errs) == Counter(r["custom_id"] for r in poison)
    assert {e["error"]["code"] for e in errs} == {"shard_quarantined"}
    assert all(e["response"] is None for e in errs)
    assert "the worker process running it died" in errs[0]["error"]["message"]
    # The other key's batch completes in full, even if its shards were running when the worker died: a shard
    # counted failed by a death runs alone next, succeeds, and is not quarantined with the poison.
    finished = wait_for(b, other.id, timeout=60)
    assert finished.status == "completed"
    out = read_lines(b, finished.output_file_id)
    assert sorted(x["custom_id"] for x in out) == sorted(r["custom_id"] for r in others)
    assert srv.proc.poll() is None  # three deaths are within the restart budget: the server kept serving
