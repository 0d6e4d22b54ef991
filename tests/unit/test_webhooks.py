"""Webhook signatures (checked by the official SDK's verifier), the retry schedule, and delivery to a real receiver."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from openai import OpenAI

from batchyard.domain.models import BatchRecord, FileRecord
from batchyard.domain.states import BatchStatus
from batchyard.domain.webhooks import (
    MAX_RETRY_S,
    WebhookEndpoint,
    endpoint_id,
    global_target_id,
    new_secret,
    retry_delay,
    secret_key,
    signature,
    signature_header,
    url_problem,
)
from batchyard.execution import webhooks
from batchyard.execution.webhooks import WebhookSender
from batchyard.store.memory import MemoryStore


@pytest.mark.parametrize("secret", ["whsec_" + base64.b64encode(b"k" * 32).decode(), "plain-secret"])
def test_signature_is_what_openai_python_verifies(secret: str) -> None:
    body = b'{"id": "evt_1", "type": "batch.completed"}'
    ts = int(time.time())
    headers = {"webhook-id": "evt_1", "webhook-timestamp": str(ts)}
    headers["webhook-signature"] = signature(secret_key(secret), "evt_1", ts, body)
    OpenAI(api_key="x").webhooks.verify_signature(body, headers, secret=secret)  # raises if it does not match
    headers["webhook-signature"] = signature(secret_key(secret), "evt_2", ts, body)
    with pytest.raises(Exception, match="signature"):
        OpenAI(api_key="x").webhooks.verify_signature(body, headers, secret=secret)


def test_a_whsec_secret_must_be_base64() -> None:
    with pytest.raises(ValueError):
        secret_key("whsec_not*base64")


def test_retry_delay_doubles_from_five_seconds_up_to_an_hour() -> None:
    rng = random.Random(1)
    delays = [retry_delay(n, rng) for n in range(1, 12)]
    assert 4.0 <= delays[0] <= 6.0 and 8.0 <= delays[1] <= 12.0
    assert all(d <= MAX_RETRY_S * 1.2 for d in delays) and delays[-1] >= MAX_RETRY_S * 0.8


# -- delivery (WebhookSender) against a real loopback receiver, over the in-memory store ------------------------

SECRET = "whsec_" + base64.b64encode(b"batchyard-unit-test-webhook-key!").decode()


class Receiver:
    """An aiohttp server on loopback: /hook records each POST; /moved redirects to /hook; /big answers more than
    the sender reads; /slow answers after a second."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, str], bytes]] = []
        app = web.Application()
        app.router.add_post("/hook", self.hook)
        app.router.add_post("/moved", self.moved)
        app.router.add_post("/big", self.big)
        app.router.add_post("/slow", self.slow)
        self.runner = web.AppRunner(app)
        self.url = ""

    async def __aenter__(self) -> Receiver:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()

    async def hook(self, request: web.Request) -> web.Response:
        self.posts.append((request.path_qs, dict(request.headers), await request.read()))
        return web.Response(status=200)

    async def moved(self, request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": "/hook"})

    async def big(self, request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 5000)

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.Response(status=200)


async def failed_batch(store: MemoryStore) -> str:
    """A batch that failed validation: its final status puts one event in the store's outbox."""
    now = int(time.time())
    f = FileRecord(
        id="file-1", owner="k", bytes=1, created_at=now, filename="in.jsonl", purpose="batch", blob_key="f"
    )
    b = BatchRecord(
        id="batch_1",
        owner="k",
        endpoint="/v1/chat/completions",
        input_file_id=f.id,
        completion_window="24h",
        status=BatchStatus.VALIDATING,
        created_at=now,
        expires_at=now + 86_400,
    )
    await store.insert_file(f)
    await store.insert_batch(b)
    assert await store.claim_validation("v", 10.0) is not None
    assert await store.fail_batch(b.id, "v", [{"code": "x", "message": "y"}])
    return b.id


@pytest.fixture
async def store() -> AsyncIterator[MemoryStore]:
    s = MemoryStore()
    await s.open()
    yield s
    await s.close()


async def test_an_event_is_posted_signed_to_the_configured_url_query_included(store: MemoryStore) -> None:
    batch_id = await failed_batch(store)
    async with Receiver() as rx:
        sender = WebhookSender([rx.url + "/hook?source=batchyard&x=%2F"], SECRET)
        async with sender.open():
            assert await sender.deliver(store, "w1") == 1
            assert await sender.deliver(store, "w1") == 0  # delivered: never again
    ((path, headers, body),) = rx.posts
    assert path == "/hook?source=batchyard&x=%2F"  # the URL as configured, not re-encoded
    assert headers["Content-Type"] == "application/json" and headers["User-Agent"] == "batchyard"
    event = OpenAI(api_key="x", webhook_secret=SECRET).webhooks.unwrap(body, headers)
    assert event.type == "batch.failed" and event.data.id == batch_id and event.id == headers["webhook-id"]


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/moved", "webhook 1: HTTP 307"),  # a redirect is not followed: /hook gets nothing
        ("/big", "webhook 1: answer exceeded 1000 bytes"),
        ("/slow", "webhook 1: did not answer within 0.3s"),
        ("/nowhere", "webhook 1: HTTP 404"),
    ],
)
async def test_an_answer_that_is_not_a_small_2xx_is_a_failed_attempt(
    store: MemoryStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    path: str,
    problem: str,
) -> None:
    monkeypatch.setattr(webhooks, "MAX_ANSWER_BYTES", 1000)
    monkeypatch.setattr(webhooks, "TIMEOUT_S", 0.3)
    await failed_batch(store)
    async with Receiver() as rx:
        sender = WebhookSender([rx.url + path, rx.url + "/hook"], SECRET)
        async with sender.open():
            assert await sender.deliver(store, "w1") == 1
            assert await sender.deliver(store, "w1") == 0  # due again only after the retry delay
    assert [p for p, _, _ in rx.posts] == ["/hook"]  # the other URL took it; the redirect was not followed
    assert f"attempt 1 failed: {problem}" in caplog.text


