"""Unit tests of the streaming batch-file validator and shard planner."""

from __future__ import annotations

import itertools
import json
from typing import Any

import orjson
import pytest

from batchyard.domain.validation import (
    BatchValidator,
    LineError,
    ShardPlan,
    ValidationResult,
    iter_lines,
)

CHAT = "/v1/chat/completions"
MODELS = {"gpt-4o-mini", "llama-3"}
DUPLICATE_MESSAGE = (
    "The custom_id for this request is a duplicate of another request. "
    "The custom_id parameter must be unique for each individual request in a batch."
)


def routable(model: str) -> bool:
    return model in MODELS


def req(custom_id: str = "r1", endpoint: str = CHAT, **body: Any) -> dict[str, Any]:
    if not body:
        body = default_body(endpoint)
    return {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body}


def default_body(endpoint: str) -> dict[str, Any]:
    field = {
        CHAT: ("messages", [{"role": "user", "content": "hi"}]),
        "/v1/embeddings": ("input", "hello"),
        "/v1/completions": ("prompt", "hello"),
        "/v1/responses": ("input", "hello"),
        "/v1/moderations": ("input", "hello"),
    }[endpoint]
    return {"model": "gpt-4o-mini", field[0]: field[1]}


def line(obj: Any) -> bytes:
    return orjson.dumps(obj) + b"\n"


def jsonl(*objs: Any) -> bytes:
    return b"".join(line(o) for o in objs)


def validate(data: bytes, endpoint: str = CHAT, **kwargs: Any) -> ValidationResult:
    v = BatchValidator(endpoint, routable, **kwargs)
    v.feed(data)
    return v.finish()


def codes(res: ValidationResult) -> list[tuple[str, str | None, int | None]]:
    return [(e.code, e.param, e.line) for e in res.errors]


def check_shards(data: bytes, res: ValidationResult) -> None:
    """Shards re-read with iter_lines give back every request line once, in order, with its number."""
    expected = list(iter_lines(data, 1))
    got: list[tuple[int, bytes]] = []
    prev_end = 0
    for i, s in enumerate(res.shards):
        assert s.index == i
        assert prev_end <= s.start < s.end <= len(data)
        shard_lines = list(iter_lines(data[s.start : s.end], s.first_line))
        assert len(shard_lines) == s.line_count
        assert shard_lines[0][0] == s.first_line  # the range starts on a request line
        assert data[s.start : s.end].endswith(b"\n") or s.end == len(data)
        got.extend(shard_lines)
        prev_end = s.end
    assert got == expected
    assert sum(s.line_count for s in res.shards) == res.total_lines


# --------------------------------------------------------------------------------------------------- valid


def test_valid_file() -> None:
    data = jsonl(req("a"), req("b"), req("c"))
    res = validate(data)
    assert res.ok
    assert res.errors == []
    assert res.error_count == 0
    assert res.total_lines == 3
    assert res.model == "gpt-4o-mini"
    assert res.shards == [ShardPlan(index=0, start=0, end=len(data), first_line=1, line_count=3)]


@pytest.mark.parametrize(
    "endpoint", [CHAT, "/v1/embeddings", "/v1/completions", "/v1/responses", "/v1/moderations"]
)
def test_valid_for_each_endpoint(endpoint: str) -> None:
    res = validate(jsonl(req("a", endpoint), req("b", endpoint)), endpoint)
    assert res.ok, res.errors


def test_different_models_are_allowed() -> None:
    res = validate(
        jsonl(
            req("a", model="llama-3", messages=[]),
            req("b", model="gpt-4o-mini", messages=[]),
        )
    )
    assert res.ok
    assert res.model == "llama-3"


def test_model_is_that_of_first_valid_line() -> None:
    res = validate(
        b"nope\n" + jsonl(req("a", model="nowhere", messages=[]), req("b", model="llama-3", messages=[]))
    )
    assert not res.ok
    assert res.model == "llama-3"


