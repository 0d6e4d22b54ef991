"""Several upstreams per model from the TOML config: balancing, ejection of a failing upstream, keys from env."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Server
from tests.support.batches import chat_line, read_lines, run_batch
from tests.support.fake_upstream import FakeUpstream, expected_text


@pytest.fixture
def two_upstreams() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    with FakeUpstream(api_key="key-a") as a, FakeUpstream() as b:
        yield a, b


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "batchyard.toml"
    path.write_text(text)
    return str(path)


def test_two_upstreams_share_one_model_by_weight(
    make_server: Callable[..., Server], tmp_path: Path, two_upstreams: tuple[FakeUpstream, FakeUpstream]
) -> None:
    a, b = two_upstreams
    cfg = _config(
        tmp_path,
        f"""
[[upstreams]]
name = "a"
base_url = "{a.base_url}"
api_key_env = "TEST_UPSTREAM_A_KEY"
models = ["test-*"]
weight = 3
max_concurrency = 6

[[upstreams]]
name = "b"
base_url = "{b.base_url}"
models = ["test-*"]
weight = 1
max_concurrency = 6
""",
    )
    srv = make_server("--config", cfg, "--shard-lines", "200", env={"TEST_UPSTREAM_A_KEY": "key-a"})
    client = srv.client()
    reqs = [chat_line(i, x_fake={"delay": 0.02}) for i in range(200)]
    b_ = run_batch(client, reqs)
    assert b_.status == "completed"
    assert b_.request_counts is not None and b_.request_counts.completed == 200
    na, nb = a.stats()["total"], b.stats()["total"]
    assert na + nb == 200
    assert na > nb > 0  # both used; the heavier weight more
    # upstream a requires key-a: it came from TEST_UPSTREAM_A_KEY, so no line got a 401 error line
    assert read_lines(client, b_.error_file_id) == []


def test_a_failing_upstream_is_ejected_and_lines_go_to_the_healthy_one(
    make_server: Callable[..., Server], tmp_path: Path
) -> None:
    with FakeUpstream(status_rate=1.0, status=500) as bad, FakeUpstream() as good:
        cfg = _config(
            tmp_path,
            f"""
[[upstreams]]
base_url = "{bad.base_url}"
models = ["*"]
max_concurrency = 4

[[upstreams]]
base_url = "{good.base_url}"
models = ["*"]
max_concurrency = 4
""",
        )
        srv = make_server("--config", cfg, "--max-retries", "8", "--shard-lines", "300")
        client = srv.client()
        reqs = [chat_line(i, x_fake={"delay": 0.01}) for i in range(300)]
        t0 = time.monotonic()
        b = run_batch(client, reqs, timeout=60)
        assert b.status == "completed"
        out = read_lines(client, b.output_file_id)
        assert Counter(x["custom_id"] for x in out) == Counter(
            r["custom_id"] for r in reqs
        )  # every line succeeded
        assert time.monotonic() - t0 < 30
        # ejected after a few failures, then only probed now and then: most traffic went to the healthy upstream
        assert bad.stats()["total"] < 60, bad.stats()["total"]
        assert good.stats()["total"] == 300


def test_rpm_limit_is_honoured(
    make_server: Callable[..., Server], tmp_path: Path, upstream: FakeUpstream
) -> None:
    cfg = _config(
        tmp_path,
        f"""
[[upstreams]]
base_url = "{upstream.base_url}"
rpm = 600
""",
    )
    srv = make_server("--config", cfg)
    client = srv.client()
    reqs = [chat_line(i) for i in range(80)]
    t0 = time.monotonic()
    b = run_batch(client, reqs, timeout=60)
    elapsed = time.monotonic() - t0
    assert b.status == "completed"
    # 600/min = 10/s with a 50-request burst: 80 requests need at least ~3 s
    assert elapsed >= 2.5


def test_bad_upstream_table_is_a_clear_error(tmp_path: Path, make_server: Callable[..., Server]) -> None:
    cfg = _config(tmp_path, '[[upstreams]]\nbase_url = "ftp://x"\n')
    srv = make_server("--config", cfg, start=False)
    with pytest.raises(RuntimeError, match="base_url must be an http"):
        srv.start(timeout=15)


def test_priority_hint_is_added_for_upstreams_that_take_it(
    make_server: Callable[..., Server], tmp_path: Path, upstream: FakeUpstream
) -> None:
    cfg = _config(
        tmp_path,
        f"""
[[upstreams]]
base_url = "{upstream.base_url}"
priority = -5
""",
    )
    srv = make_server("--config", cfg)
    client = srv.client()
    plain = chat_line(0)
    own = chat_line(1, priority=3)  # a request's own priority is kept
    b = run_batch(client, [plain, own])
    assert b.status == "completed"
    keys = set(upstream.stats()["by_key"])
    assert expected_text({**plain["body"], "priority": -5}) in keys
    assert expected_text(own["body"]) in keys
