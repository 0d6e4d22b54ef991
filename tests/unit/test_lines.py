"""Output and error line builders, and usage extraction from upstream bodies."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
import pytest

from batchyard.domain import wire
from batchyard.domain.lines import (
    NOT_EXECUTED_MESSAGES,
    error_line,
    extract_usage,
    not_executed_line,
    response_line,
)
from batchyard.domain.models import Usage

LINE_ID = re.compile(r"^batch_req_[0-9a-f]{24}$")


def parse(line: bytes) -> dict[str, Any]:
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1, "a result line is exactly one JSONL line"
    obj = json.loads(line)
    assert isinstance(obj, dict)
    return obj


# -- response_line --------------------------------------------------------------------------------------------


def test_response_line_shape() -> None:
    body = {"id": "chatcmpl-1", "choices": [{"message": {"content": "hi"}}]}
    obj = parse(response_line("req-1", 200, "req_abc", body))
    assert list(obj) == ["id", "custom_id", "response", "error"]
    assert LINE_ID.match(obj["id"])
    assert obj["custom_id"] == "req-1"
    assert obj["response"] == {"status_code": 200, "request_id": "req_abc", "body": body}
    assert obj["error"] is None


def test_response_line_ids_are_unique() -> None:
    ids = {parse(response_line("c", 200, "r", {}))["id"] for _ in range(50)}
    assert len(ids) == 50


def test_raw_body_is_spliced_verbatim() -> None:
    raw = b'{"b": 1.50, "a":"\\u00e9",   "z": [1,2]}'
    line = response_line("req-1", 200, "r", json.loads(raw), raw)
    assert b',"body":' + raw + b'},"error":null}\n' in line
    assert parse(line)["response"]["body"] == {"b": 1.5, "a": "é", "z": [1, 2]}


def test_raw_body_surrounding_whitespace_is_stripped() -> None:
    raw = b'  {"a": 1}  '
    line = response_line("req-1", 200, "r", {"a": 1}, raw)
    assert b'"body":{"a": 1}}' in line
    assert parse(line)["response"]["body"] == {"a": 1}


@pytest.mark.parametrize("raw", [b'{"a":\n1}', b'{"a": 1}\n', b'{"a":\r\n 1}', b'{\r"a": 1}'])
def test_raw_body_with_newlines_stays_on_one_line_without_reserializing(raw: bytes) -> None:
    line = response_line("req-1", 200, "r", {"a": 1}, raw)
    assert line.count(b"\n") == 1 and line.endswith(b"\n") and b"\r" not in line
    assert parse(line)["response"]["body"] == {"a": 1}


def test_a_body_deeper_than_any_json_writer_allows_is_spliced_not_reserialized() -> None:
    raw = b"[" * 900 + b"]" * 900  # orjson reads 1024 levels but writes 254
    body = {"deep": orjson.loads(raw)}
    raw_body = b'{"deep":\n' + raw + b"}"
    line = response_line("req-1", 200, "r", body, raw_body)
    assert line.count(b"\n") == 1 and raw in line


def test_a_huge_request_id_and_absurd_usage_are_bounded() -> None:
    line = response_line("req-1", 200, "r" * 100_000, {"a": 1}, b'{"a":1}')
    assert len(parse(line)["response"]["request_id"]) == 256
    u = extract_usage({"usage": {"prompt_tokens": 2**64 - 1, "completion_tokens": -5, "total_tokens": 1}})
    assert (u.input_tokens, u.output_tokens) == (0, 0)


def test_custom_id_and_request_id_are_escaped() -> None:
    cid = 'quote " back \\ newline \n tab \t é'
    obj = parse(response_line(cid, 200, 'rid"\n', {}))
    assert obj["custom_id"] == cid
    assert obj["response"]["request_id"] == 'rid"\n'


def test_error_status_response_line() -> None:
    body = {"error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}}
    obj = parse(response_line("req-9", 400, "", body))
    assert obj["response"] == {"status_code": 400, "request_id": "", "body": body}
    assert obj["error"] is None


# -- error_line / not_executed_line ---------------------------------------------------------------------------


def test_error_line_shape() -> None:
    obj = parse(error_line("req-2", "upstream_connect", "connection refused"))
    assert list(obj) == ["id", "custom_id", "response", "error"]
    assert LINE_ID.match(obj["id"])
    assert obj["custom_id"] == "req-2"
    assert obj["response"] is None
    assert obj["error"] == {"code": "upstream_connect", "message": "connection refused"}


def test_error_line_escapes_message() -> None:
    obj = parse(error_line("x\ny", "c", 'multi\nline "message"'))
    assert obj["custom_id"] == "x\ny"
    assert obj["error"]["message"] == 'multi\nline "message"'


@pytest.mark.parametrize("code", ["batch_expired", "batch_cancelled"])
def test_not_executed_line(code: str) -> None:
    obj = parse(not_executed_line("req-3", code))
    assert obj["response"] is None
    assert obj["error"] == {"code": code, "message": NOT_EXECUTED_MESSAGES[code]}


def test_not_executed_messages() -> None:
    assert "expired" in NOT_EXECUTED_MESSAGES["batch_expired"]
    assert "cancelled" in NOT_EXECUTED_MESSAGES["batch_cancelled"]


def test_not_executed_line_rejects_unknown_codes() -> None:
    with pytest.raises(KeyError):
        not_executed_line("req-4", "something_else")


# -- extract_usage --------------------------------------------------------------------------------------------


def test_chat_usage() -> None:
    body = {
        "usage": {
            "prompt_tokens": 11,
            "completion_tokens": 7,
            "total_tokens": 18,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 3},
        }
    }
    assert extract_usage(body) == Usage(input_tokens=11, cached_tokens=4, output_tokens=7, reasoning_tokens=3)


def test_responses_usage() -> None:
    body = {
        "usage": {
            "input_tokens": 20,
            "input_tokens_details": {"cached_tokens": 5},
            "output_tokens": 9,
            "output_tokens_details": {"reasoning_tokens": 6},
            "total_tokens": 29,
        }
    }
    assert extract_usage(body) == Usage(input_tokens=20, cached_tokens=5, output_tokens=9, reasoning_tokens=6)


def test_responses_style_details_are_not_read_from_chat_keys() -> None:
    body = {"usage": {"input_tokens": 2, "output_tokens": 1, "prompt_tokens_details": {"cached_tokens": 9}}}
    assert extract_usage(body) == Usage(input_tokens=2, output_tokens=1)


def test_embeddings_usage() -> None:
    assert extract_usage({"usage": {"prompt_tokens": 8, "total_tokens": 8}}) == Usage(input_tokens=8)


def test_chat_usage_without_details() -> None:
    body = {"usage": {"prompt_tokens": 3, "completion_tokens": 2, "prompt_tokens_details": None}}
    assert extract_usage(body) == Usage(input_tokens=3, output_tokens=2)


@pytest.mark.parametrize(
    "body",
    [None, [], "text", 5, {}, {"usage": None}, {"usage": []}, {"usage": "lots"}, {"choices": []}],
)
def test_no_usage_is_zero(body: object) -> None:
    assert extract_usage(body) == Usage()


def test_non_integer_counts_are_zero() -> None:
    body = {
        "usage": {
            "prompt_tokens": "11",
            "completion_tokens": True,
            "prompt_tokens_details": {"cached_tokens": 1.5},
            "completion_tokens_details": {"reasoning_tokens": None},
        }
    }
    assert extract_usage(body) == Usage()


def test_usage_adds_up() -> None:
    total = Usage()
    total.add(extract_usage({"usage": {"prompt_tokens": 1, "completion_tokens": 2}}))
    total.add(extract_usage({"usage": {"input_tokens": 10, "output_tokens": 20}}))
    assert total == Usage(input_tokens=11, output_tokens=22)
    assert total.to_wire()["total_tokens"] == 33


@pytest.mark.parametrize(
    ("raw", "run"),
    [
        (b'{"seed": 123456789012345678901}', True),
        (b'{"seed": -99999999999999999999, "n": 1}', True),
        (b'{"a": "12345678901234567890"}', True),  # in a string: a run all the same (read exactly: harmless)
        (b'{"a": 1234567890, "b": 1234567890, "c": 1234567890}', False),  # 30 digits, no run of 20
        (b'{"a": 1234567890123456789}', False),  # 19 digits: orjson reads it exactly
        (b'{"a": 1}', False),
    ],
)
def test_a_run_of_20_digits_is_found_whatever_else_the_line_holds(raw: bytes, run: bool) -> None:
    assert wire.has_long_digit_run(raw) is run
    assert wire.loads(raw) == json.loads(raw)  # exact either way
