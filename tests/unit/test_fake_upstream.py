"""Tests for the deterministic fake upstream (tests/support/fake_upstream.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.fake_upstream import (
    EMBEDDING_DIM,
    HUGE_INT,
    FakeUpstream,
    build_response,
    expected_embedding,
    expected_text,
    selected_for_failure,
)

ROOT = Path(__file__).resolve().parents[2]


def chat(content: str = "hello there world", **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


@pytest.fixture
async def session(upstream: FakeUpstream) -> AsyncIterator[aiohttp.ClientSession]:
    upstream.reset()
    async with aiohttp.ClientSession() as s:
        yield s


async def post(
    s: aiohttp.ClientSession, url: str, body: dict[str, Any], **kw: Any
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with s.post(url, json=body, **kw) as r:
        raw = await r.read()
        try:
            data = json.loads(raw)
        except ValueError:
            data = raw.decode()
        return r.status, data, r


async def test_base_url_and_health(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    assert upstream.base_url == f"http://127.0.0.1:{upstream.port}/v1"
    async with session.get(upstream.root_url + "/health") as r:
        assert r.status == 200
    async with session.get(upstream.base_url + "/models") as r:
        models = await r.json()
    assert models["object"] == "list"
    assert "fake-model" in [m["id"] for m in models["data"]]


async def test_chat_is_deterministic(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    body = chat("one two  three\nfour", temperature=0)
    status, data, resp = await post(session, upstream.base_url + "/chat/completions", body)
    assert status == 200
    assert resp.headers["x-request-id"].startswith("req_")
    text = expected_text(body)
    assert text.startswith("echo:") and len(text) == 5 + 16
    assert data["object"] == "chat.completion"
    assert data["model"] == "fake-model"
    assert data["choices"][0]["message"]["content"] == text
    assert data["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 3,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    assert data == build_response("/v1/chat/completions", body)
    # same body (x_fake aside) -> same text; any other body -> different text
    _, again, resp2 = await post(session, upstream.base_url + "/chat/completions", {**body, "x_fake": {}})
    assert again["choices"][0]["message"]["content"] == text
    assert resp2.headers["x-request-id"] != resp.headers["x-request-id"]
    assert expected_text(chat("one two three four")) != text
    assert expected_text({**body, "model": "other"}) != text


@pytest.mark.parametrize(
    ("path", "body", "prompt"),
    [
        ("/completions", {"model": "m", "prompt": "say a b c"}, 4),
        ("/completions", {"model": "m", "prompt": ["a b", "c"]}, 3),
        ("/responses", {"model": "m", "input": "tell me a story"}, 4),
        (
            "/responses",
            {"model": "m", "instructions": "be nice", "input": [{"role": "user", "content": "hi you"}]},
            4,
        ),
        ("/embeddings", {"model": "e", "input": "some words here"}, 3),
        ("/embeddings", {"model": "e", "input": ["x y", "z"]}, 3),
        ("/moderations", {"input": ["fine", "also fine"]}, 0),
    ],
)
async def test_other_endpoints(
    upstream: FakeUpstream,
    session: aiohttp.ClientSession,
    path: str,
    body: dict[str, Any],
    prompt: int,
) -> None:
    status, data, _ = await post(session, upstream.base_url + path, body)
    assert status == 200
    assert data == build_response("/v1" + path, body)
    text = expected_text(body)
    if path == "/completions":
        assert data["object"] == "text_completion"
        assert data["choices"][0]["text"] == text
        assert data["usage"]["prompt_tokens"] == prompt
        assert data["usage"]["total_tokens"] == prompt + 3
    elif path == "/responses":
        assert data["object"] == "response"
        assert data["output"][0]["content"][0]["text"] == text
        usage = data["usage"]
        assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (
            prompt,
            3,
            prompt + 3,
        )
        assert usage["input_tokens_details"] == {"cached_tokens": 0}
        assert usage["output_tokens_details"] == {"reasoning_tokens": 0}
    elif path == "/embeddings":
        n = 1 if isinstance(body["input"], str) else len(body["input"])
        assert [d["index"] for d in data["data"]] == list(range(n))
        for i, d in enumerate(data["data"]):
            assert len(d["embedding"]) == EMBEDDING_DIM
            assert d["embedding"] == expected_embedding(body, i)
        assert data["usage"] == {"prompt_tokens": prompt, "total_tokens": prompt}
    else:
        assert len(data["results"]) == 2
        assert data["results"][0]["flagged"] is False
        assert set(data["results"][0]["categories"]) == set(data["results"][0]["category_scores"])
    if "model" in body:
        assert data["model"] == body["model"]


async def test_embeddings_base64(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    body = {"model": "e", "input": "abc", "encoding_format": "base64"}
    _, data, _ = await post(session, upstream.base_url + "/embeddings", body)
    raw = base64.b64decode(data["data"][0]["embedding"])
    vec = struct.unpack(f"<{EMBEDDING_DIM}f", raw)
    assert vec == pytest.approx(expected_embedding(body, 0), abs=1e-6)


async def test_bad_requests(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    status, data, _ = await post(session, upstream.base_url + "/chat/completions", {"messages": []})
    assert status == 400
    assert data["error"]["param"] == "model"
    async with session.post(upstream.base_url + "/chat/completions", data=b"{nope") as r:
        assert r.status == 400
        assert set((await r.json())["error"]) == {"message", "type", "param", "code"}


async def test_status_and_retry_after(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    body = chat(x_fake={"status": 503, "retry_after": "2"})
    for _ in range(2):
        status, data, resp = await post(session, upstream.base_url + "/chat/completions", body)
        assert status == 503
        assert resp.headers["Retry-After"] == "2"
        assert set(data["error"]) == {"message", "type", "param", "code"}
        assert data["error"]["type"] == "server_error"
    status, data, resp = await post(
        session, upstream.base_url + "/chat/completions", chat(x_fake={"status": 429})
    )
    assert status == 429
    assert "Retry-After" not in resp.headers
    assert data["error"]["code"] == "rate_limit_exceeded"


async def test_fail_times(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    body = chat("flaky", x_fake={"status": 500, "fail_times": 2})
    statuses = [(await post(session, upstream.base_url + "/chat/completions", body))[0] for _ in range(4)]
    assert statuses == [500, 500, 200, 200]
    # a different x_fake is a different body: its own counter
    other = chat("flaky", x_fake={"status": 500, "fail_times": 1})
    statuses = [(await post(session, upstream.base_url + "/chat/completions", other))[0] for _ in range(2)]
    assert statuses == [500, 200]
    # /_reset clears the counters
    async with session.post(upstream.root_url + "/_reset") as r:
        assert r.status == 200
    assert (await post(session, upstream.base_url + "/chat/completions", other))[0] == 500


async def test_delay(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    t0 = time.monotonic()
    status, _, _ = await post(session, upstream.base_url + "/chat/completions", chat(x_fake={"delay": 0.2}))
    assert status == 200
    assert time.monotonic() - t0 >= 0.19


async def test_non_json(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    status, data, resp = await post(
        session, upstream.base_url + "/chat/completions", chat(x_fake={"non_json": True})
    )
    assert status == 200
    assert isinstance(data, str)
    assert not resp.headers["Content-Type"].startswith("application/json")


async def test_drip(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    body = chat(x_fake={"drip": 0.0005})
    t0 = time.monotonic()
    async with session.post(upstream.base_url + "/chat/completions", json=body) as r:
        assert r.headers.get("Transfer-Encoding") == "chunked"
        first = await r.content.read(1)
        assert first == b"{"
        raw = first + await r.read()
    elapsed = time.monotonic() - t0
    assert json.loads(raw) == build_response("/v1/chat/completions", body)
    assert elapsed >= len(raw) * 0.0005
    # a client read timeout fires on a slow drip
    slow = chat(x_fake={"drip": 0.05})
    with pytest.raises(asyncio.TimeoutError):
        async with session.post(
            upstream.base_url + "/chat/completions",
            json=slow,
            timeout=aiohttp.ClientTimeout(total=0.3),
        ) as r:
            await r.read()


async def test_reset_connection(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(
            upstream.base_url + "/chat/completions", json=chat(x_fake={"reset": True})
        ) as r:
            assert r.status == 200
            await r.read()
    # the server is still fine afterwards
    assert (await post(session, upstream.base_url + "/chat/completions", chat()))[0] == 200


async def test_big(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    body = chat(x_fake={"big": 200_000})
    _, data, resp = await post(session, upstream.base_url + "/chat/completions", body)
    assert len(data["x_fake_padding"]) == 200_000
    assert int(resp.headers["Content-Length"]) > 200_000
    assert data["choices"][0]["message"]["content"] == expected_text(body)


async def test_redirect(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    body = {"model": "m", "prompt": "p q", "x_fake": {"redirect": True}}
    status, _, resp = await post(session, upstream.base_url + "/completions", body, allow_redirects=False)
    assert status == 307
    assert resp.headers["Location"].startswith(upstream.base_url + "/chat/completions")
    status, data, resp = await post(session, upstream.base_url + "/completions", body)
    assert status == 200
    assert resp.url.path == "/v1/chat/completions"
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"] == expected_text(body)


async def test_stats(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    a, b = chat("a"), chat("b")
    for body in (a, a, b, {**a, "x_fake": {"status": 500}}):
        await post(session, upstream.base_url + "/chat/completions", body)
    async with session.get(upstream.root_url + "/_stats") as r:
        stats = await r.json()
    assert stats["total"] == 4
    assert stats["by_key"] == {expected_text(a): 3, expected_text(b): 1}
    assert stats["in_flight"] == 0
    assert stats["max_in_flight"] == 1
    assert upstream.stats()["by_key"] == stats["by_key"]
    async with session.post(upstream.root_url + "/_reset") as r:
        assert r.status == 200
    async with session.get(upstream.root_url + "/_stats") as r:
        assert await r.json() == {
            "total": 0,
            "by_key": {},
            "by_path": {},
            "in_flight": 0,
            "max_in_flight": 0,
            "streams_open": 0,
            "streams_done": 0,
            "streams_cancelled": 0,
            "streams_cut": 0,
        }


async def test_max_concurrency_and_server_delay() -> None:
    with FakeUpstream(delay=0.2, max_concurrency=2) as up:
        async with aiohttp.ClientSession() as s:
            t0 = time.monotonic()
            results = await asyncio.gather(
                *(post(s, up.base_url + "/chat/completions", chat(str(i))) for i in range(5))
            )
            elapsed = time.monotonic() - t0
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 200, 429, 429, 429]
    for status, data, resp in results:
        if status == 429:
            assert resp.headers["Retry-After"] == "0"
            assert data["error"]["type"] == "requests"
    assert elapsed >= 0.19
    stats = up.stats()
    assert stats["total"] == 5
    assert stats["max_in_flight"] >= 3
    assert stats["in_flight"] == 0


async def test_status_rate_is_deterministic() -> None:
    bodies = [chat(f"req {i}") for i in range(40)]
    chosen = [selected_for_failure(b, 0.5) for b in bodies]
    assert 0 < sum(chosen) < len(bodies)
    with FakeUpstream(status_rate=0.5, status=502, retry_after="1") as up:
        async with aiohttp.ClientSession() as s:
            results = [await post(s, up.base_url + "/chat/completions", b) for b in bodies]
    assert [r[0] == 502 for r in results] == chosen
    assert all(r[2].headers["Retry-After"] == "1" for r in results if r[0] == 502)


async def test_api_key() -> None:
    with FakeUpstream(api_key="sk-test") as up:
        async with aiohttp.ClientSession() as s:
            status, data, _ = await post(s, up.base_url + "/chat/completions", chat())
            assert status == 401
            assert data["error"]["code"] == "invalid_api_key"
            bad = {"Authorization": "Bearer nope"}
            assert (await post(s, up.base_url + "/chat/completions", chat(), headers=bad))[0] == 401
            good = {"Authorization": "Bearer sk-test"}
            assert (await post(s, up.base_url + "/chat/completions", chat(), headers=good))[0] == 200


def _spawn(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_upstream", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("READY http://127.0.0.1:"), line
    return proc, line.split()[1]


def _urlopen_json(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Authorization": "Bearer k"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def test_subprocess_mode_kill_and_restart() -> None:
    proc, base = _spawn("--port", "0", "--api-key", "k")
    try:
        assert base.endswith("/v1")
        body = chat("over the wire")
        status, data = _urlopen_json(base + "/chat/completions", body)
        assert status == 200
        assert data["choices"][0]["message"]["content"] == expected_text(body)
        port = base.rsplit(":", 1)[1].split("/")[0]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
        assert proc.stdout is not None
        proc.stdout.close()
    with pytest.raises(urllib.error.URLError):
        _urlopen_json(base + "/chat/completions", body)
    proc, base2 = _spawn("--port", port, "--api-key", "k")
    try:
        assert base2 == base
        assert _urlopen_json(base + "/chat/completions", body)[0] == 200
    finally:
        proc.terminate()
        assert proc.wait(timeout=5) == 0
        assert proc.stdout is not None
        proc.stdout.close()


# --------------------------------------------------------------------------- misbehaving answers


async def raw_post(port: int, body: dict[str, Any], path: str = "/v1/chat/completions") -> bytes:
    """POST ``body`` on a fresh socket with ``Connection: close``; every byte that comes back, until EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode() + data)
    try:
        return await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()
        await writer.wait_closed()


