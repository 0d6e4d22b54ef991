"""Settings for several worker processes: how many, and each one's share of the per-upstream limits."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from batchyard.config import Settings, UpstreamSpec


def test_explicit_worker_count_is_kept() -> None:
    assert Settings(workers=3, upstreams=[(None, "http://u/v1")]).resolved_workers() == 3


def test_auto_is_one_per_core_up_to_four_for_http_upstreams(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(workers=None, upstreams=[(None, "http://u/v1")])
    for cores, expected in ((1, 1), (2, 2), (16, 4)):
        monkeypatch.setattr(os, "cpu_count", lambda c=cores: c)
        assert s.resolved_workers() == expected


@pytest.mark.parametrize(
    "settings",
    [
        Settings(workers=None),  # no upstream: the embedded engine
        Settings(workers=None, upstreams=[(None, "http://u/v1")], embedded=True),
        Settings(workers=None, upstreams=[(None, "http://u/v1")], local_models={"m": "/m.gguf"}),
    ],
)
def test_auto_is_one_worker_when_a_model_is_loaded_in_process(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert settings.resolved_workers() == 1


def test_share_splits_every_per_upstream_limit() -> None:
    spec = UpstreamSpec(base_url="http://u/v1", max_concurrency=10, rpm=600, tpm=90_000)
    s = Settings(
        concurrency=64, max_concurrency=512, initial_concurrency=64, upstream_specs=[spec], workers=None
    )
    part = s.share(3)
    assert (part.concurrency, part.max_concurrency, part.initial_concurrency) == (22, 171, 22)
    (p,) = part.upstream_specs
    assert (p.max_concurrency, p.rpm, p.tpm) == (4, 200, 30_000)
    assert part.workers == 1
    assert spec.max_concurrency == 10  # the original is untouched
    assert s.share(1) is s


def test_share_keeps_auto_and_never_goes_below_one() -> None:
    # with online priority off the workers do not watch the board: an automatic limit is split too
    part = Settings(concurrency=None, max_concurrency=2, initial_concurrency=1, online_priority="off").share(
        4
    )
    assert part.concurrency is None  # still automatic
    assert (part.max_concurrency, part.initial_concurrency) == (1, 1)


def test_share_leaves_an_automatic_limit_whole_for_the_board() -> None:
    s = Settings(concurrency=None, max_concurrency=64, initial_concurrency=16)
    assert s.shares_limits
    part = s.share(4)
    assert (part.concurrency, part.max_concurrency, part.initial_concurrency) == (None, 64, 16)
    assert part.limit_split == 1 and part.workers == 1
    assert not Settings(concurrency=8).shares_limits  # an operator's number is split exactly
    assert Settings(concurrency=8).share(4).limit_split == 4


def test_restart_budget_allows_a_few_restarts_per_window() -> None:
    from batchyard.supervisor import RestartBudget

    now = [0.0]
    budget = RestartBudget(allowed=3, window=60.0, clock=lambda: now[0])
    assert [budget.spend() for _ in range(4)] == [True, True, True, False]
    now[0] = 61.0  # the old restarts have left the window
    assert budget.spend() and budget.recent == 1


# -- the model: frozen, checked, picklable --------------------------------------------------------------------


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(ValidationError, match="frozen"):
        s.port = 9000
    spec = UpstreamSpec(base_url="http://u/v1")
    with pytest.raises(ValidationError, match="frozen"):
        spec.weight = 2.0


def test_settings_read_only_their_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHYARD_PORT", "9999")  # the environment is for `load`, not for Settings(...)
    assert Settings().port == 8000


def test_replace_checks_the_new_values(tmp_path: Path) -> None:
    s = Settings().replace(data_dir=tmp_path, shard_lines=7)
    assert (s.data_dir, s.shard_lines) == (tmp_path, 7)
    with pytest.raises(ValidationError, match="shard_lines"):
        s.replace(shard_lines=0)


def _round_trip(settings: Settings, queue: Any) -> None:
    queue.put((settings, settings.share(2).upstream_specs[0].rpm, settings.database_path))


def test_settings_cross_a_spawned_process_intact(tmp_path: Path) -> None:
    """Worker processes are spawned with their Settings pickled: everything, tables included, arrives."""
    s = Settings(
        data_dir=tmp_path,
        upstreams=[("m-*", "http://a/v1")],
        upstream_specs=[UpstreamSpec(base_url="http://u/v1", rpm=600, models=["x"])],
        local_models={"tiny": "/m.gguf"},
        workers=None,
        concurrency=8,
    )
    assert pickle.loads(pickle.dumps(s)) == s
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_round_trip, args=(s, queue))
    child.start()
    got, rpm, path = queue.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0
    assert got == s and got.upstream_specs[0].models == ["x"]
    assert (rpm, path) == (300, tmp_path / "batchyard.sqlite3")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"base_url": "ftp://x"}, "base_url must be an http"),
        ({"base_url": "http://x", "colour": "red"}, "colour"),
        ({"base_url": "http://x", "weight": 0}, "weight"),
        ({"base_url": "http://x", "max_concurrency": 0}, "not between 1"),
        ({"base_url": "http://x", "max_concurrency": "lots"}, "neither a number nor 'auto'"),
        ({"base_url": "http://x", "priority": 1.5}, "priority"),
        ({"base_url": "http://x", "models": [""]}, "models"),
    ],
)
def test_upstream_table_checks(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        UpstreamSpec.model_validate(raw)


def test_upstream_table_auto_and_a_single_model() -> None:
    spec = UpstreamSpec.model_validate({"base_url": "http://x", "max_concurrency": "auto", "models": "m"})
    assert (spec.max_concurrency, spec.models, spec.weight) == (None, ["m"], 1.0)
