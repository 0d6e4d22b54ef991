"""Batch lines sent to llama.cpp's server as streams (upstreams/streamed.py), on the real engine (`xllamacpp.Server`,
SmolLM2-135M on the CPU): the answers are the engine's own, and a line cut short stops the engine at once (a plain
request whose client left runs to its end there: `python bench/engine_abort.py`)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from batchyard.embedded.models import ensure_smollm2
from batchyard.upstreams.http import HTTPUpstream
from tests.conftest import Server
from tests.support.batches import WEATHER_TOOL, read_lines, upload, wait_for
from tests.support.llama_server import LlamaServer

pytestmark = pytest.mark.slow

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "Hi"}]
BODIES = [
    (CHAT, {"max_tokens": 12, "messages": HI}),
    (CHAT, {"max_tokens": 5, "messages": HI, "logprobs": True, "top_logprobs": 2}),
    (CHAT, {"max_tokens": 40, "messages": HI, "tools": [WEATHER_TOOL], "tool_choice": "required"}),
    (CHAT, {"max_tokens": 9, "messages": [{"role": "user", "content": "Write hello world in Python."}]}),
    (TEXT, {"max_tokens": 6, "prompt": "Hello"}),
    (TEXT, {"max_tokens": 4, "prompt": "Hello", "logprobs": 2}),
    (CHAT, {"max_tokens": 5, "messages": "not a list"}),  # an error answer: passed on as it is
]
LONG = {
    "max_tokens": 2000,
    "temperature": 0,
    "messages": [{"role": "user", "content": "Write a long story."}],
}


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaServer]:
    with LlamaServer(ensure_smollm2()) as eng:
        yield eng


def _rounded(value: Any) -> Any:
    """Log-probabilities to 4 places: the second request finds its prompt in the engine's cache, and a float
    computed in a batch of another size may differ in its last bits."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _comparable(raw: bytes) -> Any:
    answer = orjson.loads(raw)
    for varies in ("id", "created", "timings"):  # per request, and the time it took
        answer.pop(varies, None)
    answer.get("usage", {}).pop("prompt_tokens_details", None)  # what the engine's cache held then
    return _rounded(answer)


@pytest.mark.parametrize(("endpoint", "body"), BODIES)
def test_a_line_sent_as_a_stream_gets_the_answer_a_plain_request_gets(
    engine: LlamaServer, endpoint: str, body: dict[str, Any]
) -> None:
    async def both() -> tuple[Any, Any]:
        up = HTTPUpstream(engine.base_url)
        try:
            assert await up.engine_slots(timeout=5) == 4  # llama.cpp: `auto` sends its lines as streams
            full = {"model": "m", "temperature": 0, **body}
            assert up.streams(endpoint, full)
            plain = await up.call(endpoint, orjson.dumps(full), timeout=120)
            streamed = await up.call_streamed(endpoint, full, timeout=120)
        finally:
            await up.close()
        assert plain.status == streamed.status
        if plain.status != 200:
            return plain.body, streamed.body
        return _comparable(plain.body), _comparable(streamed.body)

    plain, streamed = asyncio.run(both())
    assert streamed == plain


def _long_batch(srv: Server, n: int) -> str:
    client = srv.client()
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": CHAT, "body": {"model": "m", **LONG, "seed": i}}
        for i in range(n)
    ]
    return client.batches.create(
        input_file_id=upload(client, lines), endpoint="/v1/chat/completions", completion_window="24h"
    ).id


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_cancelled_batch_stops_the_engine_at_once(
    engine: LlamaServer, make_server: Callable[..., Server]
) -> None:
    """Lines of 2,000 tokens keep 4 slots of 2 CPU threads busy for minutes; cancelled, the engine is idle again at
    once (sent whole, each would run to its end). `--cancel-grace 0`: the lines in flight are cut at once."""
    srv = make_server("--upstream", engine.base_url, "--concurrency", "4", "--cancel-grace", "0")
    batch_id = _long_batch(srv, 8)
    _wait(lambda: engine.busy_slots() == 4, 60, "the batch's lines never filled the engine")
    srv.client().batches.cancel(batch_id)
    b = wait_for(srv.client(), batch_id, timeout=60)
    assert b.status == "cancelled"
    _wait(lambda: engine.busy_slots() == 0, 10, "the engine is still working on the cancelled lines")


def test_an_online_request_cuts_batch_lines_short_and_they_are_sent_again(
    engine: LlamaServer, make_server: Callable[..., Server]
) -> None:
    """`--online-priority pause`: an online request through the front door cuts the batch's streams (the engine
    stops them), runs alone, and the lines are sent again: every line answered once, in the engine's own shape."""
    srv = make_server(
        "--upstream",
        engine.base_url,
        "--concurrency",
        "4",
        "--online-priority",
        "pause",
        "--api-key",
        "sk-test",
    )
    client = srv.client()
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": CHAT,
            "body": {
                "model": "m",
                "max_tokens": 60,
                "temperature": 0,
                "messages": [{"role": "user", "content": f"Count to {i + 20}."}],
            },
        }
        for i in range(6)
    ]
    batch = client.batches.create(
        input_file_id=upload(client, lines), endpoint="/v1/chat/completions", completion_window="24h"
    )
    _wait(lambda: engine.busy_slots() >= 2, 60, "the batch's lines never reached the engine")
    online = client.chat.completions.create(model="m", max_tokens=4, temperature=0, messages=HI)  # type: ignore[arg-type]
    assert online.choices[0].message.content
    b = wait_for(client, batch.id, timeout=180)
    assert b.status == "completed" and b.request_counts is not None and b.request_counts.completed == 6
    out = read_lines(client, b.output_file_id)
    assert sorted(x["custom_id"] for x in out) == [f"r{i}" for i in range(6)]
    for line in out:
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] > 0
    metrics = httpx.get(srv.root_url + "/metrics", headers={"Authorization": "Bearer sk-t"}).text
    cut = re.search(r'batchyard_upstream_requests_total\{[^}]*status="preempted"[^}]*\} (\d+)', metrics)
    assert cut is not None and int(cut.group(1)) >= 2  # the lines in flight when the online request came
