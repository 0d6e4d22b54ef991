"""End-to-end tests of /v1/files against `batchyard serve` in a subprocess: the official SDK plus raw httpx."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import Server
from tests.support.batches import chat_line, jsonl
from tests.support.envelope import assert_envelope
from tests.support.fake_upstream import FakeUpstream

DAY = 86400
ALL_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")


# --------------------------------------------------------------------------- fixtures (one server per module)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with (
        FakeUpstream() as up,
        Server(tmp_path_factory.mktemp("files") / "data", ["--upstream", up.base_url]) as s,
    ):
        yield s


def files_under(root: Path) -> set[Path]:
    return {Path(d) / f for d, _, fs in os.walk(root) for f in fs}


def post_file(
    http: httpx.Client,
    data: bytes = b"hello\n",
    *,
    name: str = "f.jsonl",
    fields: dict[str, str] | None = None,
    with_file: bool = True,
) -> httpx.Response:
    files = {"file": (name, data, "application/octet-stream")} if with_file else None
    form = {"purpose": "user_data"} if fields is None else fields
    if files is None:
        # a multipart body with only text fields (httpx would otherwise send urlencoded)
        return http.post("/v1/files", data=form, files={"dummy": (None, b"")})
    return http.post("/v1/files", data=form, files=files)


# --------------------------------------------------------------------------- upload


def test_upload_batch_file_returns_the_file_object(oai: OpenAI, http: httpx.Client) -> None:
    data = jsonl([chat_line(i) for i in range(3)])
    before = int(time.time())
    f = oai.files.create(file=("input.jsonl", data), purpose="batch")
    after = int(time.time())
    assert f.id.startswith("file-")
    assert f.object == "file"
    assert f.bytes == len(data)
    assert before - 5 <= f.created_at <= after + 5
    # batch files expire after 30 days by default (OpenAI's documented default)
    assert f.expires_at == f.created_at + 30 * DAY
    assert f.filename == "input.jsonl"
    assert f.purpose == "batch"
    assert f.status == "processed"
    raw = http.get(f"/v1/files/{f.id}").json()
    assert set(raw) == {
        "id",
        "object",
        "bytes",
        "created_at",
        "expires_at",
        "filename",
        "purpose",
        "status",
        "status_details",
    }
    assert raw["status_details"] is None


@pytest.mark.parametrize("purpose", [p for p in ALL_PURPOSES if p != "batch"])
def test_upload_other_purposes_do_not_expire_by_default(oai: OpenAI, purpose: str) -> None:
    data = b"\x00\x01binary \xff\xfe payload\r\n"
    f = oai.files.create(file=("blob.bin", data), purpose=purpose)  # type: ignore[arg-type]
    assert f.purpose == purpose
    assert f.bytes == len(data)
    assert f.expires_at is None
    if purpose in ("assistants", "user_data"):
        with pytest.raises(
            openai.BadRequestError
        ) as e:  # as OpenAI: what was given to a model is not read back
            oai.files.content(f.id)
        assert e.value.body == {
            "message": f"Not allowed to download files of purpose: {purpose}",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    else:
        assert oai.files.content(f.id).content == data


def test_upload_empty_file(oai: OpenAI) -> None:
    f = oai.files.create(file=("empty.jsonl", b""), purpose="batch")
    assert f.bytes == 0
    assert oai.files.content(f.id).content == b""


def test_filename_kept_verbatim_and_never_used_as_a_path(
    srv: Server, oai: OpenAI, http: httpx.Client
) -> None:
    base = srv.data_dir.parent
    before = files_under(base)
    evil = "../../etc/passwd"
    data = b"not your passwd\n"
    f = oai.files.create(file=(evil, data), purpose="vision")
    assert f.filename == evil
    assert oai.files.retrieve(f.id).filename == evil
    listed = [x for x in oai.files.list() if x.id == f.id]
    assert [x.filename for x in listed] == [evil]

    new = files_under(base) - before
    blob_dir = (srv.data_dir / "blobs" / "files").resolve()
    for p in new:
        rp = p.resolve()
        in_blobs = blob_dir in rp.parents
        is_db = rp.parent == srv.data_dir.resolve() and rp.name.startswith("batchyard.sqlite3")
        assert in_blobs or is_db, f"unexpected file written: {p}"
        assert "passwd" not in rp.name
    assert not any("passwd" in str(p) for p in files_under(base))
    # the download hint never carries a path (RFC 6266 section 4.3); the file object keeps the name verbatim
    resp = http.get(f"/v1/files/{f.id}/content")
    assert resp.status_code == 200
    assert resp.content == data
    cd = resp.headers["content-disposition"]
    assert cd.startswith("attachment")
    assert "/" not in cd and "%2F" not in cd.upper(), cd
    assert 'filename=".._.._etc_passwd"' in cd


def test_unicode_filename_round_trips(oai: OpenAI, http: httpx.Client) -> None:
    name = "données – 日本語 🙂.jsonl"
    f = oai.files.create(file=(name, b"x\n"), purpose="vision")
    assert f.filename == name
    assert oai.files.retrieve(f.id).filename == name
    cd = http.get(f"/v1/files/{f.id}/content").headers["content-disposition"]
    assert cd.startswith("attachment")
    assert cd.isascii()


# --------------------------------------------------------------------------- list


def test_list_filters_by_purpose(oai: OpenAI) -> None:
    a = oai.files.create(file=("a.txt", b"a"), purpose="vision")
    b = oai.files.create(file=("b.jsonl", b"b"), purpose="batch")
    vision = oai.files.list(purpose="vision").data
    assert vision and all(x.purpose == "vision" for x in vision)
    ids = {x.id for x in vision}
    assert a.id in ids and b.id not in ids
    batch_ids = {x.id for x in oai.files.list(purpose="batch").data}
    assert b.id in batch_ids and a.id not in batch_ids
    assert oai.files.list(purpose="no-such-purpose").data == []


@pytest.mark.parametrize("limit", [1, 2, 10_000])
def test_list_limit_in_range(oai: OpenAI, http: httpx.Client, limit: int) -> None:
    for i in range(2):
        oai.files.create(file=(f"l{i}.txt", b"x"), purpose="user_data")
    body = http.get("/v1/files", params={"limit": limit}).json()
    total = len(http.get("/v1/files").json()["data"])
    assert len(body["data"]) == min(limit, total)
    assert body["has_more"] is (total > limit)


@pytest.mark.parametrize("limit", ["0", "10001", "-1", "abc", "1.5", ""])
def test_list_limit_out_of_range_is_400(http: httpx.Client, limit: str) -> None:
    err = assert_envelope(http.get("/v1/files", params={"limit": limit}), 400, param="limit")
    assert err["type"] == "invalid_request_error"


def test_list_bad_order_is_400(http: httpx.Client) -> None:
    assert_envelope(http.get("/v1/files", params={"order": "sideways"}), 400, param="order")


def test_list_order_asc_and_desc(oai: OpenAI) -> None:
    made = [oai.files.create(file=(f"o{i}.txt", b"o"), purpose="user_data").id for i in range(3)]
    desc = [x.id for x in oai.files.list(order="desc", limit=10_000).data]
    asc = [x.id for x in oai.files.list(order="asc", limit=10_000).data]
    assert desc == list(reversed(asc))
    assert [i for i in desc if i in made] == list(reversed(made))
    assert [i for i in asc if i in made] == made
    # default order is desc
    assert [x.id for x in oai.files.list().data] == desc


@pytest.mark.parametrize("order", ["asc", "desc"])
def test_list_after_cursor_pages(oai: OpenAI, http: httpx.Client, order: str) -> None:
    for i in range(7):
        oai.files.create(file=(f"p{i}.txt", b"p"), purpose="fine-tune")
    full = [
        x["id"] for x in http.get("/v1/files", params={"purpose": "fine-tune", "order": order}).json()["data"]
    ]
    assert len(full) >= 7
    seen: list[str] = []
    after: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"purpose": "fine-tune", "order": order, "limit": 3}
        if after is not None:
            params["after"] = after
        page = http.get("/v1/files", params=params).json()
        pages += 1
        ids = [x["id"] for x in page["data"]]
        assert page["object"] == "list"
        assert 1 <= len(ids) <= 3
        assert page["first_id"] == ids[0]
        assert page["last_id"] == ids[-1]
        seen += ids
        if not page["has_more"]:
            break
        assert len(ids) == 3
        after = page["last_id"]
    assert seen == full
    assert pages == -(-len(full) // 3)
    # the SDK's auto-paging iterator follows the same cursor
    assert [x.id for x in oai.files.list(purpose="fine-tune", order=order, limit=2)] == full  # type: ignore[arg-type]


def test_list_after_last_item_is_empty(http: httpx.Client) -> None:
    full = http.get("/v1/files", params={"order": "asc"}).json()["data"]
    assert full
    page = http.get("/v1/files", params={"order": "asc", "after": full[-1]["id"]}).json()
    assert page == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


# --------------------------------------------------------------------------- retrieve / content / delete


def test_retrieve_matches_upload(oai: OpenAI) -> None:
    f = oai.files.create(file=("r.jsonl", b"retrieve me\n"), purpose="batch")
    assert oai.files.retrieve(f.id) == f


def test_retrieve_unknown_is_404(http: httpx.Client, oai: OpenAI) -> None:
    assert_envelope(http.get("/v1/files/file-doesnotexist"), 404)
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve("file-doesnotexist")


def test_content_exact_bytes_and_attachment_header(oai: OpenAI, http: httpx.Client) -> None:
    data = bytes(range(256)) * 4000 + b"\r\n\n tail without newline"  # > 1 MiB: several stream chunks
    f = oai.files.create(file=("data.bin", data), purpose="vision")
    assert f.bytes == len(data)
    resp = http.get(f"/v1/files/{f.id}/content")
    assert resp.status_code == 200
    assert resp.content == data
    assert int(resp.headers["content-length"]) == len(data)
    cd = resp.headers["content-disposition"]
    assert cd.startswith("attachment")
    assert 'filename="data.bin"' in cd
    assert oai.files.content(f.id).content == data


def test_delete_then_404_everywhere(oai: OpenAI, http: httpx.Client) -> None:
    f = oai.files.create(file=("d.jsonl", b"delete me\n"), purpose="batch")
    d = oai.files.delete(f.id)
    assert d.id == f.id and d.deleted is True and d.object == "file"
    assert http.get(f"/v1/files/{f.id}").status_code == 404
    assert_envelope(http.get(f"/v1/files/{f.id}"), 404)
    assert_envelope(http.get(f"/v1/files/{f.id}/content"), 404)
    assert_envelope(http.delete(f"/v1/files/{f.id}"), 404)
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        oai.files.content(f.id)
    assert f.id not in {x.id for x in oai.files.list()}


def test_delete_unknown_is_404(http: httpx.Client) -> None:
    assert_envelope(http.delete("/v1/files/file-nope"), 404)


# --------------------------------------------------------------------------- expires_after


@pytest.mark.parametrize("seconds", [3600, 86400, 2_592_000])
def test_expires_after_valid(http: httpx.Client, seconds: int) -> None:
    fields = {
        "purpose": "user_data",
        "expires_after[anchor]": "created_at",
        "expires_after[seconds]": str(seconds),
    }
    resp = post_file(http, fields=fields)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["expires_at"] == body["created_at"] + seconds


def test_expires_after_through_the_sdk(oai: OpenAI) -> None:
    f = oai.files.create(
        file=("e.jsonl", b"e\n"), purpose="batch", expires_after={"anchor": "created_at", "seconds": 7200}
    )
    assert f.expires_at == f.created_at + 7200


@pytest.mark.parametrize(
    ("anchor", "seconds"),
    [
        ("created_at", "3599"),
        ("created_at", "2592001"),
        ("created_at", "0"),
        ("created_at", "-3600"),
        ("created_at", "abc"),
        ("created_at", None),
        ("last_active_at", "3600"),
        ("", "3600"),
        (None, "3600"),
    ],
)
def test_expires_after_invalid_is_400(
    srv: Server, http: httpx.Client, anchor: str | None, seconds: str | None
) -> None:
    fields = {"purpose": "user_data"}
    if anchor is not None:
        fields["expires_after[anchor]"] = anchor
    if seconds is not None:
        fields["expires_after[seconds]"] = seconds
    before = files_under(srv.data_dir / "blobs")
    err = assert_envelope(post_file(http, fields=fields), 400)
    assert err["param"] is not None and err["param"].startswith("expires_after")
    assert err["type"] == "invalid_request_error"
    assert files_under(srv.data_dir / "blobs") == before


# --------------------------------------------------------------------------- bad uploads


def test_missing_purpose_is_400(http: httpx.Client) -> None:
    assert_envelope(post_file(http, fields={}), 400, param="purpose")


def test_missing_file_is_400(http: httpx.Client) -> None:
    assert_envelope(post_file(http, fields={"purpose": "batch"}, with_file=False), 400, param="file")


@pytest.mark.parametrize("purpose", ["nonsense", "batch_output", "BATCH", ""])
def test_invalid_purpose_is_400(srv: Server, http: httpx.Client, purpose: str) -> None:
    before = files_under(srv.data_dir / "blobs")
    assert_envelope(post_file(http, fields={"purpose": purpose}), 400, param="purpose")
    assert files_under(srv.data_dir / "blobs") == before


def test_invalid_purpose_through_the_sdk(oai: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        oai.files.create(file=("x.jsonl", b"x"), purpose="nonsense")  # type: ignore[arg-type]
    assert ei.value.status_code == 400
    assert ei.value.param == "purpose"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"purpose": "batch", "file": "abc"}'),
        ("application/x-www-form-urlencoded", b"purpose=batch&file=abc"),
        ("text/plain", b"hello"),
        (None, b"hello"),
        ("multipart/form-data", b"--x\r\n"),  # no boundary
        ("multipart/form-data; boundary=abc", b""),
        ("multipart/form-data; boundary=abc", b"garbage that is not multipart at all"),
        (
            "multipart/form-data; boundary=abc",
            b'--abc\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nba',
        ),
        ("multipart/form-data; boundary=abc", b"--abc\r\nno headers end here" + b"x" * 20000),
    ],
)
def test_non_multipart_or_broken_body_is_400(
    srv: Server, http: httpx.Client, content_type: str | None, body: bytes
) -> None:
    before = files_under(srv.data_dir / "blobs")
    headers = {"content-type": content_type} if content_type else {}
    resp = http.post("/v1/files", content=body, headers=headers)
    assert resp.status_code < 500, resp.text
    assert_envelope(resp, 400)
    assert files_under(srv.data_dir / "blobs") == before


# --------------------------------------------------------------------------- size cap


def test_too_large_batch_file_is_413_and_leaves_nothing(make_server: Callable[..., Server]) -> None:
    s = make_server("--max-batch-file-bytes", "100000", "--no-worker")
    data = (b"x" * 99 + b"\n") * 1500  # 150,000 bytes
    assert len(data) == 150_000
    with httpx.Client(base_url=s.root_url, timeout=30) as http:
        resp = http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("big.jsonl", data)})
        err = assert_envelope(resp, 413)
        assert err["type"] == "invalid_request_error"
        assert err["param"] == "file"
        leftovers = files_under(s.data_dir / "blobs") if (s.data_dir / "blobs").exists() else set()
        assert leftovers == set(), f"partial or temp files left behind: {leftovers}"
        assert http.get("/v1/files").json()["data"] == []

        # the SDK sees an APIStatusError with the envelope
        with pytest.raises(openai.APIStatusError) as ei:
            s.client().files.create(file=("big.jsonl", data), purpose="batch")
        assert ei.value.status_code == 413

        # exactly at the cap is fine; the cap is for purpose batch only
        ok = http.post("/v1/files", data={"purpose": "batch"}, files={"file": ("ok.jsonl", data[:100_000])})
        assert ok.status_code == 200, ok.text
        assert ok.json()["bytes"] == 100_000
        other = http.post("/v1/files", data={"purpose": "user_data"}, files={"file": ("big.bin", data)})
        assert other.status_code == 200, other.text
        names = {p.name for p in files_under(s.data_dir / "blobs")}
        assert names == {ok.json()["id"], other.json()["id"]}
