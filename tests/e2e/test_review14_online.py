"""Review of the online front door (api/online.py) as a hostile tenant and a broken upstream would use it: a real
`batchyard serve` on loopback, the official openai SDK where it has the call, raw httpx and sockets where the bytes
or the status matter.

Routes: `raw` -> tests/support/scripted_upstream.py (an upstream that answers whatever bytes a script says);
`fake-model` -> the well-behaved fake. One project's stored key; `--project-online-concurrency 2`.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from batchyard.upstreams.online import Board
from tests.conftest import Server
from tests.e2e.test_online import envelope, new_key
from tests.support.fake_upstream import FakeUpstream
from tests.support.scripted_upstream import ScriptedUpstream

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello"}]
UPSTREAM_KEY = "sk-upstream-own-key"
CONCURRENCY = 2


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as u:
        yield u


@pytest.fixture(scope="module")
def raw() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as u:
        yield u


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("review14") / "data"


@pytest.fixture(scope="module")
def key(data: Path) -> str:
    return new_key(data, "alpha")


@pytest.fixture(scope="module")
def srv(fake: FakeUpstream, raw: ScriptedUpstream, data: Path, key: str) -> Iterator[Server]:
    args = ["--upstream", f"raw={raw.base_url}", "--upstream", f"fake-model={fake.base_url}"]
    args += ["--upstream-api-key", UPSTREAM_KEY, "--attempt-timeout", "3"]
    args += ["--project-online-concurrency", str(CONCURRENCY)]
    with Server(data, args) as s:
        yield s


@pytest.fixture(scope="module")
def http(srv: Server, key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def oai(srv: Server, key: str) -> openai.OpenAI:
    return srv.client(key)


def online_count(srv: Server, status: str) -> float:
    text = httpx.get(srv.root_url + "/metrics", timeout=10).text
    pattern = (
        rf'^batchyard_online_requests_total\{{endpoint="/v1/chat/completions",status="{status}"\}} (\S+)$'
    )
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_for(check: Any, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return bool(check())


def raw_request(srv: Server, key: str, body: bytes, declared: int | None = None) -> socket.socket:
    """A POST written on a bare socket (its Content-Length may promise more than is sent)."""
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer %s\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n"
    ) % (key.encode(), len(body) if declared is None else declared)
    s.sendall(head + body)
    return s


def reset(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


# -- what an upstream answers that HTTP or OpenAI's envelope does not allow ------------------------------------


@pytest.mark.parametrize("script", ["status_999", "status_101"])
def test_an_upstream_status_that_is_no_final_http_status_is_a_502(
    http: httpx.Client, srv: Server, script: str
) -> None:
    """A 999 crashed uvicorn's response writer (KeyError: the client saw the connection drop, the log a traceback);
    a 101 was passed on as the answer, switching the client's connection to nothing."""
    r = http.post("/chat/completions", json={"model": "raw", "script": script, "messages": MESSAGES})
    err = envelope(r, 502, "upstream_bad_status")
    assert err["type"] == "server_error"
    assert "KeyError" not in srv.log()
    assert http.post("/chat/completions", json={"model": "raw", "messages": MESSAGES}).status_code == 200


