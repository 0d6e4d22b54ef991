"""Helpers to build input files and wait for batches in tests."""

from __future__ import annotations

import json
import time
from typing import Any

from openai import OpenAI
from openai.types import Batch

TERMINAL = {"completed", "failed", "expired", "cancelled"}
WEATHER_TOOL = {  # a function tool for chat requests that must call one
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def chat_line(
    i: int, model: str = "test-model", x_fake: dict[str, Any] | None = None, **body: Any
) -> dict[str, Any]:
    b: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": f"question number {i}"}],
        **body,
    }
    if x_fake is not None:
        b["x_fake"] = x_fake
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": b}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return ("\n".join(json.dumps(x) for x in lines) + "\n").encode()


def upload(client: OpenAI, lines: list[dict[str, Any]] | bytes, name: str = "input.jsonl") -> str:
    data = lines if isinstance(lines, bytes) else jsonl(lines)
    return client.files.create(file=(name, data), purpose="batch").id


def wait_for(client: OpenAI, batch_id: str, statuses: set[str] = TERMINAL, timeout: float = 60.0) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in statuses:
            return b
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {b.status} after {timeout}s")
        time.sleep(0.1)


def read_lines(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    text = client.files.content(file_id).text
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def run_batch(
    client: OpenAI,
    lines: list[dict[str, Any]],
    endpoint: str = "/v1/chat/completions",
    window: str = "24h",
    timeout: float = 60.0,
) -> Batch:
    fid = upload(client, lines)
    b = client.batches.create(input_file_id=fid, endpoint=endpoint, completion_window=window)  # type: ignore[arg-type]
    return wait_for(client, b.id, timeout=timeout)
