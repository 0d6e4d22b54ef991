"""`batchyard run`: one-shot INPUT.jsonl -> OUTPUT.jsonl, including an interruption (kill -9) and resume."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.support.batches import chat_line, jsonl
from tests.support.fake_upstream import FakeUpstream, build_response

CMD = [sys.executable, "-m", "batchyard.cli.main", "run"]


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_run_writes_outputs_and_errors(tmp_path: Path, upstream: FakeUpstream) -> None:
    reqs = [chat_line(i) for i in range(30)] + [chat_line(99, x_fake={"status": 400})]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl(reqs))
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    r = subprocess.run(
        [*CMD, str(inp), "-o", str(out), "--errors", str(err), "--upstream", upstream.base_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 4, r.stderr  # completed, but a line failed
    assert "completed: 30 succeeded, 1 failed" in r.stderr
    assert "1 × 400 invalid_request_error: fake failure (status 400)" in r.stderr
    lines = _read(out)
    by_id = {x["custom_id"]: x for x in reqs}
    assert Counter(x["custom_id"] for x in lines) == Counter(f"req-{i}" for i in range(30))
    for line in lines:
        assert line["response"]["body"] == build_response(
            "/v1/chat/completions", by_id[line["custom_id"]]["body"]
        )
    errs = _read(err)
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errs] == [("req-99", 400)]
    assert not (tmp_path / "out.jsonl.batchyard").exists()  # state removed once done


def test_run_without_errors_flag_appends_error_lines(tmp_path: Path, upstream: FakeUpstream) -> None:
    reqs = [chat_line(0), chat_line(1, x_fake={"status": 404})]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl(reqs))
    out = tmp_path / "out.jsonl"
    r = subprocess.run(
        [*CMD, str(inp), "-o", str(out), "--upstream", upstream.base_url, "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 4, r.stderr
    lines = _read(out)
    assert [x["custom_id"] for x in lines] == ["req-0", "req-1"]
    assert lines[1]["response"]["status_code"] == 404


def test_run_validation_failure_exits_1_with_line_numbers(tmp_path: Path, upstream: FakeUpstream) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl([chat_line(0)]) + b"not json\n" + jsonl([chat_line(0)]))
    out = tmp_path / "out.jsonl"
    r = subprocess.run(
        [*CMD, str(inp), "-o", str(out), "--upstream", upstream.base_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "line 2: invalid_json_line" in r.stderr
    assert "line 3: duplicate_custom_id (custom_id)" in r.stderr
    assert not out.exists()
    assert not (tmp_path / "out.jsonl.batchyard").exists()  # nothing to resume: no state left behind


def test_run_interrupted_then_resumed_is_exactly_once(tmp_path: Path, upstream: FakeUpstream) -> None:
    reqs = [chat_line(i, x_fake={"delay": 0.05}) for i in range(300)]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl(reqs))
    out = tmp_path / "out.jsonl"
    args = [
        *CMD,
        str(inp),
        "-o",
        str(out),
        "--upstream",
        upstream.base_url,
        "--concurrency",
        "4",
        "--shard-lines",
        "20",
    ]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while upstream.stats()["total"] < 100 and time.monotonic() < deadline:
        time.sleep(0.02)
    first.kill()
    first.wait()
    sent_before = upstream.stats()["total"]
    assert 0 < sent_before < 300
    assert not out.exists() and (tmp_path / "out.jsonl.batchyard").is_dir()
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr
    lines = _read(out)
    assert Counter(x["custom_id"] for x in lines) == Counter(x["custom_id"] for x in reqs)
    # Work committed before the kill was not redone: at most the shards in flight (4 shards x 20 lines) again.
    assert upstream.stats()["total"] <= 300 + 4 * 20


def run(tmp_path: Path, *args: str, lines: int = 20, **fake: Any) -> subprocess.CompletedProcess[str]:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(jsonl([chat_line(i, **fake) for i in range(lines)]))
    return subprocess.run(
        [*CMD, str(inp), "-o", str(tmp_path / "out.jsonl"), "-q", "--max-retries", "0", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_every_line_refused_exits_4_with_the_code_and_the_key_hint(tmp_path: Path) -> None:
    with FakeUpstream(api_key="sk-upstream") as up:
        r = run(tmp_path, "--upstream", up.base_url, lines=50)
        assert r.returncode == 4, r.stderr
        assert "completed: 0 succeeded, 50 failed" in r.stderr
        assert "50 × 401 invalid_api_key: Incorrect API key provided." in r.stderr
        assert "hint: the upstream refused the key: pass it with --upstream-api-key" in r.stderr
        ok = run(tmp_path, "--upstream", up.base_url, "--upstream-api-key", "sk-upstream", lines=50)
        assert ok.returncode == 0, ok.stderr
        assert "completed: 50 succeeded, 0 failed" in ok.stderr and "top error codes" not in ok.stderr


def test_an_upstream_url_without_v1_gets_the_404_hint(tmp_path: Path, upstream: FakeUpstream) -> None:
    r = run(tmp_path, "--upstream", upstream.root_url)
    assert r.returncode == 4, r.stderr
    assert "20 × 404" in r.stderr and "hint: does the --upstream URL end in /v1?" in r.stderr


def test_an_unrouted_model_gets_the_routes_hint(tmp_path: Path, upstream: FakeUpstream) -> None:
    r = run(tmp_path, "--upstream", f"other-*={upstream.base_url}", lines=3)
    assert r.returncode == 1, r.stderr  # validation sees it: no line is sent
    assert "line 3: model_not_found (body.model)" in r.stderr
    assert (
        r.stderr.count(
            "hint (model_not_found): no upstream serves this model: check the --upstream MODEL=URL"
        )
        == 1
    )
    assert not (tmp_path / "out.jsonl.batchyard").exists()


def test_timeouts_get_the_attempt_timeout_hint(tmp_path: Path, upstream: FakeUpstream) -> None:
    r = run(
        tmp_path, "--upstream", upstream.base_url, "--attempt-timeout", "0.2", lines=2, x_fake={"delay": 2}
    )
    assert r.returncode == 4, r.stderr
    assert "2 × request_timeout" in r.stderr and "raise --attempt-timeout" in r.stderr
