"""Projects and their keys, end to end: keys made with `batchyard keys create` on the server's store, a real
`batchyard serve` on loopback, the official SDK as the client. Every key of a project sees the project's objects;
another project (or a static key) gets the same 404 as for an unknown id, on every route."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
from starlette.requests import Request

from batchyard.api.auth import ANONYMOUS, Authenticator, Principal, owner_of
from batchyard.domain import tenancy
from batchyard.domain.tenancy import ProjectRecord
from batchyard.errors import Unauthorized
from batchyard.store.memory import MemoryStore
from tests.conftest import Server
from tests.support.batches import chat_line, jsonl, read_lines, upload, wait_for
from tests.support.fake_upstream import FakeUpstream

STATIC = "sk-static-test"


def by(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`batchyard ARGS --data-dir DATA_DIR`, checked."""
    return subprocess.run(
        [sys.executable, "-m", "batchyard.cli.main", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )


def new_key(data_dir: Path, project: str, *flags: str) -> str:
    out = by(data_dir, "keys", "create", "--project", project, *flags).stdout
    return out.splitlines()[-1]


def key_id_of(data_dir: Path, key: str) -> str:
    prefix = key[: len("sk-by-") + 3]
    (line,) = [x for x in by(data_dir, "keys", "list").stdout.splitlines() if prefix in x]
    return line.split()[0]


def not_found(call: Callable[[], object]) -> openai.NotFoundError:
    with pytest.raises(openai.NotFoundError) as info:
        call()
    return info.value


def test_keys_create_prints_the_key_last_and_stores_only_its_hash(tmp_path: Path) -> None:
    data = tmp_path / "data"
    out = by(data, "keys", "create", "--project", "alpha", "--admin").stdout.splitlines()
    key = out[-1]
    assert key.startswith("sk-by-") and len(key) == 6 + 48 and key.isascii()
    assert any("created project alpha (proj_" in x for x in out)
    listing = by(data, "keys", "list").stdout
    assert key[:9] + "…" in listing and key not in listing and "alpha" in listing and "yes" in listing
    second = new_key(data, "alpha")
    assert second != key
    projects = by(data, "projects", "list").stdout.splitlines()
    assert len(projects) == 2 and "alpha" in projects[1]  # one project: the second key joined it
    raw = b"".join(p.read_bytes() for p in data.glob("batchyard.sqlite3*"))
    assert key.encode() not in raw and second.encode() not in raw
    assert key[6:].encode() not in raw  # not even the random part
    revoked = by(data, "keys", "revoke", key_id_of(data, key)).stdout
    assert revoked.startswith("revoked key ")
    unknown = subprocess.run(
        [sys.executable, "-m", "batchyard.cli.main", "keys", "revoke", "key_nope", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode != 0 and "no key 'key_nope'" in unknown.stderr


def test_every_key_of_a_project_sees_its_objects_and_no_other_project_does(
    make_server: Callable[..., Server], upstream: FakeUpstream, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    a1, a2, b1 = new_key(data, "alpha"), new_key(data, "alpha"), new_key(data, "beta")
    srv = make_server(
        "--upstream", upstream.base_url, "--api-key", STATIC, "--shard-lines", "5", data_dir=data
    )
    alpha1, alpha2, beta, static = (srv.client(k) for k in (a1, a2, b1, STATIC))

    fid = upload(alpha1, [chat_line(i) for i in range(7)])
    assert alpha2.files.retrieve(fid).id == fid
    assert [f.id for f in alpha2.files.list()] == [fid]
    for other in (beta, static):
        err = not_found(lambda o=other: o.files.retrieve(fid))  # type: ignore[misc]
        unknown = not_found(lambda o=other: o.files.retrieve("file-" + "x" * 24))  # type: ignore[misc]
        assert isinstance(err.body, dict) and isinstance(unknown.body, dict)
        assert {**err.body, "message": ""} == {**unknown.body, "message": ""}
        assert err.body["message"] == unknown.body["message"].replace("x" * 24, fid[5:])
        not_found(lambda o=other: o.files.content(fid))  # type: ignore[misc]
        not_found(lambda o=other: o.files.delete(fid))  # type: ignore[misc]
        assert list(other.files.list()) == []

    batch = alpha2.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_for(alpha1, batch.id)
    assert done.status == "completed" and done.request_counts is not None
    assert done.request_counts.completed == 7
    assert len(read_lines(alpha2, done.output_file_id)) == 7
    assert [b.id for b in alpha1.batches.list()] == [batch.id]
    for other in (beta, static):
        not_found(lambda o=other: o.batches.retrieve(batch.id))  # type: ignore[misc]
        not_found(lambda o=other: o.batches.cancel(batch.id))  # type: ignore[misc]
        not_found(lambda o=other: o.files.retrieve(done.output_file_id or ""))  # type: ignore[misc]
        not_found(lambda o=other: o.files.content(done.output_file_id or ""))  # type: ignore[misc]
        assert list(other.batches.list()) == []

    # a batch from another project's file fails as for a missing file, in OpenAI's words
    stolen = beta.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
    failed = wait_for(beta, stolen.id)
    missing = beta.batches.create(
        input_file_id="file-" + "y" * 24, endpoint="/v1/chat/completions", completion_window="24h"
    )
    failed_missing = wait_for(beta, missing.id)
    assert failed.status == failed_missing.status == "failed"
    assert failed.errors is not None and failed.errors.data is not None
    assert failed_missing.errors is not None and failed_missing.errors.data is not None
    (line_err,) = failed.errors.data
    (err_missing,) = failed_missing.errors.data
    assert (
        (line_err.code, line_err.param)
        == (err_missing.code, err_missing.param)
        == ("invalid_request", "file_id")
    )
    assert (
        line_err.message
        == f"Cannot find file {fid}, or organization {b_project(data)} does not have access to it."
    )
    assert upstream.stats()["total"] == 7  # beta's batch sent nothing

    # uploads: another project's upload is unknown
    up = alpha1.uploads.create(bytes=10, filename="u.jsonl", mime_type="text/jsonl", purpose="batch")
    for other in (beta, static):
        not_found(lambda o=other: o.uploads.parts.create(up.id, data=b"0123456789"))  # type: ignore[misc]
        not_found(lambda o=other: o.uploads.complete(up.id, part_ids=[]))  # type: ignore[misc]
        not_found(lambda o=other: o.uploads.cancel(up.id))  # type: ignore[misc]
    assert alpha2.uploads.cancel(up.id).status == "cancelled"


def b_project(data: Path) -> str:
    (line,) = [x for x in by(data, "projects", "list").stdout.splitlines() if " beta " in x]
    return line.split()[0]


def test_revoked_keys_archived_projects_and_unknown_keys_are_refused(
    make_server: Callable[..., Server], upstream: FakeUpstream, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    key = new_key(data, "alpha")
    srv = make_server("--upstream", upstream.base_url, "--api-key-cache-seconds", "0.2", data_dir=data)
    client = srv.client(key)
    assert list(client.files.list()) == []
    # with keys in the store, a key is needed even with no --api-key
    missing = httpx.get(srv.base_url + "/files")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    for bad in ("sk-by-" + "0" * 48, "sk-other", key + "x"):
        with pytest.raises(openai.AuthenticationError) as info:
            srv.client(bad).files.list()
        assert info.value.body["message"] == "Incorrect API key provided."  # type: ignore[index]
        assert info.value.body["code"] == "invalid_api_key"  # type: ignore[index]
    later = new_key(data, "alpha")  # a key made while the server runs works at once
    assert list(srv.client(later).files.list()) == []
    by(data, "keys", "revoke", key_id_of(data, key))
    deadline = time.monotonic() + 5
    while True:  # within --api-key-cache-seconds
        try:
            client.files.list()
        except openai.AuthenticationError as e:
            assert e.body["message"] == "Incorrect API key provided."  # type: ignore[index]
            break
        assert time.monotonic() < deadline, "a revoked key still works"
        time.sleep(0.05)
    assert list(srv.client(later).files.list()) == []  # the project's other keys still work


def admin_api(srv: Server, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=srv.base_url + "/organization", headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


def test_the_admin_api_manages_projects_and_keys_and_refuses_other_keys(
    make_server: Callable[..., Server], upstream: FakeUpstream, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    root, member = new_key(data, "ops", "--admin"), new_key(data, "ops")
    srv = make_server(
        "--upstream", upstream.base_url, "--api-key", STATIC, "--admin-api-key", "sk-static-admin",
        data_dir=data,
    )  # fmt: skip
    for key in (member, STATIC):  # not admins: 403, OpenAI-shaped
        with admin_api(srv, key) as refused:
            for method, path in (("GET", "/projects"), ("POST", "/projects"), ("GET", "/projects/proj_x")):
                r = refused.request(method, path, json={"name": "x"})
                assert r.status_code == 403
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
                assert r.json()["error"]["type"] == "invalid_request_error"
    with admin_api(srv, root) as api, admin_api(srv, "sk-static-admin") as static_admin:
        made = api.post("/projects", json={"name": "web"})
        assert made.status_code == 200, made.text
        web = made.json()
        assert (
            web["object"] == "organization.project" and web["name"] == "web" and web["id"].startswith("proj_")
        )
        assert web["status"] == "active" and web["archived_at"] is None
        assert api.post("/projects", json={"name": "web"}).status_code == 409
        bad = api.post("/projects", json={"name": "../x"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "name"
        assert api.get(f"/projects/{web['id']}").json() == web
        assert api.get("/projects/proj_unknown").status_code == 404
        names = [p["name"] for p in static_admin.get("/projects").json()["data"]]
        assert names == ["ops", "web"]

        sa = api.post(f"/projects/{web['id']}/service_accounts", json={"name": "deploy"})
        assert sa.status_code == 200, sa.text
        body = sa.json()
        assert body["object"] == "organization.project.service_account" and body["role"] == "member"
        value = body["api_key"]["value"]
        assert value.startswith("sk-by-") and body["api_key"]["id"] == body["id"]
        listed = api.get(f"/projects/{web['id']}/api_keys").json()["data"]
        assert [k["id"] for k in listed] == [body["id"]]
        assert listed[0]["redacted_value"] == value[:9] + "…" and value not in str(listed)

        # the new key works at once, in its own project
        web_client = srv.client(value)
        fid = upload(web_client, jsonl([chat_line(0)]))
        not_found(lambda: srv.client(member).files.retrieve(fid))

        # revoking bites at once in this process
        gone = api.delete(f"/projects/{web['id']}/api_keys/{body['id']}")
        assert gone.json() == {
            "object": "organization.project.api_key.deleted",
            "id": body["id"],
            "deleted": True,
        }
        with pytest.raises(openai.AuthenticationError):
            web_client.files.list()
        assert api.delete(f"/projects/{web['id']}/api_keys/key_unknown").status_code == 404
        ops_id = next(p["id"] for p in api.get("/projects").json()["data"] if p["name"] == "ops")
        member_id = key_id_of(data, member)
        assert (
            api.delete(f"/projects/{web['id']}/api_keys/{member_id}").status_code == 404
        )  # another project's

        # archiving: its keys stop working, it leaves the default list, no key can be added
        second = api.post(
            f"/projects/{web['id']}/service_accounts", json={"name": "ci", "admin": True}
        ).json()
        assert second["role"] == "owner"
        archived = api.post(f"/projects/{web['id']}/archive").json()
        assert archived["status"] == "archived" and archived["archived_at"] is not None
        with pytest.raises(openai.AuthenticationError):
            srv.client(second["api_key"]["value"]).files.list()
        assert [p["id"] for p in api.get("/projects").json()["data"]] == [ops_id]
        every = api.get("/projects", params={"include_archived": "true"}).json()["data"]
        assert [p["id"] for p in every] == [ops_id, web["id"]]
        late = api.post(f"/projects/{web['id']}/service_accounts", json={"name": "late"})
        assert late.status_code == 400 and late.json()["error"]["code"] == "project_archived"


def test_project_caps_count_every_key_of_the_project_and_tokens_are_limited_at_validation(
    make_server: Callable[..., Server], upstream: FakeUpstream, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    a1, a2, b1 = new_key(data, "alpha"), new_key(data, "alpha"), new_key(data, "beta")
    slow = {"delay": 20}  # the batches stay in progress for the whole test
    small = jsonl([chat_line(0, x_fake=slow), chat_line(1, x_fake=slow)])
    tiny = jsonl([chat_line(2, x_fake=slow)])
    limit = len(small) // 4 + len(tiny) // 4  # small + tiny fit, small + small do not
    srv = make_server(
        "--upstream", upstream.base_url,
        "--project-max-batches-in-progress", "2",
        "--project-max-stored-bytes", str(len(small) + len(tiny) + 10),
        "--project-max-enqueued-tokens", str(limit),
        data_dir=data,
    )  # fmt: skip
    alpha1, alpha2, beta = (srv.client(k) for k in (a1, a2, b1))
    f_small, f_tiny = upload(alpha1, small), upload(alpha2, tiny)
    with pytest.raises(openai.RateLimitError) as full:  # stored bytes: the project's, not the key's
        upload(alpha1, tiny)
    assert full.value.code == "insufficient_quota"
    assert "You have reached this project's limit of stored bytes" in full.value.message
    b_small = upload(beta, small)  # another project's bytes do not count

    def create(client: openai.OpenAI, fid: str) -> str:
        return client.batches.create(
            input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h"
        ).id

    first = create(alpha1, f_small)
    assert wait_for(alpha1, first, {"in_progress", "failed"}).status == "in_progress"
    over = wait_for(alpha2, create(alpha2, f_small))  # small + small enqueued: over the limit
    assert over.status == "failed" and over.errors is not None and over.errors.data is not None
    (err,) = over.errors.data
    alpha_id = next(x.split()[0] for x in by(data, "projects", "list").stdout.splitlines() if " alpha " in x)
    assert err.code == "token_limit_exceeded" and err.line is None
    assert err.message == (
        f"Enqueued token limit reached for test-model in organization {alpha_id}. Limit: {limit:,} enqueued "
        "tokens. Please try again once some in_progress batches have been completed."
    )
    other = create(beta, b_small)  # beta's enqueued tokens are its own
    assert wait_for(beta, other, {"in_progress", "failed"}).status == "in_progress"
    fits = create(alpha2, f_tiny)  # small + tiny fit
    assert wait_for(alpha2, fits, {"in_progress", "failed"}).status == "in_progress"
    with pytest.raises(openai.RateLimitError) as busy:  # 2 in progress: the project's cap, for every key
        create(alpha1, f_tiny)
    assert busy.value.code == "insufficient_quota"
    assert "this project's limit of batches in progress (2)" in busy.value.message


def test_creates_per_minute_are_rate_limited_per_project_with_retry_after(
    make_server: Callable[..., Server], upstream: FakeUpstream, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    a1, a2, b1 = new_key(data, "alpha"), new_key(data, "alpha"), new_key(data, "beta")
    srv = make_server("--upstream", upstream.base_url, "--project-create-rpm", "3", data_dir=data)
    alpha1, alpha2, beta = (srv.client(k) for k in (a1, a2, b1))
    fid = upload(alpha1, [chat_line(0)])
    upload(alpha2, [chat_line(1)])
    alpha1.batches.create(input_file_id=fid, endpoint="/v1/chat/completions", completion_window="24h")
    r = httpx.post(
        srv.base_url + "/uploads",
        headers={"Authorization": f"Bearer {a2}"},
        json={"bytes": 10, "filename": "x.jsonl", "mime_type": "text/jsonl", "purpose": "batch"},
    )
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "requests" and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert 1 <= int(r.headers["retry-after"]) <= 60
    assert "x-should-retry" not in r.headers  # unlike a cap, a rate limit passes
    with pytest.raises(openai.RateLimitError):
        upload(alpha1, [chat_line(2)])
    assert alpha1.files.list().data  # reading is not a create
    upload(beta, [chat_line(3)])  # another project has its own rate


# -- what the authenticator trusts, and for how long (in process, on the in-memory store, with a fake clock) ---


def bearer(token: str | None) -> Request:
    headers = [] if token is None else [(b"authorization", f"Bearer {token}".encode())]
    return Request({"type": "http", "method": "GET", "path": "/v1/files", "headers": headers})


async def who(auth: Authenticator, token: str | None) -> str:
    request = bearer(token)
    await auth.resolve(request)
    return auth.owner(request)


async def test_a_revoke_bites_after_the_cache_time_or_at_once_when_forgotten() -> None:
    store = MemoryStore()
    await store.open()
    now = [100.0]
    auth = Authenticator([], store=store, cache_seconds=5.0, clock=lambda: now[0])
    assert await who(auth, None) == ANONYMOUS  # nothing stored, nothing configured
    project = ProjectRecord(tenancy.project_id(), "alpha", 1)
    await store.insert_project(project)
    key, rec = tenancy.make_key(project.id, "k", admin=False, now=1)
    await store.insert_api_key(rec)
    now[0] += 5.1  # "no keys stored" was trusted for the cache time too
    assert await who(auth, key) == project.id
    with pytest.raises(Unauthorized) as missing:
        await who(auth, None)
    assert missing.value.code == "missing_api_key"
    await store.revoke_api_key(rec.id, 2)
    now[0] += 4.9
    assert await who(auth, key) == project.id  # still trusted: within the cache time
    now[0] += 0.2
    with pytest.raises(Unauthorized) as revoked:
        await who(auth, key)
    assert (revoked.value.code, revoked.value.message) == ("invalid_api_key", "Incorrect API key provided.")

    other, other_rec = tenancy.make_key(project.id, "k2", admin=True, now=3)
    await store.insert_api_key(other_rec)
    request = bearer(other)
    await auth.resolve(request)
    assert auth.principal(request) == Principal(project.id, admin=True, project_id=project.id)
    await store.archive_project(project.id, 4)
    auth.forget()  # what the admin API does after an archive: no waiting
    with pytest.raises(Unauthorized):
        await who(auth, other)


async def test_static_keys_are_not_admins_unless_listed_and_are_never_looked_up() -> None:
    store = MemoryStore()
    await store.open()
    auth = Authenticator(["sk-one"], store=store, admin_keys=["sk-root"])
    for token, admin in (("sk-one", False), ("sk-root", True)):
        request = bearer(token)
        await auth.resolve(request)
        assert auth.principal(request) == Principal(owner_of(token), admin=admin)
    with pytest.raises(Unauthorized):
        await who(auth, "sk-by-" + "a" * 48)  # the shape of a stored key, but none is stored