def split_answer(raw: bytes) -> tuple[bytes, dict[str, list[str]], bytes]:
    """(status line, headers lower-cased, body) of one raw HTTP/1.1 answer without interim responses."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines:
        name, _, value = line.decode().partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers, body


def depth(value: Any) -> int:
    n = 0
    while isinstance(value, list) and value:
        n, value = n + 1, value[0]
    return n + (1 if isinstance(value, list) else 0)


async def test_nested_200_and_error_bodies(upstream: FakeUpstream) -> None:
    body = chat("deep", x_fake={"nested": 300})
    _, _, data = split_answer(await raw_post(upstream.port, body))
    assert data.startswith(b"{") and b"[" * 300 + b"]" * 300 in data
    parsed = json.loads(data)  # 300 is within what Python's json reads
    assert depth(parsed["x_fake_nested"]) == 300
    assert parsed["choices"][0]["message"]["content"] == expected_text(body)
    # beyond what any serializer writes (orjson writes 254 levels): written as text
    _, _, data = split_answer(await raw_post(upstream.port, chat(x_fake={"nested": 5000})))
    assert data.endswith(b"[" * 5000 + b"]" * 5000 + b"}")
    status, _, data = split_answer(await raw_post(upstream.port, chat(x_fake={"status": 500, "nested": 300})))
    assert status == b"HTTP/1.1 500 Internal Server Error"
    err = json.loads(data)["error"]
    assert err["type"] == "server_error" and depth(err["x_fake_nested"]) == 300


async def test_huge_integers(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    _, _, data = split_answer(await raw_post(upstream.port, chat(x_fake={"huge_int": True})))
    assert b'"x_fake_huge":1180591620717411303424}' in data
    assert json.loads(data)["x_fake_huge"] == HUGE_INT
    body = chat(x_fake={"huge_usage": True})
    _, _, data = split_answer(await raw_post(upstream.port, body))
    usage = json.loads(data)["usage"]
    assert usage["prompt_tokens"] == usage["completion_tokens"] == usage["total_tokens"] == 2**70
    assert json.loads(data)["choices"][0]["message"]["content"] == expected_text(body)


async def test_odd_unicode_and_pretty(upstream: FakeUpstream) -> None:
    _, _, data = split_answer(await raw_post(upstream.port, chat(x_fake={"odd_unicode": True})))
    assert (
        b"\\ud800" in data and b"\\u0000" in data and "\u2028".encode() in data and "\u202e".encode() in data
    )
    assert json.loads(data)["x_fake_odd"] == "a\ud800b \u2028 \u2029 \x00 \u200f\u202e \udfff"
    body = chat(x_fake={"pretty": True})
    _, _, data = split_answer(await raw_post(upstream.port, body))
    assert data.count(b"\n") > 10 and b'\n  "choices": [' in data
    assert json.loads(data) == build_response("/v1/chat/completions", body)


@pytest.mark.parametrize("value", ["Fri, 01 Jan 10000 00:00:00 GMT", "inf", "nan", "-1", "1e309", "9" * 4000])
async def test_odd_retry_after(upstream: FakeUpstream, value: str) -> None:
    status, headers, _ = split_answer(
        await raw_post(upstream.port, chat(x_fake={"status": 429, "retry_after": value}))
    )
    assert status.startswith(b"HTTP/1.1 429 ")
    assert headers["retry-after"] == [value]


async def test_retry_after_ms(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    body = chat(x_fake={"status": 429, "retry_after_ms": "99999999999"})
    status, _, resp = await post(session, upstream.base_url + "/chat/completions", body)
    assert status == 429 and resp.headers["retry-after-ms"] == "99999999999"
    assert "Retry-After" not in resp.headers


async def test_100_continue_before_the_answer(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    body = chat(x_fake={"continue_100": True})
    raw = await raw_post(upstream.port, body)
    assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    _, _, data = split_answer(raw[len(b"HTTP/1.1 100 Continue\r\n\r\n") :])
    assert json.loads(data) == build_response("/v1/chat/completions", body)
    # a client that skips interim answers (aiohttp) sees the plain 200
    assert (await post(session, upstream.base_url + "/chat/completions", body))[1] == json.loads(data)


async def test_many_and_huge_headers(upstream: FakeUpstream) -> None:
    _, headers, data = split_answer(await raw_post(upstream.port, chat(x_fake={"many_headers": 10_000})))
    assert sum(1 for h in headers if h.startswith("x-fake-h")) == 10_000
    assert json.loads(data)["object"] == "chat.completion"
    _, headers, _ = split_answer(await raw_post(upstream.port, chat(x_fake={"header_bytes": 1_000_000})))
    assert headers["x-fake-big"] == ["b" * 1_000_000]


async def test_invalid_status_line(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    raw = await raw_post(upstream.port, chat(x_fake={"bad_status_line": True}))
    assert raw.startswith(b"HTTP/1.1 2x0 ")
    with pytest.raises(aiohttp.ClientResponseError):
        await post(session, upstream.base_url + "/chat/completions", chat(x_fake={"bad_status_line": True}))
    assert (await post(session, upstream.base_url + "/chat/completions", chat()))[0] == 200


async def test_content_length_mismatch(upstream: FakeUpstream) -> None:
    body = chat(x_fake={"content_length": 100})
    _, headers, data = split_answer(await raw_post(upstream.port, body))
    assert int(headers["content-length"][0]) == len(data) + 100  # truncated: the connection closed early
    assert json.loads(data) == build_response("/v1/chat/completions", body)
    body = chat(x_fake={"content_length": -10})
    _, headers, data = split_answer(await raw_post(upstream.port, body))
    assert int(headers["content-length"][0]) == len(data) - 10  # more bytes than declared
    assert headers["x-request-id"][0].startswith("req_")


async def test_received_records_raw_bodies(upstream: FakeUpstream, session: aiohttp.ClientSession) -> None:
    raw = b'{"model":"fake-model","messages":[],"n":1180591620717411303424}'
    async with session.post(upstream.base_url + "/chat/completions", data=raw) as r:
        assert r.status == 200
    async with session.post(upstream.base_url + "/chat/completions", data=b"[" * 3000 + b"]" * 3000) as r:
        assert r.status == 400  # deeper than Python's json reads: a clean 400, not a 500
    assert upstream.received() == [raw, b"[" * 3000 + b"]" * 3000]
    async with session.get(upstream.root_url + "/_received") as r:
        assert (await r.json())[0] == raw.decode()
    upstream.reset()
    assert upstream.received() == []
