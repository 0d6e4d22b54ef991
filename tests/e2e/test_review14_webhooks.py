"""Review of webhooks per project (api/webhooks.py, cli/webhooks.py) as a careless operator and a hostile admin-key
holder would use them: a real `batchyard serve` with `--webhook-allowed-hosts`, raw httpx, the CLI as a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import Server
from tests.integration.test_project_webhooks import by
from tests.support.fake_upstream import FakeUpstream


def test_endpoint_urls_that_two_parsers_read_apart_or_that_hold_credentials_are_refused(
    make_server: Callable[..., Server], upstream: FakeUpstream, tmp_path: Path
) -> None:
    """`http://user:pw@hooks.example.com/` was taken and its password shown in every list of endpoints;
    `http://evil.net\\@hooks.example.com/` was taken (urlsplit reads the allowed host, a browser evil.net)."""
    data = tmp_path / "data"
    admin = by(data, "keys", "create", "--project", "ops", "--admin")[-1]
    by(data, "keys", "create", "--project", "alpha")
    by(data, "keys", "create", "--project", "beta")
    srv = make_server(
        "--upstream", upstream.base_url, "--webhook-allowed-hosts", "*.example.com", data_dir=data
    )
    auth = {"Authorization": f"Bearer {admin}"}
    projects = httpx.get(srv.root_url + "/v1/organization/projects", headers=auth).json()["data"]
    ids = {p["name"]: p["id"] for p in projects}

    def hooks(name: str) -> str:
        return f"{srv.root_url}/v1/organization/projects/{ids[name]}/webhooks"

    for url in (
        "http://user:pw@hooks.example.com/x",
        "http://hooks.example.com@127.0.0.1/",
        "http://evil.net\\@hooks.example.com/",
        "http://hooks.example.com:0/",
        "http://xn--a.example.com/",
        "file:///etc/passwd",
        "http://hooks.example.com/" + "x" * 10_000,
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/",
    ):
        r = httpx.post(hooks("alpha"), json={"url": url}, headers=auth)
        assert r.status_code == 400, (url, r.text)
        assert r.json()["error"]["code"] == "invalid_url" and r.json()["error"]["param"] == "url"
    made = httpx.post(hooks("alpha"), json={"url": "https://hooks.example.com/h"}, headers=auth).json()
    listed = httpx.get(hooks("alpha"), headers=auth).text
    assert made["secret"] not in listed and "pw" not in listed
    assert made["secret"] not in srv.log()
    # another project's endpoint, by its id: 404 on every route
    for method, path in (("GET", ""), ("POST", "/rotate"), ("DELETE", "")):
        r = httpx.request(method, f"{hooks('beta')}/{made['id']}{path}", headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "webhook_endpoint_not_found"
    # the CLI refuses the same URLs (the operator's own URLs are not limited to the allowed hosts)
    cli = [sys.executable, "-m", "batchyard.cli.main", "webhooks", "add", "--project", "alpha"]
    failed = subprocess.run(
        [*cli, "--url", "https://user:pw@hooks.example.com/x", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode != 0 and "user name or password" in failed.stderr


def test_the_delivery_log_refuses_odd_pages_and_hides_other_projects(
    make_server: Callable[..., Server], upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Held before this review: checked so that it stays so."""
    data = tmp_path / "data"
    key = by(data, "keys", "create", "--project", "alpha")[-1]
    srv = make_server("--upstream", upstream.base_url, data_dir=data)
    auth = {"Authorization": f"Bearer {key}"}
    for query in ("limit=-1", "limit=0", "limit=1000000000", "limit=abc", "limit=", "limit=1e3"):
        r = httpx.get(srv.base_url + "/webhook_events?" + query, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "limit", query
    for after in ("garbage", "evt_" + "a" * 200, "%00", "evt_nope"):
        r = httpx.get(srv.base_url + "/webhook_events?after=" + after, headers=auth)
        assert r.status_code == 200 and r.json()["data"] == [], after
    for event_id in ("evt_nope", "x" * 5000, "evt_%00"):
        r = httpx.get(srv.base_url + "/webhook_events/" + event_id, headers=auth)
        assert r.status_code == 404 and r.json()["error"]["code"] == "webhook_event_not_found"
