"""Settings for several worker processes: how many, and each one's share of the per-upstream limits."""

from __future__ import annotations

import os

import pytest

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
    part = Settings(concurrency=None, max_concurrency=2, initial_concurrency=1).share(4)
    assert part.concurrency is None  # still automatic
    assert (part.max_concurrency, part.initial_concurrency) == (1, 1)


def test_restart_budget_allows_a_few_restarts_per_window() -> None:
    from batchyard.supervisor import RestartBudget

    now = [0.0]
    budget = RestartBudget(allowed=3, window=60.0, clock=lambda: now[0])
    assert [budget.spend() for _ in range(4)] == [True, True, True, False]
    now[0] = 61.0  # the old restarts have left the window
    assert budget.spend() and budget.recent == 1
