"""What went wrong in a batch: a failed validation with its line numbers, the error lines grouped by code, and
tenant-controlled text that must never run as markup."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from playwright.sync_api import expect

from tests.conftest import Server
from tests.support.batches import chat_line, upload, wait_for
from tests.support.fake_upstream import FakeUpstream
from tests.ui.conftest import Dash

XSS = "<img src=x onerror=window.__xss=1>"


@pytest.fixture
def pinned_server(make_server: Callable[..., Server], upstream: FakeUpstream) -> Server:
    """Only `test-model` is served: any other model fails validation."""
    return make_server(
        "--upstream", f"test-model={upstream.base_url}", "--lease-seconds", "2", "--shard-lines", "10"
    )


def test_a_failed_validation_shows_its_line_numbers(
    pinned_server: Server, open_dash: Callable[..., Dash]
) -> None:
    client = pinned_server.client()
    lines = [chat_line(i) for i in range(6)]
    lines[2] = chat_line(2, model="no-such-model")
    lines[4]["custom_id"] = lines[0]["custom_id"]  # a duplicate
    fid = upload(client, lines)
    batch = wait_for(
        client,
        client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h").id,
    )
    assert batch.status == "failed" and batch.errors is not None and batch.errors.data
    expected = [(str(e.line), e.code) for e in batch.errors.data]
    assert ("3", "model_not_found") in expected and ("5", "duplicate_custom_id") in expected

    dash = open_dash(pinned_server)
    page = dash.open(f"/#/batches/{batch.id}")
    expect(page.locator(".title-row .status")).to_have_text("failed")
    table = page.locator("#validation-errors tbody tr")
    expect(table).to_have_count(len(expected))
    shown = [
        (table.nth(i).locator("td").nth(0).inner_text(), table.nth(i).locator("td").nth(1).inner_text())
        for i in range(len(expected))
    ]
    assert shown == expected
    expect(page.locator("#validation-errors")).to_contain_text(
        "The provided model 'no-such-model' is not supported by the Batch API."
    )
    expect(page.locator("#timings li").last).to_contain_text("failed")
    dash.shot("09-failed-validation")


def test_the_error_lines_are_grouped_by_code(server: Server, open_dash: Callable[..., Dash]) -> None:
    client = server.client()
    lines = [chat_line(i) for i in range(4)]
    lines += [chat_line(10 + i, x_fake={"status": 400}) for i in range(3)]
    lines += [chat_line(20 + i, x_fake={"status": 404}) for i in range(5)]
    fid = upload(client, lines)
    batch = wait_for(
        client,
        client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h").id,
    )
    assert batch.status == "completed" and batch.error_file_id is not None

    dash = open_dash(server)
    page = dash.open(f"/#/batches/{batch.id}")
    groups = page.locator("#error-groups tbody tr")
    expect(groups).to_have_count(2)
    first, second = groups.nth(0), groups.nth(1)  # largest first
    expect(first.locator("td").nth(0)).to_contain_text("HTTP 404")
    expect(first.locator("td").nth(1)).to_have_text("5")
    expect(first.locator("ul.examples li")).to_have_count(3)  # a few examples, not all
    expect(first).to_contain_text("fake failure (status 404)")
    expect(second.locator("td").nth(0)).to_contain_text("HTTP 400")
    expect(second.locator("td").nth(1)).to_have_text("3")
    for i in range(3):
        expect(second).to_contain_text(f"req-{10 + i}")
    expect(page.locator("#error-groups-section")).to_contain_text("8 error lines.")
    expect(page.locator("table.kv").first).to_contain_text("4 completed · 8 failed · 12 total")

    with page.expect_download() as info:
        page.click("#download-errors")
    assert info.value.path().read_bytes() == client.files.content(batch.error_file_id).content
    dash.shot("10-error-groups")


def test_tenant_text_is_never_run(
    make_server: Callable[..., Server], upstream: FakeUpstream, open_dash: Callable[..., Dash]
) -> None:
    srv = make_server("--upstream", f"test-model={upstream.base_url}", "--lease-seconds", "2")
    client = srv.client()
    # markup in the metadata, the filename and (through the model name) a validation error message
    fid = upload(client, [chat_line(0), chat_line(1, model=XSS)], name=f"{XSS}.jsonl")
    batch = wait_for(
        client,
        client.batches.create(
            input_file_id=fid,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"note": XSS},
        ).id,
    )
    assert batch.status == "failed"
    # and in a custom_id of the error file
    failing = chat_line(2, x_fake={"status": 400})
    failing["custom_id"] = XSS
    ran = wait_for(
        client,
        client.batches.create(
            input_file_id=upload(client, [failing]), endpoint="/v1/chat/completions", completion_window="24h"
        ).id,
    )
    assert ran.status == "completed" and ran.error_file_id is not None

    dash = open_dash(srv)
    page = dash.open(f"/#/batches/{batch.id}")
    expect(page.locator("dl.metadata dd")).to_have_text(XSS)
    expect(page.locator("#validation-errors")).to_contain_text(
        f"The provided model '{XSS}' is not supported by the Batch API."
    )
    page.goto(dash.url(f"/#/batches/{ran.id}"))
    expect(page.locator("#error-groups ul.examples code")).to_have_text(XSS)
    page.goto(dash.url("/#/files"))
    expect(page.locator(f'tr[data-file-id="{fid}"] .filename')).to_have_text(f"{XSS}.jsonl")
    dash.shot("11-xss-escaped")
    for path in (f"/#/batches/{batch.id}", f"/#/batches/{ran.id}", "/#/files", "/#/batches"):
        page.goto(dash.url(path))
        page.wait_for_timeout(500)
        assert page.locator("img").count() == 0, "markup from the API became an element"
        assert page.evaluate("window.__xss") is None
        assert dash.violations() == [], "the page tried something the CSP forbids"


def test_the_dashboard_is_sent_with_a_strict_csp(server: Server, open_dash: Callable[..., Dash]) -> None:
    dash = open_dash(server)
    response = dash.page.goto(dash.url("/"))
    assert response is not None and response.ok
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    for asset in ("/ui/app.js", "/ui/style.css"):
        r = dash.page.request.get(dash.url(asset))
        assert r.ok and r.headers["content-security-policy"] == csp
        assert r.headers["x-content-type-options"] == "nosniff"
    # an inline script injected at run time is refused by the browser
    dash.page.evaluate(
        "() => { const s = document.createElement('script'); s.textContent = 'window.__inline = 1'; document.body.append(s); }"
    )
    dash.page.wait_for_timeout(200)
    assert dash.page.evaluate("window.__inline") is None
    assert any("script-src" in v for v in dash.violations())
    missing = dash.page.request.get(dash.url("/ui/ui_routes.py"))
    assert missing.status == 404
