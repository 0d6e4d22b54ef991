"""The API key: asked once, a clear message for a wrong one, sign-out, and each key sees only its own batches."""

from __future__ import annotations

from collections.abc import Callable

from playwright.sync_api import expect

from tests.conftest import Server
from tests.support.batches import chat_line, upload
from tests.ui.conftest import KEY_A, KEY_B, Dash


def test_open_without_a_key_then_a_wrong_key(keyed_server: Server, open_dash: Callable[..., Dash]) -> None:
    dash = open_dash(keyed_server)
    page = dash.open()
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("#key-form")).to_contain_text("This server needs an API key")
    expect(page.locator("#key-error")).to_be_hidden()
    expect(page.locator("#nav")).to_be_hidden()
    dash.shot("01-sign-in")

    dash.sign_in("sk-not-a-key")
    expect(page.locator("#key-error")).to_be_visible()
    expect(page.locator("#key-error")).to_contain_text(
        "That API key was not accepted (401: Incorrect API key provided.)"
    )
    assert page.evaluate("sessionStorage.getItem('batchyard.apiKey')") is None  # a wrong key is not kept
    assert "sk-not-a-key" not in page.url
    dash.shot("02-wrong-key")

    dash.sign_in(KEY_A)
    expect(page.locator("#batches")).to_be_visible()
    expect(page.locator("#sign-out")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('batchyard.apiKey')") == KEY_A
    page.reload()  # kept for the tab: not asked again
    expect(page.locator("#batches")).to_be_visible()
    expect(page.locator("#key-form")).to_have_count(0)

    page.click("#sign-out")
    expect(page.locator("#key-form")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('batchyard.apiKey')") is None


def test_a_server_without_keys_needs_none(server: Server, open_dash: Callable[..., Dash]) -> None:
    dash = open_dash(server)
    page = dash.open()
    expect(page.locator("#batches")).to_be_visible()
    expect(page.locator("#who")).to_have_text("open server (no API key needed)")
    expect(page.locator("#sign-out")).to_be_hidden()
    expect(page.locator("#key-form")).to_have_count(0)


def test_each_key_sees_only_its_batches(keyed_server: Server, open_dash: Callable[..., Dash]) -> None:
    mine: dict[str, str] = {}
    for key in (KEY_A, KEY_B):
        client = keyed_server.client(api_key=key)
        fid = upload(client, [chat_line(i) for i in range(3)])
        mine[key] = client.batches.create(
            input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h"
        ).id

    dash = open_dash(keyed_server)
    page = dash.open(key=KEY_A)
    rows = page.locator("#batches tbody tr")
    expect(rows).to_have_count(1)
    expect(page.locator(f'tr[data-batch-id="{mine[KEY_A]}"]')).to_be_visible()
    expect(page.locator(f'tr[data-batch-id="{mine[KEY_B]}"]')).to_have_count(0)
    dash.shot("03-key-a-batches")

    page.click("#sign-out")
    dash.sign_in(KEY_B)
    expect(page.locator(f'tr[data-batch-id="{mine[KEY_B]}"]')).to_be_visible()
    expect(rows).to_have_count(1)
    expect(page.locator(f'tr[data-batch-id="{mine[KEY_A]}"]')).to_have_count(0)
    # another owner's batch page is a 404, shown as such
    page.goto(dash.url(f"/#/batches/{mine[KEY_A]}"))
    expect(page.locator("#banner")).to_contain_text(f"No batch found with id '{mine[KEY_A]}'")
