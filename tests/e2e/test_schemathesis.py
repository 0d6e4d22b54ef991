"""schemathesis against the live server's `/openapi.json` (issue 9): bad input never causes a 500.

Every operation of the served spec gets a bounded number of generated requests, schema-valid (positive) and
schema-violating (negative), sent with a valid key to a real `batchyard serve`, on SQLite and on PostgreSQL. The run
records every answer with status >= 500 and every error answer whose body is not OpenAI's
`{"error": {"message", "type", "param", "code"}}` envelope, and asserts there are none.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Err

from tests.conftest import Server
from tests.support.fake_upstream import FakeUpstream

KEY: Final = "sk-schemathesis"
EXAMPLES: Final = 25  # per operation and mode: 16 operations x 2 modes x 25 ~ 800 requests, ~15 s
RUN = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def up() -> Iterator[FakeUpstream]:
    with FakeUpstream() as u:
        yield u


def _server(tmp: Path, up: FakeUpstream, *args: str) -> Server:
    return Server(
        tmp / "data", ["--upstream", up.base_url, "--api-key", KEY, "--shard-lines", "10", *args]
    ).start()


def _envelope_problem(resp: Any) -> str | None:
    try:
        body = json.loads(resp.content)
    except ValueError:
        return "not JSON"
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return "not {'error': {...}}"
    err = body["error"]
    if set(err) != {"message", "type", "param", "code"}:
        return f"error keys {sorted(err)}"
    if not isinstance(err["message"], str) or not err["message"] or not isinstance(err["type"], str):
        return "message/type not non-empty strings"
    return None


def _check(srv: Server, op: Any, mode: GenerationMode, problems: list[str]) -> None:
    """Send EXAMPLES generated requests of one operation in one mode; append what is wrong to `problems`."""
    headers = {"Authorization": f"Bearer {KEY}"}

    @RUN
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        resp = case.call(base_url=srv.root_url, headers=headers, timeout=30)
        where = f"{op.method.upper()} {case.formatted_path} ({mode.value})"
        if resp.status_code >= 500:
            problems.append(f"{where}: {resp.status_code} {resp.text[:300]!r}")
        elif resp.status_code >= 400 and op.path != "/health":
            problem = _envelope_problem(resp)
            if problem is not None:
                problems.append(f"{where}: {resp.status_code} {problem}: {resp.text[:300]!r}")

    try:
        run()
    except Unsatisfiable:
        # nothing to violate (an operation without parameters or body has no negative cases)
        assert mode is GenerationMode.NEGATIVE, op.label


# the NUL characters that PostgreSQL refuses in text (issue 9, item 6), one per endpoint
NUL_PROBES: Final[list[tuple[str, str, dict[str, Any] | None]]] = [
    ("GET", "/v1/files/file-%00", None),
    ("GET", "/v1/files?after=file-%00", None),
    ("GET", "/v1/files?purpose=%00", None),
    ("GET", "/v1/files/file-%00/content", None),
    ("DELETE", "/v1/files/file-%00", None),
    ("GET", "/v1/batches/batch_%00", None),
    ("GET", "/v1/batches?after=batch_%00", None),
    ("POST", "/v1/batches/batch_%00/cancel", None),
    (
        "POST",
        "/v1/batches",
        {"input_file_id": "file-\x00", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    ),
    ("POST", "/v1/uploads", {"filename": "a.jsonl", "purpose": "batch", "bytes": 1, "mime_type": "\x00"}),
    ("POST", "/v1/uploads/upload_%00/complete", {"part_ids": []}),
    ("POST", "/v1/uploads/upload_%00/cancel", None),
]


def probe_nul(srv: Server) -> list[str]:
    problems = []
    with httpx.Client(base_url=srv.root_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        for method, path, body in NUL_PROBES:
            try:
                resp = c.request(method, path, json=body)
            except httpx.TransportError as e:  # e.g. a 200 head, then the connection dropped
                problems.append(f"{method} {path}: {e!r}")
                continue
            if resp.status_code >= 500 or (resp.status_code >= 400 and _envelope_problem(resp) is not None):
                problems.append(f"{method} {path}: {resp.status_code} {resp.text[:200]!r}")
    return problems


def fuzz(srv: Server) -> list[str]:
    """Run every operation in both modes; the list of problems found (empty when the server is sound)."""
    problems = probe_nul(srv)
    schema = schemathesis.openapi.from_url(srv.root_url + "/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):  # an operation the schema does not describe well enough to test
            raise result.err()
        operations.append(result.ok())
    assert len(operations) >= 16, [op.label for op in operations]
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _check(srv, op, mode, problems)
    assert httpx.get(srv.root_url + "/health", timeout=5).status_code == 200
    return problems


@pytest.mark.slow
def test_no_5xx_and_openai_errors_on_sqlite(tmp_path: Path, up: FakeUpstream) -> None:
    srv = _server(tmp_path, up)
    try:
        problems = fuzz(srv)
    finally:
        srv.stop()
    assert not problems, "\n".join(problems[:40])


@pytest.mark.slow
def test_no_5xx_and_openai_errors_on_postgres(
    tmp_path: Path, up: FakeUpstream, request: pytest.FixtureRequest
) -> None:
    cluster = request.getfixturevalue("pg_cluster")
    dsn = asyncio.run(cluster.create_database())
    srv = _server(tmp_path, up, "--database-url", dsn)
    try:
        problems = fuzz(srv)
    finally:
        srv.stop()
    assert not problems, "\n".join(problems[:40])