def test_model_none_when_no_valid_line() -> None:
    res = validate(b"{}\n")
    assert res.model is None


def test_unknown_body_keys_and_stream_false_are_fine() -> None:
    res = validate(
        jsonl(req("a", model="gpt-4o-mini", messages=[], stream=False, temperature=0.5, extra={"x": 1}))
    )
    assert res.ok


def test_unlisted_endpoint_checks_no_body_field() -> None:
    res = validate(jsonl(req("a", "/v1/custom", model="gpt-4o-mini")), "/v1/custom")
    assert res.ok


# ------------------------------------------------------------------------------------------------ line rules

_BASE = req("x")
_BODY = _BASE["body"]


def _without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


def _with(d: dict[str, Any], **kv: Any) -> dict[str, Any]:
    return {**d, **kv}


LINE_CASES: list[tuple[str, bytes, str, str | None]] = [
    ("not json", b"not json", "invalid_json_line", None),
    ("truncated", b'{"custom_id": "x"', "invalid_json_line", None),
    ("array", b"[1, 2]", "invalid_json_line", None),
    ("string", b'"hello"', "invalid_json_line", None),
    ("number", b"42", "invalid_json_line", None),
    ("null", b"null", "invalid_json_line", None),
    ("two objects", b"{} {}", "invalid_json_line", None),
    ("bad utf-8", b'{"custom_id": "\xff"}', "invalid_json_line", None),
    (
        "missing custom_id",
        orjson.dumps(_without(_BASE, "custom_id")),
        "missing_required_parameter",
        "custom_id",
    ),
    ("null custom_id", orjson.dumps(_with(_BASE, custom_id=None)), "missing_required_parameter", "custom_id"),
    ("int custom_id", orjson.dumps(_with(_BASE, custom_id=7)), "missing_required_parameter", "custom_id"),
    ("empty custom_id", orjson.dumps(_with(_BASE, custom_id="")), "missing_required_parameter", "custom_id"),
    ("missing method", orjson.dumps(_without(_BASE, "method")), "missing_required_parameter", "method"),
    ("GET method", orjson.dumps(_with(_BASE, method="GET")), "invalid_value", "method"),
    ("lower-case post", orjson.dumps(_with(_BASE, method="post")), "invalid_value", "method"),
    ("null method", orjson.dumps(_with(_BASE, method=None)), "invalid_value", "method"),
    ("missing url", orjson.dumps(_without(_BASE, "url")), "missing_required_parameter", "url"),
    ("other url", orjson.dumps(_with(_BASE, url="/v1/embeddings")), "invalid_url", "url"),
    ("int url", orjson.dumps(_with(_BASE, url=3)), "invalid_url", "url"),
    ("missing body", orjson.dumps(_without(_BASE, "body")), "missing_required_parameter", "body"),
    ("list body", orjson.dumps(_with(_BASE, body=[])), "missing_required_parameter", "body"),
    ("string body", orjson.dumps(_with(_BASE, body="{}")), "missing_required_parameter", "body"),
    ("null body", orjson.dumps(_with(_BASE, body=None)), "missing_required_parameter", "body"),
    (
        "missing model",
        orjson.dumps(_with(_BASE, body=_without(_BODY, "model"))),
        "invalid_request",
        "body.model",
    ),
    ("int model", orjson.dumps(_with(_BASE, body=_with(_BODY, model=4))), "invalid_request", "body.model"),
    (
        "null model",
        orjson.dumps(_with(_BASE, body=_with(_BODY, model=None))),
        "invalid_request",
        "body.model",
    ),
    (
        "unknown model",
        orjson.dumps(_with(_BASE, body=_with(_BODY, model="gpt-9"))),
        "model_not_found",
        "body.model",
    ),
    (
        "stream",
        orjson.dumps(_with(_BASE, body=_with(_BODY, stream=True))),
        "streaming_unsupported",
        "body.stream",
    ),
    (
        "missing messages",
        orjson.dumps(_with(_BASE, body=_without(_BODY, "messages"))),
        "invalid_request",
        "body.messages",
    ),
    (
        "string messages",
        orjson.dumps(_with(_BASE, body=_with(_BODY, messages="hi"))),
        "invalid_request",
        "body.messages",
    ),
    (
        "null messages",
        orjson.dumps(_with(_BASE, body=_with(_BODY, messages=None))),
        "invalid_request",
        "body.messages",
    ),
]


