"""The upstreams page, read from GET /metrics: a fixture exposition (stubbed in the browser), no metrics at all, and
the server's own metrics once it has them."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from playwright.sync_api import Route, expect

from tests.conftest import Server
from tests.support.batches import chat_line, run_batch
from tests.support.fake_upstream import FakeUpstream
from tests.ui.conftest import Dash

UP1 = "http://127.0.0.1:9001/v1"
UP2 = "http://gpu-2.internal:8000/v1"
# the names the metrics module exposes; another process's samples (the pid label) are added up
METRICS = f"""# HELP batchyard_upstream_healthy Whether the upstream answers its health check (1) or not (0).
# TYPE batchyard_upstream_healthy gauge
batchyard_upstream_healthy{{upstream="{UP1}"}} 1.0
batchyard_upstream_healthy{{upstream="{UP2}"}} 0.0
# TYPE batchyard_upstream_concurrency_limit gauge
batchyard_upstream_concurrency_limit{{pid="11",upstream="{UP1}"}} 24.0
batchyard_upstream_concurrency_limit{{pid="12",upstream="{UP1}"}} 8.0
batchyard_upstream_concurrency_limit{{upstream="{UP2}"}} 4.0
# TYPE batchyard_upstream_in_flight gauge
batchyard_upstream_in_flight{{upstream="{UP1}"}} 17.0
batchyard_upstream_in_flight{{upstream="{UP2}"}} 0.0
# TYPE batchyard_upstream_requests_total counter
batchyard_upstream_requests_total{{status="200",upstream="{UP1}"}} 950.0
batchyard_upstream_requests_total{{status="429",upstream="{UP1}"}} 40.0
batchyard_upstream_requests_total{{status="503",upstream="{UP1}"}} 10.0
batchyard_upstream_requests_total{{status="error",upstream="{UP2}"}} 3.0
# TYPE batchyard_upstream_request_duration_seconds histogram
batchyard_upstream_request_duration_seconds_bucket{{le="0.1",upstream="{UP1}"}} 200.0
batchyard_upstream_request_duration_seconds_bucket{{le="0.5",upstream="{UP1}"}} 600.0
batchyard_upstream_request_duration_seconds_bucket{{le="1.0",upstream="{UP1}"}} 1000.0
batchyard_upstream_request_duration_seconds_bucket{{le="+Inf",upstream="{UP1}"}} 1000.0
batchyard_upstream_request_duration_seconds_sum{{upstream="{UP1}"}} 420.0
batchyard_upstream_request_duration_seconds_count{{upstream="{UP1}"}} 1000.0
batchyard_upstream_request_duration_seconds_bucket{{le="+Inf",upstream="{UP2}"}} 0.0
batchyard_upstream_request_duration_seconds_sum{{upstream="{UP2}"}} 0.0
batchyard_upstream_request_duration_seconds_count{{upstream="{UP2}"}} 0.0
# TYPE batchyard_lines_total counter
batchyard_lines_total{{outcome="completed"}} 950.0
"""


def stub_metrics(dash: Dash, status: int, body: str) -> list[str]:
    seen: list[str] = []

    def answer(route: Route) -> None:
        seen.append(route.request.headers.get("authorization", ""))
        route.fulfill(status=status, body=body, content_type="text/plain; version=0.0.4; charset=utf-8")

    dash.page.route("**/metrics", answer)
    return seen


def test_upstreams_from_a_metrics_text(server: Server, open_dash: Callable[..., Dash]) -> None:
    dash = open_dash(server)
    seen = stub_metrics(dash, 200, METRICS)
    page = dash.open("/#/upstreams")
    rows = page.locator("#upstreams tbody tr")
    expect(rows).to_have_count(2)
    one = page.locator(f'tr[data-upstream="{UP1}"]')
    expect(one.locator(".health")).to_have_text("healthy")
    expect(one.locator(".limit")).to_have_text("32")
    expect(one.locator(".in-flight")).to_have_text("17")
    expect(one.locator(".requests")).to_have_text("1,000")
    expect(one.locator(".errors")).to_have_text("50 (5.0%) — 429: 40, 503: 10")
    expect(one.locator(".mean")).to_have_text("420 ms")
    expect(one.locator(".p50")).to_have_text("400 ms")  # rank 500: 0.1 + (0.5 - 0.1) * 300/400
    expect(one.locator(".p95")).to_have_text("938 ms")  # rank 950: 0.5 + (1.0 - 0.5) * 350/400
    two = page.locator(f'tr[data-upstream="{UP2}"]')
    expect(two.locator(".health")).to_have_text("unhealthy")
    expect(two.locator(".errors")).to_have_text("3 (100.0%) — error: 3")
    expect(two.locator(".mean")).to_have_text("–")
    assert seen, "the page asked for /metrics"
    dash.shot("14-upstreams")


def test_upstreams_without_metrics(server: Server, open_dash: Callable[..., Dash]) -> None:
    dash = open_dash(server)
    stub_metrics(
        dash,
        404,
        '{"error": {"message": "Not Found", "type": "invalid_request_error", "param": null, "code": null}}',
    )
    page = dash.open("/#/upstreams")
    expect(page.locator("#upstreams-status")).to_contain_text("Metrics not available")
    expect(page.locator("#upstreams")).to_be_hidden()
    expect(page.locator("#banner")).to_be_hidden()
    dash.shot("15-upstreams-no-metrics")


def test_upstreams_from_the_servers_own_metrics(
    server: Server, upstream: FakeUpstream, open_dash: Callable[..., Dash]
) -> None:
    try:
        urllib.request.urlopen(server.root_url + "/metrics", timeout=5).close()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            pytest.skip("this server has no GET /metrics yet")
        raise
    client = server.client()
    assert run_batch(client, [chat_line(i) for i in range(5)]).status == "completed"
    dash = open_dash(server)
    page = dash.open("/#/upstreams")
    row = page.locator(f'tr[data-upstream="{upstream.base_url}"]')
    deadline = time.monotonic() + 10
    while row.count() == 0 and time.monotonic() < deadline:
        page.wait_for_timeout(500)
    expect(row).to_be_visible()
    expect(row.locator(".health")).to_have_text("healthy")
    dash.shot("16-upstreams-live")
