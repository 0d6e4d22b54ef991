"""kill -9 the server at random moments: every batch resumes, each custom_id ends exactly once, done work stays done."""

from __future__ import annotations

import random
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Server
from tests.support.batches import chat_line, read_lines, upload, wait_for
from tests.support.fake_upstream import FakeUpstream, expected_text

SHARD = 20
LINES = 400
MAX_SHARDS = 2


def _done_shards(data_dir: Path) -> dict[tuple[str, int], int]:
    db = sqlite3.connect(data_dir / "batchyard.sqlite3")
    try:
        rows = db.execute("SELECT batch_id, idx, attempt FROM shards WHERE status = 'done'").fetchall()
    finally:
        db.close()
    return {(b, i): a for b, i, a in rows}


@pytest.mark.slow
def test_kill9_and_restart_is_exactly_once(
    make_server: Callable[..., Server], upstream: FakeUpstream, tmp_path: Path
) -> None:
    rng = random.Random(7)
    data_dir = tmp_path / "data"
    args = [
        "--upstream",
        upstream.base_url,
        "--shard-lines",
        str(SHARD),
        "--concurrency",
        "8",
        "--max-shards",
        str(MAX_SHARDS),
        "--lease-seconds",
        "2",
    ]
    srv = make_server(*args, data_dir=data_dir)
    client = srv.client()
    batches = []
    all_reqs = []
    for n in range(2):  # two batches at once, so restarts resume more than one
        reqs = [chat_line(i, x_fake={"delay": 0.2}, user=f"b{n}") for i in range(LINES // 2 * (n + 1))]
        for r in reqs:
            r["custom_id"] = f"b{n}-{r['custom_id']}"
        fid = upload(client, reqs)
        batches.append(
            client.batches.create(
                input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h"
            ).id
        )
        all_reqs.append(reqs)
    # (batch, shard) -> (attempt, dispatch counts of every line) when the shard was seen done at a kill
    done_before_kills: dict[tuple[str, int], tuple[int, dict[str, int]]] = {}
    kills = 0
    for _ in range(3):
        time.sleep(rng.uniform(1.0, 2.5))
        if all(client.batches.retrieve(b).status == "completed" for b in batches):
            break
        srv.kill()
        kills += 1
        counts = dict(upstream.stats()["by_key"])
        for key, attempt in _done_shards(data_dir).items():
            done_before_kills.setdefault(key, (attempt, counts))
        srv = make_server(*args, data_dir=data_dir)
        client = srv.client()
    assert kills >= 2, "the batches finished before the test could kill the server twice"
    stats_by_key = upstream.stats()["by_key"]
    for bid, reqs in zip(batches, all_reqs, strict=True):
        b = wait_for(client, bid, timeout=120)
        stats_by_key = upstream.stats()["by_key"]
        assert b.status == "completed", srv.log()
        out = read_lines(client, b.output_file_id)
        errs = read_lines(client, b.error_file_id)
        assert errs == []
        assert Counter(x["custom_id"] for x in out) == Counter(r["custom_id"] for r in reqs)  # exactly once
        assert b.request_counts is not None
        assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (
            len(reqs),
            len(reqs),
            0,
        )
        by_id = {r["custom_id"]: r for r in reqs}
        for line in out:  # no custom_id mix-up across restarts
            content = line["response"]["body"]["choices"][0]["message"]["content"]
            assert content == expected_text(by_id[line["custom_id"]]["body"])
    # Finished shards were not redone: after they were seen done, their attempt did not change and none of their
    # lines was sent again.
    final = _done_shards(data_dir)
    assert done_before_kills, "no shard had finished before a kill"
    for (bid, idx), (attempt, counts_then) in done_before_kills.items():
        assert final[(bid, idx)] == attempt
        reqs = all_reqs[batches.index(bid)]
        for r in reqs[idx * SHARD : (idx + 1) * SHARD]:
            text = expected_text(r["body"])
            assert stats_by_key[text] == counts_then[text] >= 1
    # Lines sent more than once are at most those in flight (the running shards) at each kill.
    total = sum(len(r) for r in all_reqs)
    assert upstream.stats()["total"] <= total + kills * MAX_SHARDS * SHARD


def test_graceful_stop_hands_shards_back(
    make_server: Callable[..., Server], upstream: FakeUpstream, tmp_path: Path
) -> None:
    """SIGTERM releases the leases, so a restarted server resumes at once instead of after --lease-seconds."""
    data_dir = tmp_path / "data"
    args = [
        "--upstream",
        upstream.base_url,
        "--shard-lines",
        "10",
        "--concurrency",
        "4",
        "--lease-seconds",
        "300",
    ]
    srv = make_server(*args, data_dir=data_dir)
    client = srv.client()
    reqs = [chat_line(i, x_fake={"delay": 0.2}) for i in range(80)]
    bid = client.batches.create(
        input_file_id=upload(client, reqs), endpoint="/v1/chat/completions", completion_window="24h"
    ).id
    deadline = time.monotonic() + 30
    while upstream.stats()["total"] < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    srv.stop()
    # uvicorn re-raises SIGTERM after its graceful shutdown, so -15 is a clean exit here
    assert srv.proc is not None and srv.proc.returncode in (0, -15), srv.log()
    srv = make_server(*args, data_dir=data_dir)
    client = srv.client()
    b = wait_for(client, bid, timeout=60)  # far less than the 300 s lease
    assert b.status == "completed"
    assert Counter(x["custom_id"] for x in read_lines(client, b.output_file_id)) == Counter(
        r["custom_id"] for r in reqs
    )
