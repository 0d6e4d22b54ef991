"""GET /v1/models and /v1/models/{id}: exact routes, and what the upstreams behind glob and catch-all routes list."""

from __future__ import annotations

import time
from collections.abc import Callable

import openai
import pytest

from tests.conftest import Server
from tests.support.fake_upstream import DEFAULT_MODELS, FakeUpstream


def test_catch_all_upstream_models_are_listed_and_retrievable(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    client = make_server("--upstream", upstream.base_url).client()
    assert {m.id for m in client.models.list()} == set(DEFAULT_MODELS)
    got = client.models.retrieve("gpt-4o-mini")
    assert (got.id, got.object) == ("gpt-4o-mini", "model")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_glob_route_lists_only_matching_models(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    client = make_server(
        "--upstream", f"gpt-*={upstream.base_url}", "--upstream", f"pinned={upstream.base_url}"
    ).client()
    assert [m.id for m in client.models.list()] == ["gpt-4o-mini", "pinned"]


def test_an_unreachable_upstream_lists_nothing_but_the_listing_answers(
    make_server: Callable[..., Server],
) -> None:
    client = make_server("--upstream", "http://127.0.0.1:9/v1").client()
    t = time.monotonic()
    assert list(client.models.list()) == []
    assert time.monotonic() - t < 5