def test_an_upstream_error_that_is_not_an_openai_error_object_is_wrapped_in_one(
    http: httpx.Client, oai: openai.OpenAI
) -> None:
    """An HTML 500 (a proxy's page, a crashed engine) reached the client as HTML: every error is OpenAI-shaped. The
    upstream's status stays (the SDK's retry rules depend on it)."""
    r = http.post("/chat/completions", json={"model": "raw", "script": "html_500", "messages": MESSAGES})
    err = envelope(r, 500, "upstream_error")
    assert err["type"] == "server_error" and "500" in err["message"]
    assert r.headers["content-type"] == "application/json"
    r = http.post("/chat/completions", json={"model": "raw", "script": "text_400", "messages": MESSAGES})
    assert envelope(r, 400, "upstream_error")["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="raw", messages=MESSAGES, extra_body={"script": "text_400"})
    assert info.value.code == "upstream_error"
    # other engines' error shapes keep their words
    r = http.post("/chat/completions", json={"model": "raw", "script": "vllm_400", "messages": MESSAGES})
    err = envelope(r, 400, "upstream_error")
    assert (
        err["message"]
        == "The upstream serving this model answered 400: This model's maximum context length is 4096 tokens."
    )
    r = http.post("/chat/completions", json={"model": "raw", "script": "tgi_422", "messages": MESSAGES})
    assert "must have less than 1024 tokens" in envelope(r, 422, "upstream_error")["message"]
    # an error object of the upstream's own is passed on as it was, byte for byte
    r = http.post("/chat/completions", json={"model": "raw", "script": "json_503", "messages": MESSAGES})
    assert r.status_code == 503 and r.json()["error"]["code"] == "busy" and r.headers["retry-after"] == "2"


def test_the_upstreams_refusal_of_batchyards_key_is_no_401_for_the_client(
    http: httpx.Client, oai: openai.OpenAI
) -> None:
    """An upstream's 401 (batchyard's --upstream-api-key is wrong or revoked) reached the client as 401
    `invalid_api_key` "Incorrect API key provided: sk-upstr***-key.": the SDK raised AuthenticationError for a key
    that is fine, and the message named part of batchyard's own key. It is the operator's fault: a 502."""
    r = http.post("/chat/completions", json={"model": "raw", "script": "auth_401", "messages": MESSAGES})
    err = envelope(r, 502, "upstream_auth")
    assert "sk-upstr" not in r.text and "www-authenticate" not in r.headers
    with pytest.raises(openai.InternalServerError) as info:
        oai.chat.completions.create(model="raw", messages=MESSAGES, extra_body={"script": "auth_401"})
    assert info.value.code == "upstream_auth" and err["type"] == "server_error"


# -- broken event streams -------------------------------------------------------------------------------------


def test_a_stream_cut_in_the_middle_of_an_event_ends_with_an_error_event(
    http: httpx.Client, oai: openai.OpenAI
) -> None:
    """An event stream framed by the connection's end that stops mid-event looked like a whole stream: the client
    got a truncated answer and no error."""
    body = {"model": "raw", "script": "sse_eof_mid_event", "stream": True, "messages": MESSAGES}
    r = http.post("/chat/completions", json=body)
    assert r.status_code == 200
    assert r.content.endswith(b"\n\n") and b"event: error\ndata: " in r.content
    error = json.loads(r.content.rsplit(b"data: ", 1)[1])
    assert error["error"]["code"] == "upstream_connect"
    stream = oai.chat.completions.create(
        model="raw", messages=MESSAGES, stream=True, extra_body={"script": "sse_eof_mid_event"}
    )
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.content == "hi"
    with pytest.raises(openai.APIError):
        next(chunks)


def test_a_stream_that_ends_whole_with_crlf_line_ends_gets_no_error_event(http: httpx.Client) -> None:
    body = {"model": "raw", "script": "sse_eof_whole", "stream": True, "messages": MESSAGES}
    r = http.post("/chat/completions", json=body)
    assert r.status_code == 200 and b"event: error" not in r.content
    assert r.content.endswith(b"data: [DONE]\r\n\r\n")


def test_a_stream_whose_last_event_lacks_its_blank_line_ends_cleanly(
    http: httpx.Client, oai: openai.OpenAI
) -> None:
    """`data: [DONE]\n` then the connection's end: its lines are whole, so it is no cut (the SDK sees [DONE])."""
    body = {"model": "raw", "script": "sse_eof_no_blank_line", "stream": True, "messages": MESSAGES}
    r = http.post("/chat/completions", json=body)
    assert r.status_code == 200 and b"event: error" not in r.content
    assert r.content.endswith(b"data: [DONE]\n\n")
    stream = oai.chat.completions.create(
        model="raw", messages=MESSAGES, stream=True, extra_body={"script": "sse_eof_no_blank_line"}
    )
    assert [c.choices[0].delta.content for c in stream] == ["hi"]


def test_a_stream_reset_after_its_head_ends_with_an_error_event(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="raw", messages=MESSAGES, stream=True, extra_body={"script": "sse_reset"}
    )
    chunks = iter(stream)
    assert next(chunks).choices[0].delta.content == "hi"
    with pytest.raises(openai.APIError) as info:
        next(chunks)
    assert info.value.code == "upstream_connect"


@pytest.mark.parametrize(("script", "stream"), [("sse_hold", "true"), ("sse_hold_odd_case", True)])
def test_an_event_stream_is_relayed_as_it_comes_whatever_stream_says(
    srv: Server, key: str, raw: ScriptedUpstream, script: str, stream: object
) -> None:
    """`"stream": "true"` (a string: vLLM and others coerce it) was answered with an event stream that batchyard
    held until the upstream's end, then sent whole: the client saw nothing while it was generated (now a 504, as
    a non-stream answer has an overall deadline). So was `Text/Event-Stream` (media types ignore case)."""
    body = {"model": "raw", "script": script, "stream": stream, "messages": MESSAGES}
    headers = {"Authorization": f"Bearer {key}"}
    with (
        httpx.Client(timeout=30) as c,
        c.stream("POST", srv.base_url + "/chat/completions", json=body, headers=headers) as r,
    ):
        assert r.status_code == 200 and r.headers["content-type"].lower().startswith("text/event-stream")
        chunks = r.iter_raw()
        first = next(chunks)  # the upstream holds the rest until released
        assert first.startswith(b"data: ")
        raw.release()
        rest = b"".join(chunks)
    assert (first + rest).endswith(b"data: [DONE]\n\n")


def test_one_huge_event_is_relayed_whole_and_the_server_stays_responsive(
    srv: Server, key: str, http: httpx.Client
) -> None:
    """An event of 24 MiB in 1 KiB pieces: its bytes wait for the event's end, then go on whole (held: checked so
    that the wait stays linear and the loop free)."""
    body = {"model": "raw", "script": "sse_one_huge_event", "stream": True, "messages": MESSAGES}
    headers = {"Authorization": f"Bearer {key}"}
    with (
        httpx.Client(timeout=60) as c,
        c.stream("POST", srv.base_url + "/chat/completions", json=body, headers=headers) as r,
    ):
        assert r.status_code == 200
        size, tail = 0, b""
        for chunk in r.iter_raw():
            size += len(chunk)
            tail = (tail + chunk)[-200:]
    assert size > 24 * 1024 * 1024 and tail.endswith(b"data: [DONE]\n\n")
    assert http.get(srv.root_url + "/health").status_code == 200


def test_a_non_streamed_answer_that_drips_ends_at_the_attempt_timeout(http: httpx.Client) -> None:
    """A JSON answer sent one byte every 50 ms (~15 s in all) came back whole, as slowly: the timeout bounded each
    chunk, not the answer, so an upstream that drips held the request (and its slot) for as long as it liked. Now
    the answer must be whole within --attempt-timeout (3 s here), as a batch line's."""
    body = {"model": "fake-model", "messages": MESSAGES, "x_fake": {"drip": 0.05}}
    envelope(http.post("/chat/completions", json=body), 504, "request_timeout")


def test_a_stream_that_never_ends_ends_at_the_attempt_timeout(srv: Server, key: str) -> None:
    """An upstream that sends a keep-alive comment every 10 ms for ever held the stream (and the project's slot,
    and the upstream's) until the client left: the timeout bounded each chunk only. The whole stream must end
    within --attempt-timeout (3 s here: ~300 keep-alives), with a `request_timeout` error event."""
    body = {"model": "raw", "script": "sse_never_ends", "stream": True, "messages": MESSAGES}
    headers = {"Authorization": f"Bearer {key}"}
    seen, tail = 0, b""
    with (
        httpx.Client(timeout=30) as c,
        c.stream("POST", srv.base_url + "/chat/completions", json=body, headers=headers) as r,
    ):
        for chunk in r.iter_raw():
            tail = (tail + chunk)[-1000:]
            seen += chunk.count(b": keep-alive")
            if seen > 2000:  # 20 s of them: it would never have ended
                break
    assert seen < 2000 and b"event: error" in tail
    assert json.loads(tail.rsplit(b"data: ", 1)[1])["error"]["code"] == "request_timeout"


# -- the client goes away --------------------------------------------------------------------------------------


def test_a_client_that_leaves_while_sending_its_body_is_a_499_not_a_500(srv: Server, key: str) -> None:
    """ClientDisconnect escaped the route: each one logged a traceback as an unexpected error and counted 500."""
    errors, gone = online_count(srv, "500"), online_count(srv, "499")
    for _ in range(5):
        s = raw_request(srv, key, b'{"model":"fake-model","messages":[', declared=1000)
        time.sleep(0.05)
        reset(s)
    assert wait_for(lambda: online_count(srv, "499") >= gone + 5)
    assert online_count(srv, "500") == errors
    assert "ClientDisconnect" not in srv.log()


def test_streams_the_client_left_are_counted_and_give_their_slots_back(
    srv: Server, key: str, fake: FakeUpstream, raw: ScriptedUpstream, http: httpx.Client, data: Path
) -> None:
    """200 streams cut by their client (FIN or RST) at the project's concurrency limit of 2: every one is counted
    (499: it was not, before), every upstream request is cancelled, its count on the online board (which batch lines
    yield to) goes back to 0, and a new request still goes through."""
    board = Board(data / "online-board")
    held = {"model": "raw", "script": "sse_hold", "stream": True, "messages": MESSAGES}
    with (
        httpx.Client(timeout=30) as c,
        c.stream(
            "POST", srv.base_url + "/chat/completions", json=held, headers={"Authorization": f"Bearer {key}"}
        ) as r,
    ):
        next(r.iter_raw())
        assert sum(board.counts()) == 1  # an open stream is on the board
        raw.release()
    assert wait_for(lambda: sum(board.counts()) == 0)
    gone = online_count(srv, "499")
    fake.reset()
    body = json.dumps(
        {"model": "fake-model", "messages": MESSAGES, "stream": True, "x_fake": {"hold": True}}
    ).encode()
    for i in range(200):
        if i % 2:
            s = raw_request(srv, key, body)
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            reset(s)
        else:
            with (
                httpx.Client(timeout=30) as c,
                c.stream(
                    "POST",
                    srv.base_url + "/chat/completions",
                    content=body,
                    headers={"Authorization": f"Bearer {key}", "content-type": "application/json"},
                ) as r,
            ):
                assert r.status_code == 200, r.read()
                next(r.iter_raw())
        assert wait_for(lambda: fake.stats()["streams_open"] == 0)  # else the next one would meet the limit
    assert wait_for(lambda: fake.stats()["streams_cancelled"] >= 200)
    assert fake.stats()["streams_done"] == 0
    assert wait_for(lambda: online_count(srv, "499") >= gone + 200)
    assert sum(board.counts()) == 0
    board.close()
    ok = http.post("/chat/completions", json={"model": "fake-model", "messages": MESSAGES})
    assert ok.status_code == 200


# -- what reaches the upstream ---------------------------------------------------------------------------------


def test_numbers_orjson_cannot_read_still_reach_the_upstream(
    http: httpx.Client, raw: ScriptedUpstream
) -> None:
    """A valid body with an integer of 400 digits or 1e400 was refused: "We could not parse the JSON body" (orjson
    reads no number past a double). Only `model` and `stream` are read; the bytes go as they came."""
    for number in (b"1" + b"0" * 400, b"9" * 5000, b"1e400", b"-1e400"):
        raw_body = b'{"model":"raw","messages":[],"seed":%s}' % number
        r = http.post("/chat/completions", content=raw_body, headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        assert raw.bodies[-1] == raw_body


def test_json_that_is_not_valid_is_still_refused(http: httpx.Client) -> None:
    for bad in (
        b'{"model":"raw","seed":NaN}',
        b'{"model":"raw","seed":Infinity}',
        b'{"model":"raw"} {}',
        b'{"model":"raw","x":"a\x00b"}',
        b'{"model":"raw","x":"\xff"}',
        b'{"model":"raw","x":' + b"[" * 2000 + b"]" * 2000 + b"}",
    ):
        envelope(http.post("/chat/completions", content=bad), 400, "invalid_json")


def test_a_model_that_is_no_unicode_is_a_400(http: httpx.Client) -> None:
    """A lone surrogate in `model` (valid JSON escapes, no Unicode): 400, not a 500 while echoing it."""
    r = http.post("/chat/completions", content=b'{"model":"m\\ud800","seed":1' + b"0" * 30 + b"}")
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_the_upstream_gets_its_own_key_and_nothing_of_the_clients(
    srv: Server, key: str, raw: ScriptedUpstream
) -> None:
    """Held before this review: checked so that it stays so."""
    body = {"model": "raw", "script": "headers", "messages": MESSAGES, "base_url": "http://127.0.0.1:1/v1"}
    headers = {
        "Authorization": f"Bearer {key}",
        "cookie": "c=1",
        "x-api-key": "sk-client",
        "openai-organization": "org-x",
        "x-forwarded-for": "1.2.3.4",
    }
    r = httpx.post(srv.base_url + "/chat/completions?base_url=http://127.0.0.1:1", json=body, headers=headers)
    assert r.status_code == 200
    head = raw.heads[-1].decode("latin-1").lower()
    assert head.startswith("post /v1/chat/completions http/1.1")
    assert f"authorization: bearer {UPSTREAM_KEY}".lower() in head
    assert key.lower() not in head and "sk-client" not in head and "cookie" not in head
    assert "org-x" not in head and "1.2.3.4" not in head
    # of the upstream's headers only content-type, x-request-id and retry-after come back
    assert r.headers["x-request-id"] == "req_upstream1" and r.headers["retry-after"] == "3"
    for name in (
        "set-cookie",
        "www-authenticate",
        "proxy-authenticate",
        "authorization",
        "x-api-key",
        "upgrade",
    ):
        assert name not in r.headers, name
    assert "location" not in r.headers and r.headers.get("connection") != "upgrade"
    assert r.headers["content-length"] == str(len(r.content))
    assert UPSTREAM_KEY not in srv.log() and key not in srv.log()
