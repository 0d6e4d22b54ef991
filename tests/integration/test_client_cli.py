"""The client commands (`submit`, `batches`, `files`) as a user runs them: real `batchyard` subprocesses against a
real `serve` subprocess and the fake upstream, OPENAI_BASE_URL / OPENAI_API_KEY from the environment, every exit
code a script reads."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server
from tests.support.batches import chat_line, jsonl, wait_for
from tests.support.fake_upstream import FakeUpstream, build_response
from tests.support.processes import ROOT, free_port

CMD = [sys.executable, "-m", "batchyard.cli.main"]


def by(server: Server | None, *args: str, key: str = "sk-test", timeout: float = 60, **env: str) -> Any:
    """`batchyard ARGS` with OPENAI_BASE_URL / OPENAI_API_KEY pointing at `server` (unset when None)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "BATCHYARD_"))}
    if server is not None:
        e.update(OPENAI_BASE_URL=server.base_url, OPENAI_API_KEY=key)
    e.update(env)
    return subprocess.run(
        [*CMD, *args], capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT, check=False
    )


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def write_input(tmp_path: Path, reqs: list[dict[str, Any]] | bytes, name: str = "in.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(reqs if isinstance(reqs, bytes) else jsonl(reqs))
    return path


def assert_no_traceback(r: Any) -> None:
    assert "Traceback" not in r.stderr, r.stderr


# -- submit ---------------------------------------------------------------------------------------------------


def test_submit_wait_completed_exits_0_with_outputs(tmp_path: Path, server: Server) -> None:
    reqs = [chat_line(i) for i in range(25)]
    inp = write_input(tmp_path, reqs)
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    r = by(
        server, "submit", str(inp), "--endpoint", "/v1/chat/completions", "--metadata", "team=search",
        "--metadata", "run=7", "--wait", "-o", str(out), "--errors", str(err), "--poll-interval", "0.1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    batch_id = r.stdout.split()[0]
    assert batch_id.startswith("batch_")
    assert f"batchyard: {server.base_url}" in r.stderr  # the base URL used, on stderr
    assert f"{batch_id} completed: 25 succeeded, 0 failed" in r.stderr
    assert "25/25" in r.stderr  # the progress bar's last state (stderr is no terminal here)
    body_of = {x["custom_id"]: x["body"] for x in reqs}
    got = lines_of(out)
    assert sorted(x["custom_id"] for x in got) == sorted(body_of)
    for line in got:
        assert line["response"]["body"] == build_response("/v1/chat/completions", body_of[line["custom_id"]])
    assert err.read_bytes() == b""

    got_json = by(server, "batches", "get", batch_id, "--json")
    assert got_json.returncode == 0, got_json.stderr
    b = json.loads(got_json.stdout)
    assert (b["id"], b["status"], b["metadata"]) == (batch_id, "completed", {"team": "search", "run": "7"})
    counts = b["request_counts"]
    assert {k: counts[k] for k in ("completed", "failed", "total")} == {
        "completed": 25,
        "failed": 0,
        "total": 25,
    }


def test_submit_takes_the_endpoint_from_the_first_line_and_returns_at_once(
    tmp_path: Path, server: Server
) -> None:
    inp = write_input(tmp_path, [chat_line(i) for i in range(3)])
    r = by(server, "submit", str(inp), "--json")
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)
    assert b["endpoint"] == "/v1/chat/completions" and b["status"] in (
        "validating",
        "in_progress",
        "completed",
    )
    assert b["completion_window"] == "24h"


def test_submit_some_lines_failed_exits_4(tmp_path: Path, server: Server) -> None:
    reqs = [chat_line(i) for i in range(10)] + [chat_line(100 + i, x_fake={"status": 400}) for i in range(3)]
    out = tmp_path / "out.jsonl"
    r = by(server, "submit", str(write_input(tmp_path, reqs)), "-o", str(out), "--poll-interval", "0.1")
    assert r.returncode == 4, r.stderr
    assert "completed: 10 succeeded, 3 failed" in r.stderr
    got = lines_of(out)  # no --errors: the error lines come after the output lines
    assert [x["response"]["status_code"] for x in got] == [200] * 10 + [400] * 3
    assert {x["custom_id"] for x in got[10:]} == {"req-100", "req-101", "req-102"}


def test_submit_failed_validation_exits_3_with_line_numbers(tmp_path: Path, server: Server) -> None:
    data = jsonl([chat_line(0)]) + b"not json\n" + jsonl([chat_line(0)])
    r = by(server, "submit", str(write_input(tmp_path, data)), "--wait", "--poll-interval", "0.1")
    assert r.returncode == 3, r.stderr
    assert " failed: 0 succeeded, 0 failed" in r.stderr
    assert "line 2: invalid_json_line" in r.stderr
    assert "line 3: duplicate_custom_id (custom_id)" in r.stderr


def test_expired_batch_exits_3(
    tmp_path: Path, make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server(
        "--upstream", upstream.base_url, "--concurrency", "1", "--lease-seconds", "1", "--cancel-grace", "1"
    )
    reqs = [chat_line(i, x_fake={"delay": 0.5}) for i in range(20)]
    out = tmp_path / "out.jsonl"
    r = by(srv, "submit", str(write_input(tmp_path, reqs)), "--window", "2s", "-o", str(out), "-q",
           "--poll-interval", "0.2")  # fmt: skip
    assert r.returncode == 3, r.stderr
    assert " expired: " in r.stderr
    got = lines_of(out)
    assert len(got) == 20
    assert any(x["error"] and x["error"]["code"] == "batch_expired" for x in got)


def test_cancel_then_get_wait_and_download_exit_3(
    tmp_path: Path, make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server("--upstream", upstream.base_url, "--concurrency", "2", "--cancel-grace", "1")
    reqs = [chat_line(i, x_fake={"delay": 0.3}) for i in range(60)]
    r = by(srv, "submit", str(write_input(tmp_path, reqs)))
    assert r.returncode == 0, r.stderr
    batch_id = r.stdout.strip()
    wait_for(srv.client(), batch_id, {"in_progress"})

    c = by(srv, "batches", "cancel", batch_id)
    assert c.returncode == 0, c.stderr
    assert c.stdout.startswith(f"{batch_id}  cancelling") or c.stdout.startswith(f"{batch_id}  cancelled")

    g = by(srv, "batches", "get", batch_id, "--wait", "--poll-interval", "0.1")
    assert g.returncode == 3, g.stderr
    assert g.stdout.startswith(f"{batch_id}  cancelled")

    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    d = by(srv, "batches", "download", batch_id, "-o", str(out), "--errors", str(err))
    assert d.returncode == 3, d.stderr
    done, failed = lines_of(out), lines_of(err)
    assert len(done) + len(failed) == 60
    assert any(x["error"] and x["error"]["code"] == "batch_cancelled" for x in failed)


def test_batches_download_to_stdout_and_list(tmp_path: Path, server: Server) -> None:
    client = server.client()
    reqs = [chat_line(0), chat_line(1, x_fake={"status": 422})]
    ids = []
    for n in range(3):
        r = by(server, "submit", str(write_input(tmp_path, reqs, f"in{n}.jsonl")), "--wait", "-q")
        assert r.returncode == 4, r.stderr
        assert (
            "error lines: batchyard files download file-" in r.stderr
        )  # nothing was written: where they are
        ids.append(r.stdout.strip())

    d = by(server, "batches", "download", ids[0])
    assert d.returncode == 4, d.stderr
    got = [json.loads(x) for x in d.stdout.splitlines()]
    assert [(x["custom_id"], x["response"]["status_code"]) for x in got] == [("req-0", 200), ("req-1", 422)]

    listed = by(server, "batches", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    page = json.loads(listed.stdout)
    assert [b["id"] for b in page["data"]] == ids[::-1] and page["has_more"] is False

    first = by(server, "batches", "list", "--limit", "2")
    assert first.returncode == 0
    assert [ln.split()[0] for ln in first.stdout.splitlines()] == ids[:0:-1]
    assert f"--after {ids[1]}" in first.stderr
    every = by(server, "batches", "list", "--limit", "1", "--all")
    assert [ln.split()[0] for ln in every.stdout.splitlines()] == ids[::-1]
    assert client.batches.retrieve(ids[0]).status == "completed"


def test_download_of_an_unfinished_batch_is_an_error(
    tmp_path: Path, make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server("--upstream", upstream.base_url, "--concurrency", "1")
    r = by(srv, "submit", str(write_input(tmp_path, [chat_line(i, x_fake={"delay": 1}) for i in range(5)])))
    d = by(srv, "batches", "download", r.stdout.strip())
    assert d.returncode == 1
    assert "no results yet" in d.stderr


def test_progress_bar_with_eta_on_a_terminal(
    tmp_path: Path, make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server("--upstream", upstream.base_url, "--concurrency", "2")
    inp = write_input(tmp_path, [chat_line(i, x_fake={"delay": 0.1}) for i in range(40)])
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(OPENAI_BASE_URL=srv.base_url, OPENAI_API_KEY="k", COLUMNS="150", TERM="xterm")
    proc = subprocess.Popen(
        [*CMD, "submit", str(inp), "--wait", "--poll-interval", "0.1"],
        stdout=subprocess.PIPE,
        stderr=slave,
        env=env,
        cwd=ROOT,
    )
    os.close(slave)
    seen = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert proc.wait(60) == 0
    reader.join(10)
    os.close(master)
    text = seen.decode(errors="replace")
    assert "ETA" in text and "40/40" in text
    assert text.count("\r") + text.count("\x1b[") > 3  # redrawn in place while it ran


# -- errors and exit codes ------------------------------------------------------------------------------------


def test_api_error_prints_openai_message_and_code_exits_1(tmp_path: Path, server: Server) -> None:
    r = by(server, "batches", "get", "batch_doesnotexist")
    assert r.returncode == 1
    assert_no_traceback(r)
    assert "error: No batch found with id 'batch_doesnotexist'. (HTTP 404, code batch_not_found)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 2  # the base URL, then the error


def test_wrong_key_exits_1_with_the_servers_message(
    tmp_path: Path, make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server("--upstream", upstream.base_url, "--api-key", "sk-right")
    r = by(srv, "files", "list", key="sk-wrong")
    assert r.returncode == 1
    assert_no_traceback(r)
    assert "HTTP 401" in r.stderr and "code invalid_api_key" in r.stderr
    ok = by(srv, "files", "list", key="sk-right")
    assert ok.returncode == 0, ok.stderr
    flag = by(srv, "files", "list", "--api-key", "sk-right", key="sk-wrong")  # the flag beats the variable
    assert flag.returncode == 0, flag.stderr


def test_unreachable_server_exits_1(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    r = by(None, "batches", "list", "--base-url", url, OPENAI_API_KEY="k")
    assert r.returncode == 1
    assert_no_traceback(r)
    assert f"cannot reach {url}" in r.stderr


def test_base_url_flag_beats_the_environment(tmp_path: Path, server: Server) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    r = by(None, "files", "list", "--base-url", server.base_url, OPENAI_BASE_URL=dead, OPENAI_API_KEY="k")
    assert r.returncode == 0, r.stderr
    r = by(None, "files", "list", OPENAI_BASE_URL=dead, OPENAI_API_KEY="k")
    assert r.returncode == 1 and f"cannot reach {dead}" in r.stderr


def test_usage_errors_exit_2(tmp_path: Path, server: Server) -> None:
    inp = write_input(tmp_path, [chat_line(0)])
    r = by(server, "submit", str(inp), "--metadata", "novalue")
    assert r.returncode == 2 and "'novalue' is not KEY=VALUE" in r.stderr
    no_url = write_input(tmp_path, b'{"custom_id": "a"}\n', "nourl.jsonl")
    r = by(server, "submit", str(no_url))
    assert r.returncode == 2 and "give --endpoint" in r.stderr
    assert by(server, "batches", "frobnicate").returncode == 2


def test_help_documents_defaults_and_exit_codes() -> None:
    r = by(None, "submit", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "env var: OPENAI_BASE_URL; default: http://127.0.0.1:8000/v1" in text
    assert "env var: OPENAI_API_KEY" in text
    for line in ("0 completed, no line failed", "3 the batch ended failed, expired or cancelled",
                 "4 completed, but some lines failed"):  # fmt: skip
        assert line in text


# -- files ----------------------------------------------------------------------------------------------------


def test_files_upload_list_download_delete(tmp_path: Path, server: Server) -> None:
    data = jsonl([chat_line(i) for i in range(4)])
    path = write_input(tmp_path, data, "mine.jsonl")
    up = by(server, "files", "upload", str(path))
    assert up.returncode == 0, up.stderr
    file_id = up.stdout.strip()
    up2 = json.loads(by(server, "files", "upload", str(path), "--purpose", "batch", "--json").stdout)
    assert (up2["filename"], up2["bytes"], up2["purpose"]) == ("mine.jsonl", len(data), "batch")

    listed = by(server, "files", "list", "--json")
    assert {f["id"] for f in json.loads(listed.stdout)["data"]} == {file_id, up2["id"]}
    text = by(server, "files", "list", "--purpose", "batch").stdout
    assert file_id in text and "mine.jsonl" in text
    assert by(server, "files", "list", "--purpose", "batch_output", "--json").stdout.count('"id"') == 0

    dest = tmp_path / "copy.jsonl"
    assert by(server, "files", "download", file_id, "-o", str(dest)).returncode == 0
    assert dest.read_bytes() == data
    assert by(server, "files", "download", file_id).stdout.encode() == data

    gone = by(server, "files", "delete", file_id)
    assert gone.returncode == 0 and gone.stdout.strip() == f"deleted {file_id}"
    again = by(server, "files", "download", file_id, "-o", str(tmp_path / "x"))
    assert again.returncode == 1 and "HTTP 404" in again.stderr
    assert not (tmp_path / "x").exists()
    deleted = json.loads(by(server, "files", "delete", up2["id"], "--json").stdout)
    assert deleted == {"id": up2["id"], "object": "file", "deleted": True}


@pytest.mark.parametrize("command", [["batches", "list"], ["files", "list"]])
def test_list_commands_work_with_the_key_from_the_environment_only(
    command: list[str], make_server: Callable[..., Server], upstream: FakeUpstream
) -> None:
    srv = make_server("--upstream", upstream.base_url, "--api-key", "sk-env")
    r = by(srv, *command, "--json", key="sk-env")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["data"] == []
