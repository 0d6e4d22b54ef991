"""Batches: watch one run to completion, download its output, cancel one, polling stops in a hidden tab."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import Server
from tests.support.batches import chat_line, upload, wait_for
from tests.support.fake_upstream import FakeUpstream
from tests.ui.conftest import Dash


@pytest.fixture
def slow_server(make_server: Callable[..., Server], upstream: FakeUpstream) -> Server:
    """Two requests in flight at most, so a batch of slow lines takes several seconds."""
    return make_server(
        "--upstream", upstream.base_url, "--concurrency", "2", "--lease-seconds", "2", "--shard-lines", "10",
    )  # fmt: skip


def start_batch(server: Server, n: int, delay: float) -> str:
    client = server.client()
    fid = upload(client, [chat_line(i, x_fake={"delay": delay}) for i in range(n)])
    return client.batches.create(
        input_file_id=fid,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"purpose": "ui"},
    ).id


def progress(page: Page, batch_id: str) -> tuple[int, int] | None:
    bar = page.locator(f'tr[data-batch-id="{batch_id}"] progress')
    if bar.count() == 0:
        return None
    return int(bar.get_attribute("value") or 0), int(bar.get_attribute("max") or 0)


def test_watch_a_batch_run_to_completion(slow_server: Server, open_dash: Callable[..., Dash]) -> None:
    n = 60
    batch_id = start_batch(slow_server, n, delay=0.3)  # 60 x 0.3 s / 2 in flight: about 9 s
    dash = open_dash(slow_server)
    page = dash.open()
    row = page.locator(f'tr[data-batch-id="{batch_id}"]')
    expect(row).to_be_visible()
    seen: list[int] = []
    shot_taken = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        value = progress(page, batch_id)
        if value is not None and (not seen or value[0] != seen[-1]):
            seen.append(value[0])
            if 0 < value[0] < n and not shot_taken:
                expect(row.locator(".status")).to_have_text("in_progress")
                dash.shot("04-batch-running")
                shot_taken = True
        if row.locator(".status").text_content() == "completed":
            break
        time.sleep(0.2)
    expect(row.locator(".status")).to_have_text("completed")
    value = progress(page, batch_id)
    assert value == (n, n)
    if seen[-1] != n:
        seen.append(n)
    assert seen == sorted(seen), f"progress went backwards: {seen}"
    assert len([v for v in seen if 0 < v < n]) >= 2, f"the bar did not move while running: {seen}"
    expect(row.locator(".counts")).to_have_text(f"{n} ok · 0 failed · {n}")
    expect(row).to_contain_text("lines/s")
    expect(row).to_contain_text("/v1/chat/completions")
    expect(row).to_contain_text("test-model")
    dash.shot("05-batch-completed")

    # the same list at 800 px: nothing wider than the window
    narrow = open_dash(slow_server, width=800)
    narrow.open()
    expect(narrow.page.locator(f'tr[data-batch-id="{batch_id}"]')).to_be_visible()
    assert narrow.page.evaluate("document.documentElement.scrollWidth") <= 800
    wrap = "document.querySelector('.table-wrap')"
    assert narrow.page.evaluate(f"{wrap}.scrollWidth <= {wrap}.clientWidth"), (
        "the table fits without scrolling"
    )
    narrow.shot("06-batches-800px")


def test_open_a_batch_and_download_its_output(
    server: Server, open_dash: Callable[..., Dash], tmp_path: Path
) -> None:
    client = server.client()
    fid = upload(client, [chat_line(i) for i in range(5)])
    batch = wait_for(
        client,
        client.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h").id,
    )
    assert batch.status == "completed" and batch.output_file_id is not None
    expected = client.files.content(batch.output_file_id).content

    dash = open_dash(server)
    page = dash.open()
    page.click(f'tr[data-batch-id="{batch.id}"] a')
    expect(page.locator(".title-row h1")).to_have_text(batch.id)
    expect(page.locator("#timings")).to_contain_text("created")
    expect(page.locator("#timings")).to_contain_text("in progress")
    expect(page.locator("#timings")).to_contain_text("finalizing")
    expect(page.locator("#timings li").last).to_contain_text("completed")
    expect(page.locator("#cancel")).to_have_count(0)
    input_tokens = batch.usage.input_tokens if batch.usage else 0
    expect(page.locator("table.kv").filter(has_text="input tokens")).to_contain_text(str(input_tokens))
    expect(page.locator("#error-groups-section")).to_contain_text("No error file")
    dash.shot("07-batch-page")

    with page.expect_download() as info:
        page.click("#download-output")
    download = info.value
    saved = tmp_path / "out.jsonl"
    download.save_as(saved)
    assert saved.read_bytes() == expected
    assert download.suggested_filename == client.files.retrieve(batch.output_file_id).filename


def test_cancel_a_running_batch(slow_server: Server, open_dash: Callable[..., Dash]) -> None:
    batch_id = start_batch(slow_server, 200, delay=0.3)
    client = slow_server.client()
    wait_for(client, batch_id, {"in_progress"})
    dash = open_dash(slow_server)
    page = dash.open(f"/#/batches/{batch_id}")
    expect(page.locator("#cancel")).to_be_visible()

    page.once("dialog", lambda d: d.dismiss())  # "no": nothing happens
    page.click("#cancel")
    time.sleep(0.5)
    assert client.batches.retrieve(batch_id).status == "in_progress"

    messages: list[str] = []

    def accept(dialog: object) -> None:
        messages.append(dialog.message)  # type: ignore[attr-defined]
        dialog.accept()  # type: ignore[attr-defined]

    page.once("dialog", accept)
    page.click("#cancel")
    expect(page.locator(".title-row .status")).to_have_text("cancelled", timeout=30_000)
    assert messages and batch_id in messages[0]
    expect(page.locator("#cancel")).to_have_count(0)
    done = client.batches.retrieve(batch_id)
    assert done.status == "cancelled"
    assert done.request_counts is not None and done.request_counts.completed < 200
    expect(page.locator('#error-groups tr[data-group="batch_cancelled"]')).to_be_visible()
    dash.shot("08-batch-cancelled")


def test_polling_stops_while_the_tab_is_hidden(server: Server, open_dash: Callable[..., Dash]) -> None:
    dash = open_dash(server)
    page = dash.open()
    expect(page.locator("#batches")).to_be_visible()
    asked: list[str] = []
    # (events reach the test only while Playwright waits: page.wait_for_timeout, not time.sleep)
    page.on("request", lambda r: asked.append(r.url) if "/v1/batches" in r.url else None)
    page.wait_for_timeout(2500)
    assert asked, "the list is refreshed every 2 s"
    page.evaluate(
        "Object.defineProperty(document, 'hidden', {configurable: true, get: () => true});"
        "document.dispatchEvent(new Event('visibilitychange'))"
    )
    page.wait_for_timeout(300)  # a request already under way may finish
    asked.clear()
    page.wait_for_timeout(4500)
    assert asked == [], "a hidden tab does not poll"
    page.evaluate(
        "Object.defineProperty(document, 'hidden', {configurable: true, get: () => false});"
        "document.dispatchEvent(new Event('visibilitychange'))"
    )
    page.wait_for_timeout(500)
    assert asked, "polling resumes when the tab is shown again"