@pytest.mark.parametrize(
    ("raw", "code", "param"), [c[1:] for c in LINE_CASES], ids=[c[0] for c in LINE_CASES]
)
def test_line_rule(raw: bytes, code: str, param: str | None) -> None:
    good = line(req("good-1"))
    res = validate(good + raw + b"\n" + line(req("good-2")))
    assert not res.ok
    assert res.error_count == 1
    assert codes(res) == [(code, param, 2)]
    assert res.total_lines == 3
    assert res.shards == []
    assert res.model == "gpt-4o-mini"


def test_invalid_json_message() -> None:
    (err,) = validate(b"{oops\n").errors
    assert err == LineError("invalid_json_line", "This line is not parseable as valid JSON.", 1, None)


@pytest.mark.parametrize(
    ("endpoint", "field"),
    [
        ("/v1/embeddings", "input"),
        ("/v1/completions", "prompt"),
        ("/v1/responses", "input"),
        ("/v1/moderations", "input"),
        (CHAT, "messages"),
    ],
)
def test_endpoint_required_body_field(endpoint: str, field: str) -> None:
    res = validate(jsonl(req("a", endpoint, model="gpt-4o-mini")), endpoint)
    assert codes(res) == [("invalid_request", f"body.{field}", 1)]
    assert (
        res.errors[0].message == f"{field.capitalize()} parameter is required."
    )  # OpenAI: "Messages parameter ..."


@pytest.mark.parametrize("value", ["", [], 0, [1, 2], {"x": 1}])
def test_embeddings_input_any_present_value(value: Any) -> None:
    res = validate(jsonl(req("a", "/v1/embeddings", model="gpt-4o-mini", input=value)), "/v1/embeddings")
    assert res.ok


def test_invalid_url_message_is_openais() -> None:
    (err,) = validate(line(_with(_BASE, url="/v1/completions"))).errors
    assert err.code == "invalid_url"
    assert err.message == "The URL provided for this request does not match the batch endpoint."


def test_model_not_found_message_names_model() -> None:
    (err,) = validate(jsonl(req("a", model="my-secret-model", messages=[]))).errors
    assert err.code == "model_not_found"
    assert "my-secret-model" in err.message


def test_model_not_found_message_truncates_huge_model_name() -> None:
    (err,) = validate(jsonl(req("a", model="m" * 100_000, messages=[]))).errors
    assert err.code == "model_not_found"
    assert len(err.message) < 1000


def test_is_routable_called_once_per_model() -> None:
    calls: list[str] = []

    def spy(model: str) -> bool:
        calls.append(model)
        return model != "bad"

    v = BatchValidator(CHAT, spy)
    v.feed(jsonl(*(req(f"r{i}", model=["a", "b", "bad"][i % 3], messages=[]) for i in range(30))))
    res = v.finish()
    assert sorted(calls) == ["a", "b", "bad"]
    assert res.error_count == 10


def test_first_failing_rule_wins() -> None:
    # Everything wrong: custom_id is checked first.
    assert codes(validate(line({"method": "GET", "url": "/x"}))) == [
        ("missing_required_parameter", "custom_id", 1)
    ]
    # method before url
    assert codes(validate(line({"custom_id": "a", "method": "GET", "url": "/x"})))[0][:2] == (
        "invalid_value",
        "method",
    )
    # url before body
    assert codes(validate(line({"custom_id": "a", "method": "POST", "url": "/x"})))[0][:2] == (
        "invalid_url",
        "url",
    )
    # body.model before stream / messages
    assert codes(validate(line(req("a", stream=True, model="nope"))))[0][:2] == (
        "model_not_found",
        "body.model",
    )
    # stream before messages
    assert codes(validate(line(req("a", stream=True, model="gpt-4o-mini"))))[0][:2] == (
        "streaming_unsupported",
        "body.stream",
    )


