"""What a key-holder sends is bounded at the API edge (issue 9, items 2, 4, 6, 7), against `batchyard serve`:
upload parts capped at the upload's declared size, an early 413, string caps, per-key caps (429), ids of the wrong
shape answered as unknown ids on SQLite and PostgreSQL (NUL included), a missing blob answered before the headers,
and a full disk answered 507."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Server
from tests.support.batches import chat_line, jsonl
from tests.support.envelope import assert_envelope
from tests.support.fake_upstream import FakeUpstream

BATCH_CAP = 1_000_000  # --max-batch-file-bytes of the module's server
AUTH = {"Authorization": "Bearer sk-test"}


def serve(data_dir: Path, *args: str, upstream: FakeUpstream) -> Server:
    keys = ["--api-key", "sk-test", "--api-key", "sk-other", "--api-key", "sk-third"]
    return Server(data_dir, ["--upstream", upstream.base_url, "--no-worker", *keys, *args])


@pytest.fixture(scope="module")
def upstream_m() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, upstream_m: FakeUpstream) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("bounds") / "data"
    with serve(data, "--max-batch-file-bytes", str(BATCH_CAP), upstream=upstream_m) as s:
        yield s


@pytest.fixture(scope="module")
def http(srv: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.root_url, timeout=30, headers=AUTH) as c:
        yield c


def blobs_under(root: Path) -> list[Path]:
    return [Path(d) / f for d, _, fs in os.walk(root) for f in fs]


def new_upload(http: httpx.Client, **over: Any) -> dict[str, Any]:
    body = {"filename": "in.jsonl", "purpose": "batch", "bytes": 10, "mime_type": "text/jsonl", **over}
    resp = http.post("/v1/uploads", json=body)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def add_part(http: httpx.Client, upload_id: str, data: bytes) -> httpx.Response:
    return http.post(f"/v1/uploads/{upload_id}/parts", files={"data": ("blob", data)})


# --------------------------------------------------------------------------- upload parts and the declared size


def test_a_part_past_the_declared_bytes_is_refused_and_nothing_is_kept(
    http: httpx.Client, srv: Server
) -> None:
    up = new_upload(http, bytes=10)
    err = assert_envelope(
        add_part(http, up["id"], b"x" * (4 * 1024 * 1024)), 400, "data", "upload_size_exceeded"
    )
    assert "10 bytes" in err["message"]
    assert blobs_under(srv.data_dir / "blobs" / "uploads" / up["id"]) == []
    assert add_part(http, up["id"], b"123456").status_code == 200
    assert_envelope(add_part(http, up["id"], b"12345"), 400, "data", "upload_size_exceeded")  # 6 + 5 > 10
    last = add_part(http, up["id"], b"7890")
    assert last.status_code == 200, last.text
    assert_envelope(add_part(http, up["id"], b"x"), 400, "data", "upload_size_exceeded")  # full


# --------------------------------------------------------------------------- an early 413


def multipart_head(boundary: str, purpose: str) -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


def read_response(sock: socket.socket, timeout: float) -> bytes:
    """What the server answers within `timeout` (until it closes or a complete head and JSON body arrived)."""
    sock.settimeout(timeout)
    got = b""
    while b"\r\n\r\n" not in got or not got.rstrip().endswith(b"}"):
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_batch_file_over_its_cap_is_refused_before_the_rest_is_sent(srv: Server, framing: str) -> None:
    """The client sends the purpose, then only the start of a 300 MB file, and waits: the 413 must come without the
    rest (with Content-Length at once; chunked as soon as the batch cap is crossed)."""
    boundary = uuid.uuid4().hex
    head = multipart_head(boundary, "batch")
    start = head + b"x" * (BATCH_CAP + 200_000 if framing == "chunked" else 65536)
    total = len(head) + 300 * 1024 * 1024
    if framing == "content-length":
        framing_headers = f"Content-Length: {total}\r\n"
        body = start
    else:
        framing_headers = "Transfer-Encoding: chunked\r\n"
        body = b"".join(
            f"{len(c):x}\r\n".encode() + c + b"\r\n"
            for c in (start[i : i + 65536] for i in range(0, len(start), 65536))
        )
    with socket.create_connection(("127.0.0.1", srv.port)) as sock:
        sock.sendall(
            (
                f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-test\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n{framing_headers}\r\n"
            ).encode()
            + body
        )
        got = read_response(sock, timeout=10)
    assert got.startswith(b"HTTP/1.1 413"), got[:300]
    assert b'"file_too_large"' in got and str(BATCH_CAP).encode() in got
    assert [p for p in blobs_under(srv.data_dir / "blobs" / "files") if p.stat().st_size > BATCH_CAP] == []
    # The SDK (which sends the purpose first, with a Content-Length) reads the 413 and is not left hanging.
    oai = srv.client()
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        oai.files.create(file=("big.jsonl", b"x" * (8 * BATCH_CAP)), purpose="batch")
    assert e.value.status_code == 413 and time.monotonic() - t0 < 20
    assert oai.files.create(file=("ok.jsonl", jsonl([chat_line(1)])), purpose="batch").bytes > 0


# --------------------------------------------------------------------------- string caps


@pytest.mark.parametrize(
    ("over", "param"),
    [
        ({"filename": "n" * 100_000}, "filename"),
        ({"mime_type": "text/" + "x" * 300}, "mime_type"),
        ({"mime_type": "text/jsonl\x00"}, "mime_type"),
        ({"mime_type": "text/\njsonl"}, "mime_type"),
        ({"purpose": "b" * 100_000}, "purpose"),
    ],
)
def test_upload_strings_are_capped_and_free_of_control_characters(
    http: httpx.Client, over: dict[str, str], param: str
) -> None:
    body = {"filename": "in.jsonl", "purpose": "batch", "bytes": 10, "mime_type": "text/jsonl", **over}
    err = assert_envelope(http.post("/v1/uploads", json=body), 400, param)
    assert len(err["message"]) < 500


def test_a_filename_keeps_no_control_characters(http: httpx.Client) -> None:
    up = new_upload(http, filename="a\tb\x00c\x1b.jsonl")
    assert up["filename"] == "a\ufffdb\ufffdc\ufffd.jsonl"


def test_metadata_with_control_characters_is_refused_but_line_breaks_are_text(http: httpx.Client) -> None:
    fid = http.post(
        "/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", jsonl([chat_line(1)]))}
    )
    body = {"input_file_id": fid.json()["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    for bad in ({"k": "v\x00"}, {"k\x00": "v"}, {"k": "\x1b[31mred"}, {"k\n": "v"}):
        assert_envelope(
            http.post("/v1/batches", json={**body, "metadata": bad}), 400, "metadata", "invalid_value"
        )
    note = {"note": "line one\nline two\ttabbed"}
    resp = http.post("/v1/batches", json={**body, "metadata": note})
    assert resp.status_code == 200, resp.text
    assert resp.json()["metadata"] == note


# --------------------------------------------------------------------------- a missing blob


def test_a_file_whose_blob_is_missing_gets_an_error_before_any_header(
    http: httpx.Client, srv: Server
) -> None:
    f = http.post("/v1/files", data={"purpose": "vision"}, files={"file": ("a.txt", b"hello")}).json()
    (srv.data_dir / "blobs" / "files" / f["id"]).unlink()
    err = assert_envelope(http.get(f"/v1/files/{f['id']}/content"), 500, None, "file_content_missing")
    assert f["id"] in err["message"]
    assert http.get(f"/v1/files/{f['id']}").status_code == 200  # the object is still there
    assert http.get("/health").status_code == 200


# --------------------------------------------------------------------------- ids of the wrong shape, NUL included


NUL_BODY_CASES: list[tuple[str, str, dict[str, Any], int, str | None]] = [
    ("POST", "/v1/batches", {"input_file_id": "file-\x00", "endpoint": "/v1/chat/completions",
                             "completion_window": "24h"}, 400, "input_file_id"),
    ("POST", "/v1/uploads", {"filename": "a", "purpose": "batch", "bytes": 1, "mime_type": "text/\x00"},
     400, "mime_type"),
    ("POST", "/v1/uploads", {"filename": "a", "purpose": "batch\x00", "bytes": 1, "mime_type": "text/jsonl"},
     400, "purpose"),
]  # fmt: skip

BAD_IDS = ["\x00", "file-\x00", "batch_\x00", "upload_\x00", "x" * 2000, "file-..\\etc", "batch_a b"]


def check_bad_ids(c: httpx.Client) -> None:
    for bad in BAD_IDS:
        q = urllib.parse.quote(bad, safe="")
        for method, path, code in [
            ("GET", f"/v1/files/{q}", "file_not_found"),
            ("GET", f"/v1/files/{q}/content", "file_not_found"),
            ("DELETE", f"/v1/files/{q}", "file_not_found"),
            ("GET", f"/v1/batches/{q}", "batch_not_found"),
            ("POST", f"/v1/batches/{q}/cancel", "batch_not_found"),
            ("POST", f"/v1/uploads/{q}/parts", "not_found"),
            ("POST", f"/v1/uploads/{q}/complete", "not_found"),
            ("POST", f"/v1/uploads/{q}/cancel", "not_found"),
        ]:
            kw: dict[str, Any] = {}
            if path.endswith("/parts"):
                kw["files"] = {"data": ("b", b"1")}
            elif path.endswith("/complete"):
                kw["json"] = {"part_ids": []}
            resp = c.request(method, path, **kw)
            err = assert_envelope(resp, 404, code=code)
            assert len(err["message"]) < 200, (method, path)
        for listing in ("/v1/files", "/v1/batches"):
            resp = c.get(listing, params={"after": bad})
            assert resp.status_code == 200, (listing, resp.text)
            assert resp.json()["data"] == [] and resp.json()["has_more"] is False
    assert_envelope(c.get("/v1/files", params={"purpose": "batch\x00"}), 400, "purpose", "invalid_value")
    for method, path, body, status, param in NUL_BODY_CASES:
        assert_envelope(c.request(method, path, json=body), status, param)
    part = c.post(
        "/v1/uploads", json={"filename": "a", "purpose": "batch", "bytes": 1, "mime_type": "text/jsonl"}
    )
    assert_envelope(
        c.post(f"/v1/uploads/{part.json()['id']}/complete", json={"part_ids": ["part_\x00" * 100]}),
        400,
        "part_ids",
    )
    assert c.get("/health").status_code == 200


def test_ids_of_the_wrong_shape_are_unknown_ids_on_sqlite(http: httpx.Client) -> None:
    check_bad_ids(http)


def test_ids_of_the_wrong_shape_are_unknown_ids_on_postgres(
    pg_cluster: Any, tmp_path: Path, upstream: FakeUpstream
) -> None:
    dsn = asyncio.run(pg_cluster.create_database())
    with (
        serve(tmp_path / "pg", "--database-url", dsn, upstream=upstream) as s,
        httpx.Client(base_url=s.root_url, timeout=30, headers=AUTH) as c,
    ):
        check_bad_ids(c)
        assert "Traceback" not in s.log()


# --------------------------------------------------------------------------- per-key caps


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory, upstream_m: FakeUpstream) -> Iterator[Server]:
    caps = ["--max-files-per-key", "3", "--max-stored-bytes-per-key", "5000", "--max-pending-uploads-per-key", "2",
            "--max-active-batches-per-key", "2"]  # fmt: skip
    with serve(tmp_path_factory.mktemp("capped") / "data", *caps, upstream=upstream_m) as s:
        yield s


def client_for(srv: Server, key: str) -> httpx.Client:
    return httpx.Client(base_url=srv.root_url, timeout=30, headers={"Authorization": f"Bearer {key}"})


def assert_quota(resp: httpx.Response, what: str) -> None:
    err = assert_envelope(resp, 429, None, "insufficient_quota")
    assert err["type"] == "insufficient_quota" and what in err["message"]
    assert resp.headers["x-should-retry"] == "false"


def post_file(c: httpx.Client, data: bytes, purpose: str = "user_data") -> httpx.Response:
    return c.post("/v1/files", data={"purpose": purpose}, files={"file": ("f.txt", data)})


def test_a_key_past_its_file_count_gets_429_and_others_do_not(capped: Server) -> None:
    with client_for(capped, "sk-test") as a, client_for(capped, "sk-other") as b:
        ids = [post_file(a, b"1").json()["id"] for _ in range(3)]
        assert_quota(post_file(a, b"1"), "files")
        assert post_file(b, b"1").status_code == 200  # another key's cap is its own
        assert a.delete(f"/v1/files/{ids[0]}").status_code == 200
        assert post_file(a, b"1").status_code == 200
        with pytest.raises(openai.RateLimitError):
            capped.client().files.create(file=("f.txt", b"1"), purpose="user_data")


def test_a_key_past_its_stored_bytes_gets_429_and_nothing_is_kept(capped: Server) -> None:
    with client_for(capped, "sk-third") as c:
        assert post_file(c, b"x" * 4000).status_code == 200
        assert_quota(post_file(c, b"x" * 1001), "stored bytes")
        assert post_file(c, b"x" * 1000).status_code == 200
        assert_quota(c.post("/v1/uploads", json={"filename": "a", "purpose": "user_data", "bytes": 1,
                                                 "mime_type": "text/plain"}), "stored bytes")  # fmt: skip
    sizes = sorted(p.stat().st_size for p in blobs_under(capped.data_dir / "blobs" / "files"))
    assert 1001 not in sizes


def test_pending_uploads_and_batches_in_progress_are_capped(tmp_path: Path, upstream: FakeUpstream) -> None:
    caps = ["--max-pending-uploads-per-key", "2", "--max-active-batches-per-key", "2"]
    with serve(tmp_path / "data", *caps, upstream=upstream) as s, client_for(s, "sk-test") as c:
        ups = [new_upload(c) for _ in range(2)]
        body = {"filename": "a", "purpose": "batch", "bytes": 10, "mime_type": "text/jsonl"}
        assert_quota(c.post("/v1/uploads", json=body), "uploads in progress")
        assert c.post(f"/v1/uploads/{ups[0]['id']}/cancel").status_code == 200
        assert c.post("/v1/uploads", json=body).status_code == 200
        fid = post_file(c, jsonl([chat_line(1)]), "batch").json()["id"]
        batch = {"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        assert all(
            c.post("/v1/batches", json=batch).status_code == 200 for _ in range(2)
        )  # --no-worker: they stay
        assert_quota(c.post("/v1/batches", json=batch), "batches in progress")


def test_requests_racing_past_a_cap_get_only_what_fits(tmp_path: Path, upstream: FakeUpstream) -> None:
    """Twenty uploads sent at once by a key that may hold 3 files: every one passes the first check before any is
    stored (each body waits until all twenty have begun), so only what the requests in flight hold keeps the
    cap: 3 are stored, 17 get 429. The same for ten batch creates at once under a cap of 2."""
    caps = ["--max-files-per-key", "3", "--max-active-batches-per-key", "2"]
    n = 20
    boundary = "racecap"
    started = 0
    go = asyncio.Event()

    async def body(i: int) -> Any:
        nonlocal started
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="f{i}.jsonl"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        started += 1
        if started == n:
            go.set()
        await go.wait()
        await asyncio.sleep(0.2)  # the server has read every request's head and checked its cap by now
        yield jsonl([chat_line(i)]) + f"\r\n--{boundary}--\r\n".encode()

    async def race(base_url: str) -> tuple[list[int], list[int]]:
        headers = {"Authorization": "Bearer sk-test"}
        async with httpx.AsyncClient(base_url=base_url, timeout=30, headers=headers) as c:
            files = await asyncio.gather(
                *(
                    c.post(
                        "/v1/files",
                        content=body(i),
                        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
                    )
                    for i in range(n)
                )
            )
            ok = [r for r in files if r.status_code == 200]
            for r in files:
                if r.status_code != 200:
                    assert_quota(r, "files")
            batch = {"input_file_id": ok[0].json()["id"], "endpoint": "/v1/chat/completions",
                     "completion_window": "24h"}  # fmt: skip
            batches = await asyncio.gather(*(c.post("/v1/batches", json=batch) for _ in range(10)))
            for r in batches:
                if r.status_code != 200:
                    assert_quota(r, "batches in progress")
            return [r.status_code for r in files], [r.status_code for r in batches]

    with serve(tmp_path / "data", *caps, upstream=upstream) as s:
        files, batches = asyncio.run(race(s.root_url))
        assert sorted(files) == [200] * 3 + [429] * 17
        assert sorted(batches) == [200] * 2 + [429] * 8
        with client_for(s, "sk-test") as c:
            assert len(c.get("/v1/files").json()["data"]) == 3
            assert len(c.get("/v1/batches").json()["data"]) == 2
        assert len(blobs_under(s.data_dir / "blobs" / "files")) == 3  # the refused ones left nothing


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_answers_507_and_leaves_nothing_behind(
    tiny_disk: Path, tmp_path: Path, upstream: FakeUpstream
) -> None:
    storage = ["--storage-url", f"file://{tiny_disk}"]
    with serve(tmp_path / "data", *storage, upstream=upstream) as s, client_for(s, "sk-test") as c:
        err = assert_envelope(post_file(c, os.urandom(3 * 1024 * 1024)), 507, None, "storage_full")
        assert err["type"] == "server_error"
        up = new_upload(c, bytes=3 * 1024 * 1024, purpose="user_data")
        assert_envelope(add_part(c, up["id"], os.urandom(3 * 1024 * 1024)), 507, None, "storage_full")
        assert blobs_under(tiny_disk) == []
        small = post_file(c, b"still works", purpose="vision")
        assert small.status_code == 200, small.text
        assert c.get(f"/v1/files/{small.json()['id']}/content").content == b"still works"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions/"),  # a trailing slash: was a 307 to follow (FastAPI's redirect)
        ("GET", "/v1/batches/"),
        ("POST", "/v1/chat/completion"),
        ("GET", "/v2/batches"),
        ("GET", "/v1/" + "x" * 5000),
    ],
)
def test_a_path_that_is_not_served_gets_openais_unknown_url(
    http: httpx.Client, method: str, path: str
) -> None:
    resp = http.request(method, path, json={})
    err = assert_envelope(resp, 404, param=None, code="unknown_url")
    assert err["type"] == "invalid_request_error"
    assert err["message"].startswith(f"Unknown request URL: {method} {path[:100]}")
    assert len(err["message"]) < 300  # a long path is cut, not echoed whole
