"""Files: the list (purpose, size with units, created), download, delete."""

from __future__ import annotations

from collections.abc import Callable

import openai
import pytest
from playwright.sync_api import expect

from tests.conftest import Server
from tests.support.batches import chat_line, jsonl
from tests.ui.conftest import KEY_A, KEY_B, Dash


def test_files_list_download_and_delete(keyed_server: Server, open_dash: Callable[..., Dash]) -> None:
    client = keyed_server.client(api_key=KEY_A)
    data = jsonl([chat_line(i) for i in range(40)])
    assert 2048 < len(data) < 10 * 1024
    kept = client.files.create(file=("questions.jsonl", data), purpose="batch")
    doomed = client.files.create(file=("old.jsonl", b'{"x": 1}\n'), purpose="batch")
    theirs = keyed_server.client(api_key=KEY_B).files.create(file=("theirs.jsonl", b"{}\n"), purpose="batch")

    dash = open_dash(keyed_server)
    page = dash.open("/#/files", key=KEY_A)
    rows = page.locator("#files tbody tr")
    expect(rows).to_have_count(2)
    expect(page.locator(f'tr[data-file-id="{theirs.id}"]')).to_have_count(0)
    row = page.locator(f'tr[data-file-id="{kept.id}"]')
    expect(row.locator(".filename")).to_have_text("questions.jsonl")
    expect(row).to_contain_text("batch")
    expect(row.locator("td").nth(3)).to_have_text(f"{len(data) / 1024:.1f} KiB")
    expect(page.locator(f'tr[data-file-id="{doomed.id}"] td').nth(3)).to_have_text("9 B")
    expect(row).to_contain_text("ago")
    dash.shot("12-files")

    with page.expect_download() as info:
        row.locator("button.download").click()
    assert info.value.suggested_filename == "questions.jsonl"
    assert info.value.path().read_bytes() == data

    page.once("dialog", lambda d: d.accept())
    page.locator(f'tr[data-file-id="{doomed.id}"] button.delete').click()
    expect(page.locator(f'tr[data-file-id="{doomed.id}"]')).to_have_count(0)
    expect(rows).to_have_count(1)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(doomed.id)
    assert client.files.retrieve(kept.id).id == kept.id
    dash.shot("13-file-deleted")