# ---------------------------------------------------------------------------------------------- duplicates


def test_duplicate_custom_id() -> None:
    res = validate(jsonl(req("a"), req("b"), req("a"), req("c"), req("a")))
    assert codes(res) == [("duplicate_custom_id", "custom_id", 3), ("duplicate_custom_id", "custom_id", 5)]
    assert res.errors[0].message == DUPLICATE_MESSAGE
    assert res.error_count == 2


def test_duplicate_of_an_invalid_line_is_still_a_duplicate() -> None:
    res = validate(jsonl(_with(req("a"), url="/wrong"), req("a")))
    assert codes(res) == [("invalid_url", "url", 1), ("duplicate_custom_id", "custom_id", 2)]


def test_duplicate_line_with_another_problem_reports_the_other_problem() -> None:
    res = validate(jsonl(req("a"), _with(req("a"), method="PUT")))
    assert codes(res) == [("invalid_value", "method", 2)]


def test_custom_ids_compare_exactly() -> None:
    assert validate(jsonl(req("a"), req("A"), req("a "), req("é"), req("e\u0301"))).ok


# ------------------------------------------------------------------------------------ line numbers and ends


def test_line_numbers_count_blank_lines() -> None:
    data = (
        b"\n   \n" + line(req("a")) + b"\t\n\n" + b"oops\n" + b" \r\n" + line(_with(req("b"), method="GET"))
    )
    res = validate(data)
    assert codes(res) == [("invalid_json_line", None, 6), ("invalid_value", "method", 8)]
    assert res.total_lines == 3


def test_crlf_line_endings() -> None:
    data = line(req("a"))[:-1] + b"\r\n\r\n" + b"bad\r\n" + line(req("c"))[:-1] + b"\r\n"
    res = validate(data)
    assert codes(res) == [("invalid_json_line", None, 3)]
    assert res.total_lines == 3


def test_crlf_valid_file_and_shards() -> None:
    data = b"".join(line(req(f"r{i}"))[:-1] + b"\r\n" for i in range(7))
    res = validate(data, shard_lines=3)
    assert res.ok
    check_shards(data, res)
    assert [s.line_count for s in res.shards] == [3, 3, 1]
    assert res.shards[-1].end == len(data)


def test_missing_final_newline() -> None:
    data = jsonl(req("a"), req("b")) + line(req("c"))[:-1]
    res = validate(data, shard_lines=2)
    assert res.ok
    assert res.total_lines == 3
    assert res.shards[-1] == ShardPlan(1, len(data) - len(line(req("c"))) + 1, len(data), 3, 1)
    check_shards(data, res)


def test_missing_final_newline_error_line_number() -> None:
    res = validate(line(req("a")) + b"\n" + b"{bad")
    assert codes(res) == [("invalid_json_line", None, 3)]


def test_missing_final_newline_closes_full_shard_at_eof() -> None:
    data = jsonl(req("a")) + line(req("b"))[:-1]
    res = validate(data, shard_lines=2)
    assert res.shards == [ShardPlan(0, 0, len(data), 1, 2)]


def test_trailing_whitespace_without_newline() -> None:
    data = jsonl(req("a")) + b"   "
    res = validate(data)
    assert res.ok
    assert res.total_lines == 1
    assert res.shards == [ShardPlan(0, 0, len(data) - 3, 1, 1)]


def test_whitespace_around_object_is_fine() -> None:
    res = validate(b"  " + orjson.dumps(req("a")) + b" \t\r\n")
    assert res.ok


