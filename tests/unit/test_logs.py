"""logs.py: what a log may show of a URL, and the two line formats."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from batchyard import logs
from batchyard.config import Settings


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://u:pw@gpu-1:8000/v1", "http://gpu-1:8000/v1"),
        ("https://KEY@api.example.com/v1", "https://api.example.com/v1"),
        ("https://api.example.com/v1?api-key=k", "https://api.example.com/v1?..."),
        ("http://[::1]:9/v1", "http://[::1]:9/v1"),
        ("http://host:notaport/v1", "<a URL that does not parse>"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert logs.redact_url(url) == shown


def test_a_postgres_url_shows_user_host_and_database_only() -> None:
    s = Settings(database_url="postgresql://app:pw-123@db.internal:6432/jobs?sslmode=require&password=pw-456")
    assert logs.describe_store(s) == "PostgreSQL app@db.internal:6432/jobs"
    s = Settings(database_url="postgresql:///jobs?host=/run/postgresql&password=pw")
    assert logs.describe_store(s) == "PostgreSQL the local socket/jobs"


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("batchyard.x", logging.WARNING, __file__, 1, msg, args, None)
    r.__dict__.update(extra)
    return r


def test_json_lines_carry_the_request_id_and_the_access_fields() -> None:
    token = logs.request_id.set("req_" + "0" * 32)
    try:
        line = logs.JSONFormatter().format(record("a %s\nb", "x", status=200, duration_ms=1.5))
    finally:
        logs.request_id.reset(token)
    assert "\n" not in line
    out = json.loads(line)
    assert out["msg"] == "a x\nb" and out["level"] == "WARNING" and out["logger"] == "batchyard.x"
    assert out["request_id"] == "req_" + "0" * 32 and out["status"] == 200 and out["duration_ms"] == 1.5
    assert "method" not in out


def test_json_lines_keep_the_traceback_in_one_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        r = logging.LogRecord("b", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    out = json.loads(logs.JSONFormatter().format(r))
    assert "ValueError: boom" in out["exc"] and out["msg"] == "failed"


def test_text_lines_name_the_request_they_were_logged_for() -> None:
    fmt = logs.TextFormatter()
    assert fmt.format(record("plain")).endswith("WARNING batchyard.x: plain")
    token = logs.request_id.set("req_1")
    try:
        assert fmt.format(record("in a request")).endswith("batchyard.x: in a request [req_1]")
    finally:
        logs.request_id.reset(token)
