"""Batch webhooks end to end: `batchyard serve --webhook-url` against a real loopback receiver; each final status
(completed, failed, cancelled, expired) sends one event, signed so that the official SDK's `webhooks.unwrap` accepts
it; a receiver that fails gets the event again; a wrong secret does not verify."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.conftest import Server
from tests.support.batches import chat_line, upload, wait_for
from tests.support.fake_upstream import FakeUpstream

SECRET = "whsec_" + base64.b64encode(b"batchyard-test-webhook-key-32byt").decode()


class Receiver:
    """An HTTP server that records every POST (body and headers) and answers `fail_first` of them with 500."""

    def __init__(self, fail_first: int = 0) -> None:
        self.received: list[tuple[bytes, dict[str, str]]] = []
        self.paths: list[str] = []
        self.fail_first = fail_first
        self.answered = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.answered += 1
                receiver.paths.append(self.path)
                if receiver.answered <= receiver.fail_first:
                    self.send_response(500)
                else:
                    receiver.received.append((body, {k.lower(): v for k, v in self.headers.items()}))
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/batch?source=batchyard"

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for body, _ in self.received]

    def wait_for(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < n:
            assert time.monotonic() < deadline, f"{len(self.received)} webhooks after {timeout}s"
            time.sleep(0.05)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    yield r
    r.server.shutdown()


def serve_with_webhooks(make_server: Callable[..., Server], upstream: FakeUpstream, url: str) -> Server:
    return make_server(
        "--upstream",
        upstream.base_url,
        "--concurrency",
        "4",
        "--webhook-url",
        url,
        env={"BATCHYARD_WEBHOOK_SECRET": SECRET},
    )


def test_each_final_status_sends_one_signed_event(
    make_server: Callable[..., Server], upstream: FakeUpstream, receiver: Receiver
) -> None:
    srv = serve_with_webhooks(make_server, upstream, receiver.url)
    client = srv.client()
    done = client.batches.create(
        input_file_id=upload(client, [chat_line(i) for i in range(3)]),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    bad = client.batches.create(
        input_file_id=upload(client, b"not json\n"), endpoint="/v1/chat/completions", completion_window="24h"
    )
    cancelled = client.batches.create(
        input_file_id=upload(client, [chat_line(i, x_fake={"delay": 3}) for i in range(2)]),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    client.batches.cancel(cancelled.id)
    expired = client.batches.create(  # 20 slow lines, 4 at a time: most never start within the 2 s window
        input_file_id=upload(client, [chat_line(i, x_fake={"delay": 3}) for i in range(20)]),
        endpoint="/v1/chat/completions",
        completion_window="2s",  # type: ignore[arg-type]  # a batchyard extension the SDK's Literal does not list
    )
    final = {b.id: wait_for(client, b.id, timeout=60).status for b in (done, bad, cancelled, expired)}
    assert final == {done.id: "completed", bad.id: "failed", cancelled.id: "cancelled", expired.id: "expired"}
    receiver.wait_for(4)
    time.sleep(1.5)  # nothing more comes: one event per batch
    assert {e["data"]["id"]: e["type"] for e in receiver.events()} == {
        k: f"batch.{v}" for k, v in final.items()
    }
    assert len(receiver.received) == 4
    assert set(receiver.paths) == {"/hooks/batch?source=batchyard"}  # the configured URL, query included
    sdk = OpenAI(api_key="unused", webhook_secret=SECRET)
    for body, headers in receiver.received:
        event = sdk.webhooks.unwrap(body, headers)  # checks the signature and the timestamp
        assert event.type == json.loads(body)["type"] and event.id == headers["webhook-id"]
        assert event.id.startswith("evt_") and event.object == "event"
        with pytest.raises(openai.InvalidWebhookSignatureError):
            sdk.webhooks.unwrap(body, headers, secret="whsec_" + base64.b64encode(b"another key").decode())


@pytest.mark.slow
def test_a_failing_receiver_gets_the_event_again(
    make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    r = Receiver(fail_first=1)
    r.thread.start()
    try:
        srv = serve_with_webhooks(make_server, upstream, r.url)
        client = srv.client()
        b = client.batches.create(
            input_file_id=upload(client, [chat_line(0)]),
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
        wait_for(client, b.id)
        r.wait_for(1, timeout=30)  # the first try got 500; the retry comes ~5 s later
        assert r.answered == 2
        (event,) = r.events()
        assert (event["type"], event["data"]["id"]) == ("batch.completed", b.id)
    finally:
        r.server.shutdown()


def test_webhook_url_needs_a_secret(make_server: Callable[..., Server], tmp_path: Any) -> None:
    srv = make_server("--webhook-url", "http://127.0.0.1:9/hook", start=False)
    srv.spawn(["--port", str(srv.port), "--data-dir", str(srv.data_dir), *srv.args])
    assert srv.proc is not None
    assert srv.proc.wait(30) != 0
    assert "--webhook-secret" in srv.log()