def test_a_leading_utf8_bom_is_skipped_and_the_first_shard_starts_after_it() -> None:
    data = b"\xef\xbb\xbf" + line(req("a")) + line(req("b"))
    res = validate(data, shard_lines=1)
    assert res.ok and res.total_lines == 2
    first = len(line(req("a")))
    assert res.shards == [ShardPlan(0, 3, 3 + first, 1, 1), ShardPlan(1, 3 + first, len(data), 2, 1)]
    assert orjson.loads(data[res.shards[0].start : res.shards[0].end]) == req("a")


def test_a_bom_anywhere_but_the_start_is_invalid_json() -> None:
    res = validate(line(req("a")) + b"\xef\xbb\xbf" + line(req("b")))
    assert codes(res) == [("invalid_json_line", None, 2)]


def test_a_line_nested_deeper_than_the_limit_is_refused_with_its_line_number() -> None:
    from batchyard.domain.wire import MAX_DEPTH

    def nested(levels: int) -> Any:
        v: Any = "x"
        for _ in range(levels):
            v = [v]
        return v

    ok = req("a")
    ok["body"]["messages"][0]["content"] = nested(MAX_DEPTH - 5)  # line, body, messages, message: 4 levels
    deep = req("b")
    deep["body"]["messages"][0]["content"] = nested(300)  # orjson reads it but cannot write it back
    brackets = req("c")
    brackets["body"]["messages"][0]["content"] = "[" * 5000  # many brackets, all inside a string: fine
    res = validate(line(ok) + json.dumps(deep).encode() + b"\n" + line(brackets))
    assert codes(res) == [("invalid_json_line", None, 2)]
    assert "levels deep" in res.errors[0].message


# ---------------------------------------------------------------------------------------- chunk boundaries

SMALL = (
    b"\r\n"
    + line(req("a"))
    + b"  \n"
    + b"not json\r\n"
    + line(_with(req("b"), url="/v1/embeddings"))[:-1]
    + b"\r\n"
    + line(req("a"))
    + b"\n"
    + line(req("c", model="gpt-9", messages=[]))
    + line(req("d", model="llama-3", messages=[]))
    + line(req("e"))[:-1]
)
SMALL_OK = b"\n" + b"".join(line(req(f"r{i}"))[:-1] + (b"\r\n" if i % 2 else b"\n\n") for i in range(9))[:-1]


def _fingerprint(res: ValidationResult) -> tuple[Any, ...]:
    return (res.ok, res.errors, res.error_count, res.total_lines, res.shards, res.model)


def _feed_all(data: bytes, pieces: list[bytes], **kwargs: Any) -> ValidationResult:
    v = BatchValidator(CHAT, routable, **kwargs)
    for p in pieces:
        v.feed(p)
    return v.finish()


def test_small_file_reference_result() -> None:
    res = validate(SMALL)
    assert codes(res) == [
        ("invalid_json_line", None, 4),
        ("invalid_url", "url", 5),
        ("duplicate_custom_id", "custom_id", 6),
        ("model_not_found", "body.model", 8),
    ]
    assert res.total_lines == 7
    assert res.model == "gpt-4o-mini"


@pytest.mark.parametrize("data", [SMALL, SMALL_OK], ids=["errors", "ok"])
def test_every_split_position(data: bytes) -> None:
    expected = _fingerprint(validate(data, shard_lines=2))
    for i in range(len(data) + 1):
        assert _fingerprint(_feed_all(data, [data[:i], data[i:]], shard_lines=2)) == expected, i


@pytest.mark.parametrize("data", [SMALL, SMALL_OK], ids=["errors", "ok"])
def test_byte_by_byte(data: bytes) -> None:
    expected = _fingerprint(validate(data, shard_lines=2))
    pieces = [data[i : i + 1] for i in range(len(data))]
    assert _fingerprint(_feed_all(data, pieces, shard_lines=2)) == expected