async def test_a_receiver_that_is_down_is_a_failed_attempt(
    store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    await failed_batch(store)
    async with Receiver() as rx:
        url = rx.url
    sender = WebhookSender([url + "/hook"], SECRET)  # nothing listens there any more
    async with sender.open():
        assert await sender.deliver(store, "w1") == 1
    assert "attempt 1 failed: webhook 1: connection failed: ClientConnectorError" in caplog.text


# -- endpoints per project: their own secrets, rotation, per-target state ---------------------------------------


class Flaky(Receiver):
    """A Receiver whose /down answers 503 while `down` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.down_posts = 0
        self.runner.app.router.add_post("/down", self.flaky)

    async def flaky(self, request: web.Request) -> web.Response:
        self.down_posts += 1
        if self.down:
            return web.Response(status=503)
        return await self.hook(request)


def endpoint_of(owner: str, url: str, secret: str) -> WebhookEndpoint:
    return WebhookEndpoint(endpoint_id(), owner, url, secret, int(time.time()) - 10)


async def test_an_event_goes_to_its_projects_endpoint_signed_with_its_secret(store: MemoryStore) -> None:
    mine, theirs = new_secret(), new_secret()
    async with Receiver() as rx:
        await store.insert_webhook_endpoint(endpoint_of("k", rx.url + "/hook?mine", mine))
        await store.insert_webhook_endpoint(endpoint_of("other", rx.url + "/hook?theirs", theirs))
        batch_id = await failed_batch(store)  # owner "k"
        async with WebhookSender([], "").open() as sender:
            assert await sender.deliver(store, "w1") == 1
    ((path, headers, body),) = rx.posts
    assert path == "/hook?mine"
    event = OpenAI(api_key="x", webhook_secret=mine).webhooks.unwrap(body, headers)
    assert event.type == "batch.failed" and event.data.id == batch_id
    with pytest.raises(Exception, match="signature"):
        OpenAI(api_key="x").webhooks.verify_signature(body, headers, secret=theirs)
    found = await store.get_webhook_event("k", headers["webhook-id"])
    assert found is not None
    ev, (attempt,) = found
    assert ev.status == "delivered" and attempt.status_code == 200 and attempt.error is None


async def test_during_a_rotation_both_secrets_sign_and_the_sdk_takes_either(store: MemoryStore) -> None:
    old, new = new_secret(), new_secret()
    async with Receiver() as rx:
        e = endpoint_of("k", rx.url + "/hook", old)
        await store.insert_webhook_endpoint(e)
        assert await store.rotate_webhook_secret(e.id, new, int(time.time()) + 3600) is not None
        await failed_batch(store)
        async with WebhookSender([], "").open() as sender:
            assert await sender.deliver(store, "w1") == 1
    ((_, headers, body),) = rx.posts
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (new, old):
        OpenAI(api_key="x", webhook_secret=secret).webhooks.unwrap(body, headers)
    with pytest.raises(Exception, match="signature"):
        OpenAI(api_key="x").webhooks.verify_signature(body, headers, secret=new_secret())


async def test_after_the_grace_only_the_new_secret_signs(store: MemoryStore) -> None:
    old, new = new_secret(), new_secret()
    async with Receiver() as rx:
        e = endpoint_of("k", rx.url + "/hook", old)
        await store.insert_webhook_endpoint(e)
        assert await store.rotate_webhook_secret(e.id, new, int(time.time()) - 1) is not None
        await failed_batch(store)
        async with WebhookSender([], "").open() as sender:
            await sender.deliver(store, "w1")
    ((_, headers, body),) = rx.posts
    assert " " not in headers["webhook-signature"]
    OpenAI(api_key="x", webhook_secret=new).webhooks.unwrap(body, headers)
    with pytest.raises(Exception, match="signature"):
        OpenAI(api_key="x").webhooks.verify_signature(body, headers, secret=old)


async def test_a_retry_goes_only_to_the_target_that_did_not_take_it() -> None:
    now = [time.time()]
    store = MemoryStore(clock=lambda: now[0])
    await store.open()
    rx = Flaky()
    async with rx:
        await store.insert_webhook_endpoint(endpoint_of("k", rx.url + "/hook", new_secret()))
        down = endpoint_of("k", rx.url + "/down", new_secret())
        await store.insert_webhook_endpoint(down)
        await failed_batch(store)
        async with WebhookSender([rx.url + "/hook?global"], SECRET).open() as sender:
            assert await sender.deliver(store, "w1") == 1
            assert [p for p, _, _ in rx.posts] == ["/hook?global", "/hook"] and rx.down_posts == 1
            now[0] += 3600  # past any retry delay
            rx.down = False
            assert await sender.deliver(store, "w1") == 1
            assert [p for p, _, _ in rx.posts] == ["/hook?global", "/hook", "/down"]  # the others not again
            now[0] += 3600
            assert await sender.deliver(store, "w1") == 0  # delivered to every target
    (ev,) = (await store.list_webhook_events("k", limit=5, after=None)).items
    assert ev.status == "delivered" and ev.attempts == 2
    found = await store.get_webhook_event("k", ev.id)
    assert found is not None
    log = [(a.endpoint_id, a.status_code) for a in found[1]]
    assert sorted(log[:3]) == sorted(
        [(global_target_id(rx.url + "/hook?global"), 200), (log[1][0], 200), (down.id, 503)]
    )
    assert log[3] == (down.id, 200) and len(log) == 4
    assert all(a.duration_ms >= 0 and a.attempted_at > 0 for a in found[1])
    await store.close()


async def test_an_event_with_no_target_is_skipped_without_a_request(store: MemoryStore) -> None:
    async with Receiver() as rx:
        await store.insert_webhook_endpoint(endpoint_of("other", rx.url + "/hook", new_secret()))
        await failed_batch(store)
        async with WebhookSender([], "").open() as sender:
            assert await sender.deliver(store, "w1") == 1
            assert await sender.deliver(store, "w1") == 0
    assert rx.posts == []
    (ev,) = (await store.list_webhook_events("k", limit=5, after=None)).items
    assert ev.status == "skipped"


async def test_a_disabled_endpoint_gets_nothing_and_an_endpoint_made_after_the_event_neither(
    store: MemoryStore,
) -> None:
    async with Receiver() as rx:
        e = endpoint_of("k", rx.url + "/hook?disabled", new_secret())
        await store.insert_webhook_endpoint(e)
        assert await store.disable_webhook_endpoint(e.id, int(time.time())) is not None
        later = endpoint_of("k", rx.url + "/hook?later", new_secret())
        later.created_at = int(time.time()) + 60
        await store.insert_webhook_endpoint(later)
        await failed_batch(store)
        async with WebhookSender([rx.url + "/hook?global"], SECRET).open() as sender:
            assert await sender.deliver(store, "w1") == 1
    assert [p for p, _, _ in rx.posts] == ["/hook?global"]


# -- endpoint rules (domain/webhooks.py) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allowed", "problem"),
    [
        ("https://hooks.example.com/x?y=1", None, None),  # the operator's CLI: any http(s) URL
        ("http://127.0.0.1:8080/h", None, None),
        ("ftp://hooks.example.com/x", None, "must be http:// or https://"),
        ("https:///nohost", None, "must be http:// or https://"),
        ("http://h:99999/x", None, "cannot be parsed"),
        ("http://h/a b", None, "spaces or control characters"),
        ("http://h/" + "x" * 3000, None, "longer than 2048"),
        ("http://a..b/x", None, "not a valid host name"),
        ("http://" + "a" * 70 + ".com/x", None, "not a valid host name"),
        ("https://bücher.example/x", None, None),  # an international name is one
        ("https://hooks.example.com/x", [], "webhook_allowed_hosts (--webhook-allowed-hosts) is empty"),
        ("https://hooks.example.com/x", ["*.example.com"], None),
        ("https://HOOKS.Example.com/x", ["*.example.com"], None),  # hosts compare without case
        ("https://example.com.evil.net/x", ["*.example.com"], "'example.com.evil.net' is not in"),
        ("https://10.0.0.1/x", ["hooks.internal", "10.0.0.*"], None),
        ("http://169.254.169.254/latest", ["hooks.internal"], "is not in the operator's setting"),
        # review 14: what the checks' parser (urlsplit) and the sender's (yarl) or a browser's read differently, and
        # credentials that every list of endpoints would show
        ("https://user:pw@hooks.example.com/x", None, "user name or password"),
        ("https://user@10.0.0.1/x", ["10.0.0.*"], "user name or password"),
        ("http://hooks.example.com@127.0.0.1/", ["*"], "user name or password"),
        ("http://evil.net\\@hooks.example.com/", ["*.example.com"], "backslash"),
        ("http://hooks.example.com\\x", None, "backslash"),
        ("http://hooks.example.com:0/x", None, "port 0"),
        ("http://xn--a.example.com/x", ["*.example.com"], "not a valid host name"),
        ("http://xn--bcher-kva.example.com/x", ["*.example.com"], None),  # valid punycode (bücher)
    ],
)
def test_which_urls_an_endpoint_may_have(url: str, allowed: list[str] | None, problem: str | None) -> None:
    found = url_problem(url, allowed)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_new_secrets_are_whsec_base64_of_32_random_bytes() -> None:
    a, b = new_secret(), new_secret()
    assert a != b and a.startswith("whsec_") and len(secret_key(a)) == 32
    assert endpoint_id().startswith("wh_") and endpoint_id() != endpoint_id()


def test_an_endpoint_shows_no_secret_and_its_grace_only_while_it_lasts() -> None:
    e = WebhookEndpoint("wh_1", "proj_1", "https://h/x", "whsec_new", 100, "whsec_old", 200)
    assert e.secrets_at(199.9) == ["whsec_new", "whsec_old"] and e.secrets_at(200) == ["whsec_new"]
    wire = e.to_wire(150)
    assert "whsec" not in json.dumps(wire) and wire["previous_secret_valid_until"] == 200
    assert e.to_wire(250)["previous_secret_valid_until"] is None


def test_the_signature_header_lists_one_signature_per_key() -> None:
    keys = [secret_key(new_secret()), secret_key(new_secret())]
    header = signature_header(keys, "evt_1", 7, b"{}")
    assert header.split(" ") == [signature(k, "evt_1", 7, b"{}") for k in keys]


async def test_a_url_the_client_cannot_send_to_fails_alone(store: MemoryStore) -> None:
    async with Receiver() as rx:
        await store.insert_webhook_endpoint(
            endpoint_of("k", "http://a..b/x", new_secret())
        )  # stored as given
        await store.insert_webhook_endpoint(endpoint_of("k", rx.url + "/hook", new_secret()))
        await failed_batch(store)
        async with WebhookSender([], "").open() as sender:
            assert await sender.deliver(store, "w1") == 1
    assert [p for p, _, _ in rx.posts] == ["/hook"]
    (ev,) = (await store.list_webhook_events("k", limit=5, after=None)).items
    found = await store.get_webhook_event("k", ev.id)
    assert found is not None and ev.status == "pending"
    assert sorted(str(a.error) for a in found[1]) == ["None", "cannot send to this URL: UnicodeError"]


async def test_a_stored_url_the_client_cannot_even_parse_fails_alone(store: MemoryStore) -> None:
    async with Receiver() as rx:
        await store.insert_webhook_endpoint(
            endpoint_of("k", "http://evil.net\\@hooks.example.com/", new_secret())
        )
        await store.insert_webhook_endpoint(endpoint_of("k", rx.url + "/hook", new_secret()))
        await failed_batch(store)
        async with WebhookSender([], "").open() as sender:
            assert await sender.deliver(store, "w1") == 1
    assert [p for p, _, _ in rx.posts] == ["/hook"]
