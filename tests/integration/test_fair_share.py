"""Weighted fair share across projects on one worker, against the fake upstream at a fixed concurrency: project A's
2,000-line batch starts first, then project B's 50 lines; B must finish long before A (docs/scheduling.md).
`pytest -s` prints the figures (docs/performance.md records them)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Server
from tests.integration.test_tenancy import admin_api, by, new_key
from tests.support.batches import chat_line, upload, wait_for
from tests.support.fake_upstream import FakeUpstream

DELAY = 0.02  # seconds the fake upstream takes per line
ARGS = ("--concurrency", "8", "--max-shards", "8", "--shard-lines", "50")


def started_batch(srv: Server, key: str, n: int, tag: str) -> tuple[str, float]:
    client = srv.client(key)
    fid = upload(client, [chat_line(i, x_fake={"delay": DELAY}, user=tag) for i in range(n)])
    t0 = time.monotonic()
    bid = client.batches.create(
        input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h"
    ).id
    return bid, t0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_small_projects_batch_is_not_starved_by_a_big_ones(
    make_server: Callable[..., Server], upstream: FakeUpstream, tmp_path: Path, workers: int
) -> None:
    # with 2 worker processes (the limits split between them) the claim order in the store is what is shared
    data = tmp_path / "data"
    key_a, key_b = new_key(data, "big"), new_key(data, "small")
    srv = make_server("--upstream", upstream.base_url, *ARGS, "--workers", str(workers), data_dir=data)
    a_id, a_t0 = started_batch(srv, key_a, 2000, "a")
    wait_for(srv.client(key_a), a_id, {"in_progress"})
    time.sleep(0.5)  # A's shards fill the worker
    b_id, b_t0 = started_batch(srv, key_b, 50, "b")
    b = wait_for(srv.client(key_b), b_id, timeout=60)
    b_s = time.monotonic() - b_t0
    a_now = srv.client(key_a).batches.retrieve(a_id)
    a_done_then = a_now.request_counts.completed if a_now.request_counts else 0
    a = wait_for(srv.client(key_a), a_id, timeout=120)
    a_s = time.monotonic() - a_t0
    print(
        f"\nfair share, {workers} worker process(es): B (50 lines) {b_s:.2f} s, A (2,000 lines) {a_s:.2f} s, "
        f"A had {a_done_then} lines done when B completed; ratio A/B {a_s / b_s:.1f}"
    )
    assert b.status == "completed" and b.request_counts is not None and b.request_counts.completed == 50
    assert a.status == "completed" and a.request_counts is not None and a.request_counts.completed == 2000
    # 2,000 lines at 8 slots of 20 ms: ~5 s; B's shard starts beside A's as soon as it is validated (a guest
    # shard: ShardRunner.full) and gets half the slots: ~0.25 s. Counted, not timed (the machine is shared):
    assert a_now.status == "in_progress" and a_done_then < 1500  # B ended long before A


def test_set_weight_changes_a_projects_share_and_is_listed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    new_key(data, "heavy")
    out = by(data, "projects", "set-weight", "heavy", "3").stdout
    assert "weight 3" in out
    (line,) = [x for x in by(data, "projects", "list").stdout.splitlines() if " heavy " in x]
    assert line.split()[-1] == "3"


def test_the_admin_api_sets_a_projects_weight(
    make_server: Callable[..., Server], upstream: FakeUpstream, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    root = new_key(data, "ops", "--admin")
    srv = make_server("--upstream", upstream.base_url, data_dir=data)
    with admin_api(srv, root) as api:
        web = api.post("/projects", json={"name": "web"}).json()
        assert web["weight"] == 1.0
        got = api.post(f"/projects/{web['id']}", json={"weight": 2.5})
        assert got.status_code == 200, got.text
        assert got.json()["weight"] == 2.5 and api.get(f"/projects/{web['id']}").json()["weight"] == 2.5
        for bad, code in (
            (0, "invalid_value"),
            (5000, "invalid_value"),
            ("3", "invalid_type"),
            (True, "invalid_type"),
        ):
            r = api.post(f"/projects/{web['id']}", json={"weight": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "weight"
            assert r.json()["error"]["code"] == code
        renamed = api.post(f"/projects/{web['id']}", json={"name": "other", "weight": 1})
        assert renamed.status_code == 400 and renamed.json()["error"]["param"] == "name"
        assert api.post("/projects/proj_unknown", json={"weight": 1}).status_code == 404
