"""The label helpers of batchyard/metrics.py: what becomes a label is bounded and never carries a secret."""

from __future__ import annotations

import pytest

import batchyard.domain.lines as lines
import batchyard.metrics as metrics


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("http://127.0.0.1:8001/v1", "http://127.0.0.1:8001/v1"),
        ("https://user:sk-secret@api.example.com/v1", "https://api.example.com/v1"),
        ("https://sk-secret@api.example.com:8443/v1?api-key=sk-2#x", "https://api.example.com:8443/v1"),
        ("http://[::1]:9000/v1", "http://[::1]:9000/v1"),
        ("gpu-pool", "gpu-pool"),  # an [[upstreams]] name
        ("embedded", "embedded"),
    ],
)
def test_an_upstream_label_has_no_userinfo_query_or_fragment(name: str, label: str) -> None:
    assert metrics.upstream_label(name) == label


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (lines.error_line("c1", "request_timeout", "m"), "request_timeout"),
        (lines.error_line("c1", "shard_quarantined", "m"), "shard_quarantined"),
        (lines.error_line("c1", "made_up_code", "m"), "other"),
        (
            lines.response_line("c1", 400, "req_1", {"error": {"code": "anything_the_upstream_says"}}),
            "http_400",
        ),
        (lines.response_line("c1", 503, "req_1", {"error": None}), "http_503"),
        # a custom_id that spells out another line's members is an escaped string: it cannot be matched
        (
            lines.error_line('x","response":null,"error":{"code":"internal_error', "model_not_found", "m"),
            "model_not_found",
        ),
        (lines.response_line('y","response":{"status_code":200', 404, "r", {}), "http_404"),
        (b"not a line at all\n", "other"),
    ],
)
def test_an_error_lines_code_is_read_from_the_line_itself(line: bytes, code: str) -> None:
    assert metrics.line_error_code(line) == code


def test_a_stopped_line_is_counted_by_its_stop_code() -> None:
    line = lines.not_executed_line("c", "batch_expired")
    assert metrics.line_error_code(line, "batch_expired") == "batch_expired"
    assert metrics.line_error_code(line) == "batch_expired"
    assert metrics.OUTCOME_OF_CODE["batch_expired"] == "expired"
    assert metrics.OUTCOME_OF_CODE["batch_cancelled"] == "cancelled"


def test_the_upstream_error_status_is_one_of_three_words() -> None:
    assert [metrics.upstream_error_status(k) for k in ("timeout", "connect", "too_large", "x")] == [
        "timeout",
        "connect",
        "error",
        "error",
    ]