@pytest.mark.parametrize("data", [SMALL, SMALL_OK], ids=["errors", "ok"])
def test_three_way_splits_around_newlines(data: bytes) -> None:
    expected = _fingerprint(validate(data, shard_lines=3))
    cuts = sorted({p + d for p in range(len(data)) if data[p] in b"\r\n" for d in (-1, 0, 1, 2)})
    cuts = [c for c in cuts if 0 <= c <= len(data)]
    for i, j in itertools.combinations(cuts, 2):
        assert _fingerprint(_feed_all(data, [data[:i], b"", data[i:j], data[j:]], shard_lines=3)) == expected


def test_ok_small_file_shards_survive_any_split() -> None:
    res = validate(SMALL_OK, shard_lines=2)
    assert res.ok
    assert [s.line_count for s in res.shards] == [2, 2, 2, 2, 1]
    check_shards(SMALL_OK, res)


def test_feed_accepts_bytearray_and_does_not_keep_it() -> None:
    buf = bytearray(line(req("a"))[:-5])
    rest = line(req("a"))[-5:]
    v = BatchValidator(CHAT, routable)
    v.feed(buf)  # type: ignore[arg-type]
    buf[:] = b"x" * len(buf)  # the caller reuses its buffer
    v.feed(rest)
    assert v.finish().ok


# ------------------------------------------------------------------------------------------------ max_errors


def test_max_errors_cap_keeps_first_and_counts_all() -> None:
    data = b"".join(b"bad\n" if i % 2 else line(req(f"r{i}")) for i in range(500))
    res = validate(data, max_errors=10)
    assert res.error_count == 250
    assert len(res.errors) == 10
    assert [e.line for e in res.errors] == list(range(2, 21, 2))
    assert not res.ok
    assert res.total_lines == 500


def test_default_max_errors_is_100() -> None:
    res = validate(b"x\n" * 150)
    assert res.error_count == 150
    assert len(res.errors) == 100


def test_max_errors_zero() -> None:
    res = validate(b"x\n" * 3, max_errors=0)
    assert res.errors == []
    assert res.error_count == 3
    assert not res.ok


# ---------------------------------------------------------------------------------------------- file limits


def test_empty_file() -> None:
    for data in (b"", b"\n", b" \r\n\t\n\n", b"   "):
        res = validate(data)
        assert not res.ok
        assert res.errors == [LineError("empty_file", "The batch input file is empty.", None, None)]
        assert res.error_count == 1
        assert res.total_lines == 0
        assert res.shards == []


def test_max_lines_exactly_is_fine() -> None:
    res = validate(jsonl(*(req(f"r{i}") for i in range(5))) + b"\n\n", max_lines=5)
    assert res.ok
    assert res.total_lines == 5


def test_too_many_lines() -> None:
    data = jsonl(*(req(f"r{i}") for i in range(6))) + b"bad json\n" * 10
    res = validate(data, max_lines=5)
    assert not res.ok
    assert res.errors == [
        LineError("too_many_lines", "The batch input file contains more than 5 requests.", None, None)
    ]
    assert res.error_count == 1  # scanning stopped: the bad lines after the limit are not reported
    assert res.shards == []


def test_too_many_lines_keeps_earlier_line_errors_after_the_file_error() -> None:
    res = validate(b"bad\n" + jsonl(*(req(f"r{i}") for i in range(5))), max_lines=3)
    assert codes(res) == [("too_many_lines", None, None), ("invalid_json_line", None, 1)]
    assert res.error_count == 2


def test_too_many_lines_across_chunks() -> None:
    data = jsonl(*(req(f"r{i}") for i in range(10)))
    v = BatchValidator(CHAT, routable, max_lines=3)
    for i in range(0, len(data), 7):
        v.feed(data[i : i + 7])
    res = v.finish()
    assert codes(res) == [("too_many_lines", None, None)]


def test_max_bytes_exactly_is_fine() -> None:
    data = jsonl(req("a"), req("b"))
    assert validate(data, max_bytes=len(data)).ok


