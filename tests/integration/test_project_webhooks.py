"""Webhooks per project, end to end: `batchyard serve` on loopback with two projects, endpoints added with the CLI
(`batchyard webhooks add`) and with the admin API, two real aiohttp receivers. Each project's events reach only its
own endpoints, signed with that endpoint's secret (both secrets during a rotation), verified with the official SDK; a
failing endpoint is retried while the one that took the event is not sent it again; the project reads every attempt
in its delivery log, and another project gets a 404."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from aiohttp import web
from openai import OpenAI

from tests.conftest import Server
from tests.support.batches import chat_line, upload, wait_for
from tests.support.fake_upstream import FakeUpstream


class AioReceiver:
    """An aiohttp server on loopback in a thread of its own: every POST to /<name> is recorded; /<name> answers 500
    to its first `fail_first[name]` POSTs."""

    def __init__(self, fail_first: dict[str, int] | None = None) -> None:
        self.fail_first = dict(fail_first or {})
        self.posts: list[
            tuple[str, dict[str, str], bytes, int]
        ] = []  # (name, headers, body, status answered)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _hook(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        failing = self.fail_first.get(name, 0) > 0
        if failing:
            self.fail_first[name] -= 1
        status = 500 if failing else 200
        self.posts.append((name, dict(request.headers), await request.read(), status))
        return web.Response(status=status)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/{name}", self._hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    def __enter__(self) -> AioReceiver:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.runner is not None
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def taken(self, name: str) -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for n, h, b, status in self.posts if n == name and status == 200]

    def wait_for(self, name: str, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.taken(name)) < n:
            assert time.monotonic() < deadline, f"{name}: {self.posts!r} after {timeout}s"
            time.sleep(0.05)


@pytest.fixture
def receivers() -> Iterator[tuple[AioReceiver, AioReceiver]]:
    with AioReceiver(fail_first={"flaky": 1}) as ra, AioReceiver() as rb:
        yield ra, rb


def by(data_dir: Path, *args: str) -> list[str]:
    """`batchyard ARGS --data-dir DATA_DIR`, checked; its stdout lines."""
    done = subprocess.run(
        [sys.executable, "-m", "batchyard.cli.main", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout.splitlines()


def one_batch(client: OpenAI) -> str:
    b = client.batches.create(
        input_file_id=upload(client, [chat_line(0)]), endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert wait_for(client, b.id).status == "completed"
    return b.id


def unwrap(body: bytes, headers: dict[str, str], secret: str) -> Any:
    return OpenAI(api_key="unused", webhook_secret=secret).webhooks.unwrap(body, headers)


def test_each_projects_events_reach_only_its_endpoints_signed_retried_and_logged(
    make_server: Callable[..., Server],
    upstream: FakeUpstream,
    receivers: tuple[AioReceiver, AioReceiver],
    tmp_path: Path,
) -> None:
    ra, rb = receivers
    data = tmp_path / "data"
    admin_key = by(data, "keys", "create", "--project", "ops", "--admin")[-1]
    alpha_key = by(data, "keys", "create", "--project", "alpha")[-1]
    beta_key = by(data, "keys", "create", "--project", "beta")[-1]
    steady = by(data, "webhooks", "add", "--project", "alpha", "--url", ra.url + "/steady")
    flaky = by(data, "webhooks", "add", "--project", "alpha", "--url", ra.url + "/flaky")
    steady_id, flaky_id = steady[0].split()[3], flaky[0].split()[3]
    assert steady_id.startswith("wh_") and steady[-1].startswith("whsec_")
    srv = make_server("--upstream", upstream.base_url, "--webhook-allowed-hosts", "127.0.0.1", data_dir=data)
    admin = httpx.Client(base_url=srv.root_url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
    projects = {p["name"]: p["id"] for p in admin.get("/v1/organization/projects").json()["data"]}
    hooks = f"/v1/organization/projects/{projects['beta']}/webhooks"

    refused = admin.post(hooks, json={"url": "http://elsewhere.example/hook"})
    assert refused.status_code == 400
    assert (
        refused.json()["error"]["param"] == "url"
        and "webhook_allowed_hosts" in refused.json()["error"]["message"]
    )
    as_member = httpx.post(
        srv.root_url + hooks, json={"url": rb.url + "/beta"}, headers={"Authorization": f"Bearer {beta_key}"}
    )
    assert as_member.status_code == 403
    made = admin.post(hooks, json={"url": rb.url + "/beta"})
    assert made.status_code == 200, made.text
    old_secret, beta_hook = made.json()["secret"], made.json()["id"]
    rotated = admin.post(f"{hooks}/{beta_hook}/rotate")
    assert rotated.status_code == 200
    new_secret = rotated.json()["secret"]
    assert (
        new_secret != old_secret and rotated.json()["previous_secret_valid_until"] > time.time() + 23 * 3600
    )
    assert [e["id"] for e in admin.get(hooks).json()["data"]] == [beta_hook]
    assert "secret" not in admin.get(hooks).json()["data"][0]  # shown only when made or rotated

    alpha, beta = srv.client(alpha_key), srv.client(beta_key)
    alpha_batch, beta_batch = one_batch(alpha), one_batch(beta)

    rb.wait_for("beta", 1)
    ((headers, body),) = rb.taken("beta")
    assert len(headers["webhook-signature"].split()) == 2  # during the grace: v1,<new> v1,<old>
    for secret in (new_secret, old_secret):  # a receiver on either secret takes it
        event = unwrap(body, headers, secret)
        assert event.type == "batch.completed" and event.data.id == beta_batch
    with pytest.raises(openai.InvalidWebhookSignatureError):
        unwrap(body, headers, steady[-1])  # another endpoint's secret

    ra.wait_for("steady", 1)
    ra.wait_for("flaky", 1, timeout=30)  # 500 first; the retry comes ~5 s later
    time.sleep(1.0)
    assert len(ra.taken("steady")) == 1  # not sent again with the retry
    assert [status for n, _, _, status in ra.posts if n == "flaky"] == [500, 200]
    (steady_headers, steady_body), (flaky_headers, flaky_body) = ra.taken("steady")[0], ra.taken("flaky")[0]
    assert json.loads(steady_body)["data"]["id"] == alpha_batch  # only alpha's events reach alpha's receiver
    assert unwrap(steady_body, steady_headers, steady[-1]).id == steady_headers["webhook-id"]
    assert unwrap(flaky_body, flaky_headers, flaky[-1]).id == flaky_headers["webhook-id"]
    assert all(json.loads(b)["data"]["id"] == beta_batch for _, _, b, _ in rb.posts)

    log = httpx.get(srv.base_url + "/webhook_events", headers={"Authorization": f"Bearer {alpha_key}"}).json()
    (listed,) = log["data"]
    assert (listed["data"]["id"], listed["status"], listed["attempts"]) == (alpha_batch, "delivered", 2)
    event_id = listed["id"]
    detail = httpx.get(
        f"{srv.base_url}/webhook_events/{event_id}", headers={"Authorization": f"Bearer {alpha_key}"}
    ).json()
    assert detail["targets"] == [
        {"endpoint_id": steady_id, "delivered": True},
        {"endpoint_id": flaky_id, "delivered": True},
    ]
    tries = [(a["endpoint_id"], a["status_code"], a["error"]) for a in detail["delivery_attempts"]]
    assert sorted(tries[:2]) == sorted([(steady_id, 200, None), (flaky_id, 500, None)])
    assert tries[2:] == [(flaky_id, 200, None)]
    assert all(
        a["duration_ms"] >= 0 and a["attempted_at"] >= listed["created_at"]
        for a in detail["delivery_attempts"]
    )
    other = httpx.get(
        f"{srv.base_url}/webhook_events/{event_id}", headers={"Authorization": f"Bearer {beta_key}"}
    )
    assert other.status_code == 404 and other.json()["error"]["code"] == "webhook_event_not_found"
    beta_log = httpx.get(srv.base_url + "/webhook_events", headers={"Authorization": f"Bearer {beta_key}"})
    assert [e["data"]["id"] for e in beta_log.json()["data"]] == [beta_batch]

    deleted = admin.delete(f"{hooks}/{beta_hook}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert admin.get(hooks).json()["data"] == []
    assert admin.post(f"{hooks}/{beta_hook}/rotate").status_code == 404
    one_batch(beta)  # no endpoint left, no --webhook-url: nothing is sent, the event is skipped
    deadline = time.monotonic() + 10
    while True:
        events = httpx.get(srv.base_url + "/webhook_events", headers={"Authorization": f"Bearer {beta_key}"})
        newest = events.json()["data"][0]
        if newest["status"] != "pending" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert newest["status"] == "skipped" and len(rb.posts) == 1
    admin.close()


def test_the_admin_api_refuses_every_url_without_allowed_hosts(
    make_server: Callable[..., Server], upstream: FakeUpstream, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    admin_key = by(data, "keys", "create", "--project", "ops", "--admin")[-1]
    srv = make_server("--upstream", upstream.base_url, data_dir=data)
    auth = {"Authorization": f"Bearer {admin_key}"}
    (ops,) = httpx.get(srv.root_url + "/v1/organization/projects", headers=auth).json()["data"]
    hooks = f"{srv.root_url}/v1/organization/projects/{ops['id']}/webhooks"
    for url in ("http://127.0.0.1:9/hook", "ftp://127.0.0.1/x"):
        r = httpx.post(hooks, json={"url": url}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "url"
    r = httpx.post(hooks, json={"url": "http://127.0.0.1:9/hook"}, headers=auth)
    assert (
        "webhook_allowed_hosts" in r.json()["error"]["message"] and r.json()["error"]["code"] == "invalid_url"
    )
    assert httpx.post(hooks, json={}, headers=auth).status_code == 400
    assert httpx.get(hooks + "/wh_nope", headers=auth).status_code == 404
    assert httpx.get(hooks.replace(ops["id"], "proj_nope"), headers=auth).status_code == 404


def test_the_webhooks_cli_adds_lists_rotates_and_removes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    by(data, "keys", "create", "--project", "alpha")
    out = by(data, "webhooks", "add", "--project", "alpha", "--url", "https://hooks.example.com/b?x=1")
    endpoint_id, secret = out[0].split()[3], out[-1]
    assert out[0].endswith("of project alpha: https://hooks.example.com/b?x=1")
    assert secret.startswith("whsec_") and len(secret) == 6 + 44
    (header, row) = by(data, "webhooks", "list")
    assert header.split()[:3] == ["ID", "PROJECT", "URL"]
    assert row.split()[:3] == [endpoint_id, "alpha", "https://hooks.example.com/b?x=1"]
    assert row.split()[-2:] == ["-", "-"]  # no old secret, not removed
    assert secret not in "\n".join(by(data, "webhooks", "list"))  # shown once, when made
    rotated = by(data, "webhooks", "rotate", endpoint_id)
    assert rotated[-1].startswith("whsec_") and rotated[-1] != secret
    assert "the previous one signs too until" in rotated[0]
    (_, row) = by(data, "webhooks", "list", "--project", "alpha")
    assert row.split()[-3] != "-"  # the old secret's deadline is shown
    assert by(data, "webhooks", "remove", endpoint_id)[0].startswith(
        f"removed webhook endpoint {endpoint_id}"
    )
    assert by(data, "webhooks", "list") == [by(data, "webhooks", "list")[0]]  # the header only
    assert len(by(data, "webhooks", "list", "--all")) == 2
    for args, words in [
        (["rotate", endpoint_id], "or it was removed"),
        (["remove", "wh_nope"], "no endpoint 'wh_nope'"),
        (["add", "--project", "nope", "--url", "https://h/x"], "no project named 'nope'"),
        (["add", "--project", "alpha", "--url", "file:///etc/passwd"], "must be http:// or https://"),
    ]:
        failed = subprocess.run(
            [sys.executable, "-m", "batchyard.cli.main", "webhooks", *args, "--data-dir", str(data)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert failed.returncode != 0 and words in failed.stderr, failed.stderr
