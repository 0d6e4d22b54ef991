"""The online front door (api/online.py), end to end: a real `batchyard serve` on loopback in front of the fake
upstream, the official openai SDK as the client (raw httpx where the bytes or the status matter).

The server's routes: `fake-model`, `text-embedding-3-small` -> the fake; `pair` -> a dead address, then the fake
(a connect failure moves to the other member); `dead` -> the dead address only. Keys: two projects' stored keys.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from batchyard.upstreams.embedded import EmbeddedUpstream
from tests.conftest import Server
from tests.support.fake_upstream import (
    HUGE_INT,
    FakeUpstream,
    build_response,
    expected_embedding,
    expected_text,
)
from tests.support.processes import free_port

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello"}]


def new_key(data_dir: Path, project: str) -> str:
    """A stored key of `project` (`batchyard keys create` on the server's store)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "batchyard.cli.main",
            "keys",
            "create",
            "--project",
            project,
            "--data-dir",
            str(data_dir),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return out.splitlines()[-1]


@pytest.fixture(scope="module")
def up() -> Iterator[FakeUpstream]:
    with FakeUpstream() as u:
        yield u


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    data = tmp_path_factory.mktemp("online") / "data"
    return data, new_key(data, "alpha"), new_key(data, "beta")


def routes(up: FakeUpstream, dead: str) -> list[str]:
    pairs = [("fake-model", up.base_url), ("text-embedding-3-small", up.base_url)]
    pairs += [("pair", dead), ("pair", up.base_url), ("dead", dead)]
    return [arg for model, url in pairs for arg in ("--upstream", f"{model}={url}")]


@pytest.fixture(scope="module")
def srv(up: FakeUpstream, keys: tuple[Path, str, str]) -> Iterator[Server]:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    config = (
        keys[0].parent / "batchyard.toml"
    )  # `prio-model`: a member with a vLLM priority hint for batch lines
    config.write_text(
        f'[[upstreams]]\nname = "prio"\nbase_url = "{up.base_url}"\nmodels = ["prio-model"]\npriority = -1\n'
    )
    with Server(keys[0], [*routes(up, dead), "--attempt-timeout", "3", "--config", str(config)]) as s:
        yield s


@pytest.fixture(scope="module")
def key(keys: tuple[Path, str, str]) -> str:
    return keys[1]


@pytest.fixture(scope="module")
def oai(srv: Server, key: str) -> openai.OpenAI:
    return srv.client(key)


@pytest.fixture(scope="module")
def http(srv: Server, key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        yield c


def envelope(resp: httpx.Response, status: int, code: str | None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code, body
    return dict(body["error"])


# -- each endpoint through the SDK -----------------------------------------------------------------------------


def test_chat_completions(oai: openai.OpenAI, up: FakeUpstream) -> None:
    resp = oai.chat.completions.create(model="fake-model", messages=MESSAGES)
    assert resp.choices[0].message.content == expected_text({"model": "fake-model", "messages": MESSAGES})
    assert resp.usage is not None and resp.usage.completion_tokens == 3
    assert resp._request_id is not None and resp._request_id.startswith("req_")  # the fake's own id


def test_completions_embeddings_and_responses(oai: openai.OpenAI) -> None:
    done = oai.completions.create(model="fake-model", prompt="Once upon")
    assert done.choices[0].text == expected_text({"model": "fake-model", "prompt": "Once upon"})
    emb = oai.embeddings.create(model="text-embedding-3-small", input="hi", encoding_format="float")
    body = {"model": "text-embedding-3-small", "input": "hi", "encoding_format": "float"}
    assert emb.data[0].embedding == expected_embedding(body)
    resp = oai.responses.create(model="fake-model", input="Say hello")
    assert resp.output_text == expected_text({"model": "fake-model", "input": "Say hello"})


def test_a_stream_reaches_the_client_before_the_upstream_ends(oai: openai.OpenAI, up: FakeUpstream) -> None:
    up.reset()
    stream = oai.chat.completions.create(
        model="fake-model",
        messages=MESSAGES,
        stream=True,
        extra_body={"x_fake": {"hold": True}},  # the fake holds the stream after its first event
    )
    chunks = iter(stream)
    first = next(chunks)
    assert first.choices[0].delta.content == "echo:"
    stats = up.stats()
    assert stats["streams_open"] == 1 and stats["streams_done"] == 0  # the upstream is still answering
    up.release()
    text = "echo:" + "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == expected_text({"model": "fake-model", "messages": MESSAGES, "stream": True})
    # the fake counts a stream done after writing its last event, on its own thread: the client may read it first
    deadline = time.monotonic() + 10
    while up.stats()["streams_done"] != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert up.stats()["streams_done"] == 1


def test_streams_of_completions_and_responses(oai: openai.OpenAI) -> None:
    pieces = [c.choices[0].text for c in oai.completions.create(model="fake-model", prompt="x", stream=True)]
    assert "".join(pieces) == expected_text({"model": "fake-model", "prompt": "x", "stream": True})
    events = list(oai.responses.create(model="fake-model", input="x", stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == expected_text({"model": "fake-model", "input": "x", "stream": True})


def test_a_stream_that_stalls_ends_with_an_error_the_sdk_raises(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="fake-model",
        messages=MESSAGES,
        stream=True,
        extra_body={
            "x_fake": {"stream_gap": 5}
        },  # longer than the server's --attempt-timeout 3 between chunks
    )
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.content == "echo:"
    with pytest.raises(openai.APIError) as info:
        next(chunks)
    assert info.value.code == "request_timeout"


def test_a_client_that_goes_away_closes_the_upstream_request(srv: Server, key: str, up: FakeUpstream) -> None:
    up.reset()
    body = {"model": "fake-model", "messages": MESSAGES, "stream": True, "x_fake": {"hold": True}}
    headers = {"Authorization": f"Bearer {key}"}
    with (
        httpx.Client(timeout=30) as c,
        c.stream("POST", srv.base_url + "/chat/completions", json=body, headers=headers) as r,
    ):
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert next(r.iter_raw()).startswith(b"data: ")
    deadline = (
        time.monotonic() + 1.5
    )  # at once: well before the chunk timeout (--attempt-timeout 3) would cut it
    while up.stats()["streams_cancelled"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    # at least this one: a stream an earlier test left may end (cancelled) after the reset too
    assert up.stats()["streams_cancelled"] >= 1 and up.stats()["streams_done"] == 0


def test_a_client_that_gives_up_waiting_closes_the_upstream_request(
    srv: Server, key: str, up: FakeUpstream
) -> None:
    up.reset()
    body = {"model": "fake-model", "messages": MESSAGES, "x_fake": {"delay": 2.5}}
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            srv.base_url + "/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=0.5,
        )
    while up.stats()["in_flight"] and time.monotonic() - started < 1.7:
        time.sleep(0.05)
    assert up.stats()["in_flight"] == 0  # cut well before the fake's 2.5 s were over


# -- what is passed through, exactly ---------------------------------------------------------------------------


def test_bodies_pass_through_byte_for_byte(http: httpx.Client, up: FakeUpstream) -> None:
    raw = (
        b'{ "model":"prio-model",  "messages":[{"role":"user","content":"x"}],'
        b' "seed": %d, "x_fake": {"huge_int": true} }' % HUGE_INT
    )
    r = http.post("/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200
    assert (
        up.received()[-1] == raw
    )  # not re-serialized: spacing, an integer past 64 bits kept; no priority added
    assert b'"x_fake_huge":%d' % HUGE_INT in r.content
    payload = build_response("/v1/chat/completions", json.loads(raw))
    assert json.loads(r.content) == {**payload, "x_fake_huge": HUGE_INT}
    assert len(r.headers.get_list("x-request-id")) == 1  # the upstream's id, not a second one of ours
    assert r.headers["content-type"] == "application/json"  # the fake's, as it sent it


def test_upstream_errors_come_back_as_they_were(http: httpx.Client) -> None:
    body = {"model": "fake-model", "messages": MESSAGES, "x_fake": {"status": 429, "retry_after": "7"}}
    r = http.post("/chat/completions", json=body)
    assert envelope(r, 429, "rate_limit_exceeded")["message"] == "fake failure (status 429)"
    assert r.headers["retry-after"] == "7"


# -- refused before the upstream -------------------------------------------------------------------------------


def test_unknown_model_bad_json_and_missing_model(http: httpx.Client, oai: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        oai.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    envelope(http.post("/embeddings", content=b"{not json"), 400, "invalid_json")
    envelope(http.post("/embeddings", content=b"[1, 2]"), 400, "invalid_json")
    envelope(http.post("/responses", json={"input": "x"}), 400, "missing_required_parameter")
    envelope(http.post("/responses", json={"model": 5}), 400, "invalid_type")


def test_bodies_over_the_line_cap_get_413(http: httpx.Client) -> None:
    from batchyard.api.online import MAX_BODY

    big = b'{"model":"fake-model","input":"' + b"x" * MAX_BODY + b'"}'
    envelope(http.post("/embeddings", content=big), 413, "request_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: cut once past the cap
        yield big[: len(big) // 2]
        yield big[len(big) // 2 :]

    envelope(http.post("/embeddings", content=chunked()), 413, "request_too_large")


def test_a_key_is_needed(srv: Server) -> None:
    r = httpx.post(srv.base_url + "/chat/completions", json={"model": "fake-model", "messages": MESSAGES})
    envelope(r, 401, "missing_api_key")
    with pytest.raises(openai.AuthenticationError):
        srv.client("sk-wrong").chat.completions.create(model="fake-model", messages=MESSAGES)


def test_upstream_down_is_502_and_another_member_takes_it(http: httpx.Client, up: FakeUpstream) -> None:
    err = envelope(
        http.post("/chat/completions", json={"model": "dead", "messages": MESSAGES}), 502, "upstream_connect"
    )
    assert err["type"] == "server_error"
    up.reset()
    r = http.post(
        "/chat/completions", json={"model": "pair", "messages": MESSAGES}
    )  # its first member is dead
    assert r.status_code == 200
    assert up.stats()["total"] == 1


def test_an_upstream_too_slow_is_504(http: httpx.Client) -> None:
    body = {"model": "fake-model", "messages": MESSAGES, "x_fake": {"delay": 5}}
    envelope(http.post("/chat/completions", json=body), 504, "request_timeout")


def test_metrics_count_online_requests(srv: Server, http: httpx.Client) -> None:
    def count(status: str) -> float:
        text = httpx.get(srv.root_url + "/metrics", timeout=10).text
        m = re.search(
            rf'^batchyard_online_requests_total\{{endpoint="/v1/completions",status="{status}"\}} (\S+)$',
            text,
            re.M,
        )
        return float(m.group(1)) if m else 0.0

    ok, missing = count("200"), count("404")
    assert http.post("/completions", json={"model": "fake-model", "prompt": "m"}).status_code == 200
    assert http.post("/completions", json={"model": "nope", "prompt": "m"}).status_code == 404
    assert count("200") == ok + 1 and count("404") == missing + 1
    text = httpx.get(srv.root_url + "/metrics", timeout=10).text
    assert 'batchyard_online_first_byte_seconds_count{endpoint="/v1/completions"}' in text


def test_the_routes_are_in_the_openapi_document(srv: Server) -> None:
    paths = httpx.get(srv.root_url + "/openapi.json", timeout=10).json()["paths"]
    for endpoint in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"):
        assert "post" in paths[endpoint]


# -- quotas: each project its own rate -------------------------------------------------------------------------


def test_the_online_rate_is_per_project(tmp_path: Path, up: FakeUpstream) -> None:
    data = tmp_path / "data"
    alpha, beta = new_key(data, "alpha"), new_key(data, "beta")
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with Server(data, [*routes(up, dead), "--project-online-rpm", "2"]) as srv:
        a, b = srv.client(alpha), srv.client(beta)
        for _ in range(2):
            a.embeddings.create(model="text-embedding-3-small", input="x", encoding_format="float")
        r = httpx.post(
            srv.base_url + "/embeddings",
            json={"model": "text-embedding-3-small", "input": "x"},
            headers={"Authorization": f"Bearer {alpha}"},
        )
        assert envelope(r, 429, "rate_limit_exceeded")["type"] == "requests"
        assert 1 <= int(r.headers["retry-after"]) <= 60
        b.embeddings.create(
            model="text-embedding-3-small", input="x", encoding_format="float"
        )  # its own rate


# -- the embedded engine: a stream generated whole, then sent as events ----------------------------------------


async def test_the_embedded_engine_answers_400_to_a_stream_of_embeddings() -> None:
    engine = EmbeddedUpstream(chat=False)  # nothing is loaded to answer this
    body = b'{"model":"multilingual-e5-small","input":"x","stream":true}'
    answer = await engine.stream("/v1/embeddings", body, timeout=5)
    raw = b"".join([c async for c in answer.chunks])
    assert answer.status == 400
    assert json.loads(raw)["error"]["code"] == "streaming_unsupported"
    await engine.close()


@pytest.mark.slow
def test_the_embedded_engine_answers_online_and_streams(tmp_path: Path) -> None:
    """The default server (no --upstream): chat online, and the SDK's stream=True gets the same text in OpenAI's
    chunk shapes (generated whole, then sent as events), the usage last when asked; completions too."""
    with Server(tmp_path / "data", ["--embedded-slots", "2"]) as srv:  # no --upstream: the embedded engine
        client = srv.client()
        chat = client.chat.completions.create(
            model="smollm2-135m-instruct", messages=MESSAGES, max_tokens=6, temperature=0
        )
        assert chat.choices[0].message.content and chat.model == "smollm2-135m-instruct"
        chunks = list(
            client.chat.completions.create(
                model="smollm2-135m-instruct",
                messages=MESSAGES,
                max_tokens=6,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == chat.choices[0].message.content
        assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
        usage = chunks[-1].usage
        assert usage is not None and chat.usage is not None
        assert usage.completion_tokens == chat.usage.completion_tokens
        pieces = list(
            client.completions.create(
                model="smollm2-135m-instruct", prompt="One, two,", max_tokens=4, temperature=0, stream=True
            )
        )
        whole = client.completions.create(
            model="smollm2-135m-instruct", prompt="One, two,", max_tokens=4, temperature=0
        )
        assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text