def test_file_too_large() -> None:
    data = jsonl(req("a"), req("b"))
    v = BatchValidator(CHAT, routable, max_bytes=len(data) - 1)
    v.feed(data[:10])
    v.feed(data[10:])
    res = v.finish()
    assert not res.ok
    assert [(e.code, e.line, e.param) for e in res.errors] == [("file_too_large", None, None)]
    assert str(len(data) - 1) in res.errors[0].message
    assert res.error_count == 1
    assert res.shards == []


def test_file_too_large_and_too_many_lines() -> None:
    data = jsonl(*(req(f"r{i}") for i in range(4)))
    v = BatchValidator(CHAT, routable, max_lines=2, max_bytes=len(data) + 5)
    v.feed(data)
    v.feed(b"\n" * 10)
    res = v.finish()
    assert [e.code for e in res.errors] == ["too_many_lines", "file_too_large"]


def test_file_too_large_single_line_is_not_buffered() -> None:
    v = BatchValidator(CHAT, routable, max_bytes=1000)
    for _ in range(100):
        v.feed(b"x" * 100)
    res = v.finish()
    assert [e.code for e in res.errors] == ["file_too_large"]


def test_defaults_match_openai_limits() -> None:
    v = BatchValidator(CHAT, routable)
    v.feed(jsonl(*(req(f"r{i}") for i in range(50_000))))
    res = v.finish()
    assert res.ok
    assert len(res.shards) == 50
    v = BatchValidator(CHAT, routable)
    v.feed(jsonl(*(req(f"r{i}") for i in range(50_001))))
    assert [e.code for e in v.finish().errors] == ["too_many_lines"]


@pytest.mark.parametrize(
    "kwargs",
    [{"max_lines": 0}, {"max_bytes": -1}, {"max_errors": -1}, {"shard_lines": 0}],
)
def test_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BatchValidator(CHAT, routable, **kwargs)


def test_finish_is_idempotent_and_feed_after_finish_raises() -> None:
    v = BatchValidator(CHAT, routable)
    v.feed(line(req("a")))
    res = v.finish()
    assert v.finish() is res
    with pytest.raises(RuntimeError):
        v.feed(b"\n")


# -------------------------------------------------------------------------------------------- shard planning


@pytest.mark.parametrize("shard_lines", [1, 2, 3, 4, 7, 1000])
@pytest.mark.parametrize("final_newline", [True, False])
@pytest.mark.parametrize("crlf", [False, True])
def test_shard_planning(shard_lines: int, final_newline: bool, crlf: bool) -> None:
    nl = b"\r\n" if crlf else b"\n"
    parts: list[bytes] = [nl, b"  " + nl]
    for i in range(23):
        parts.append(orjson.dumps(req(f"r{i}")) + nl)
        if i % 5 == 0:
            parts.append(nl)
        if i % 7 == 0:
            parts.append(b" \t" + nl)
    data = b"".join(parts).rstrip(b" \t\r\n") + (nl if final_newline else b"")
    res = validate(data, shard_lines=shard_lines)
    assert res.ok, res.errors
    assert res.total_lines == 23
    assert [s.line_count for s in res.shards] == [min(shard_lines, 23 - k) for k in range(0, 23, shard_lines)]
    assert res.shards[0].start == data.index(b"{")
    assert res.shards[0].first_line == 3
    assert res.shards[-1].end == len(data)
    check_shards(data, res)


def test_shard_ranges_are_exact() -> None:
    a, b, c = line(req("a")), line(req("b")), line(req("c"))
    data = b"\n" + a + b"\n\n" + b + c + b" \n"
    res = validate(data, shard_lines=2)
    assert res.shards == [
        ShardPlan(0, 1, 1 + len(a) + 2 + len(b), 2, 2),
        ShardPlan(1, 1 + len(a) + 2 + len(b), 1 + len(a) + 2 + len(b) + len(c), 6, 1),
    ]
    check_shards(data, res)


def test_no_shards_when_not_ok() -> None:
    res = validate(jsonl(req("a"), req("a")), shard_lines=1)
    assert res.shards == []


# ------------------------------------------------------------------------------------------------ iter_lines


def test_iter_lines() -> None:
    data = b"\n{}\r\n  \n[1]\n\t\r\n x \nlast"
    assert list(iter_lines(data, 10)) == [(11, b"{}"), (13, b"[1]"), (15, b" x "), (16, b"last")]


def test_iter_lines_edge_cases() -> None:
    assert list(iter_lines(b"", 1)) == []
    assert list(iter_lines(b"\n\n", 1)) == []
    assert list(iter_lines(b"{}", 5)) == [(5, b"{}")]
    assert list(iter_lines(b"{}\n", 5)) == [(5, b"{}")]
    assert list(iter_lines(b"{}\r", 5)) == [(5, b"{}")]
    assert list(iter_lines(b"\r\n{}\r\n\r\n", 1)) == [(2, b"{}")]
    assert list(iter_lines(b"\x0b\x0c \n{}", 1)) == [(2, b"{}")]


def test_ascii_whitespace_only_lines_are_blank() -> None:
    data = b"\x0b\n\x0c\r\n \t \n" + line(req("a"))
    res = validate(data)
    assert res.ok
    assert res.total_lines == 1
    assert res.shards == [ShardPlan(0, 9, len(data), 4, 1)]
    # Any other control or non-ASCII space makes a request line, which is then invalid.
    assert codes(validate(b"\x00\n" + line(req("a")))) == [("invalid_json_line", None, 1)]
    assert codes(validate("\u00a0\n".encode() + line(req("a")))) == [("invalid_json_line", None, 1)]


def test_iter_lines_parse() -> None:
    objs = [req(f"r{i}") for i in range(5)]
    data = b"".join(orjson.dumps(o) + b"\r\n" for o in objs)
    assert [orjson.loads(raw) for _, raw in iter_lines(data, 1)] == objs


# ------------------------------------------------------------------------------------------------- volume


def test_20mb_file_sanity() -> None:
    """Validates a generated ~20 MB file in chunks; checks the result, not the time."""
    content = 'lorem ipsum dolor sit amet, héllo "quoted" \n 日本語 ' * 70
    lines = [
        orjson.dumps(
            req(
                f"request-{i}",
                model="gpt-4o-mini" if i % 2 else "llama-3",
                messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}],
                max_tokens=100,
            )
        )
        + b"\n"
        for i in range(5000)
    ]
    data = b"".join(lines)
    assert 19_000_000 < len(data) < 30_000_000
    v = BatchValidator(CHAT, routable)
    for i in range(0, len(data), 1 << 16):
        v.feed(data[i : i + (1 << 16)])
    res = v.finish()
    assert res.ok
    assert res.total_lines == 5000
    assert res.model == "llama-3"
    assert len(res.shards) == 5
    assert res.shards[-1].end == len(data)
    check_shards(data, res)


def test_shards_are_bounded_in_bytes_as_well_as_lines() -> None:
    big = req("a", model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 3000}])
    data = b"".join(line({**big, "custom_id": f"r{i}"}) for i in range(10))
    size = len(line({**big, "custom_id": "r0"}))
    res = validate(data, shard_lines=1000, shard_bytes=3 * size)
    assert res.ok and [s.line_count for s in res.shards] == [3, 3, 3, 1]
    assert all(s.end - s.start <= 3 * size for s in res.shards)
    assert res.shards[-1].end == len(data)


def test_a_line_over_the_line_cap_is_refused_unparsed() -> None:
    small, big = (
        line(req("a")),
        line(req("b", model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 500}])),
    )
    res = validate(small + big + small.replace(b'"a"', b'"c"'), max_line_bytes=len(big) - 2)
    assert codes(res) == [("invalid_request", None, 2)]
    assert "larger than the maximum" in res.errors[0].message
