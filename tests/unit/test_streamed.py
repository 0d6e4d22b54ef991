"""Batch lines sent as streams (upstreams/streamed.py): which go so, and the answer assembled from the events.
The events are llama.cpp's, as its server sends them (tests/integration/test_streamed_lines.py compares the
assembled answers with the engine's own)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from batchyard.upstreams import streamed

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"


def sse(*events: Any, done: bool = True) -> bytes:
    out = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


def chunk(choices: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    return {
        "choices": choices,
        "created": 7,
        "id": "chatcmpl-1",
        "model": "m",
        "object": "chat.completion.chunk",
        **top,
    }


@pytest.mark.parametrize(
    ("endpoint", "body", "expected"),
    [
        (CHAT, {"messages": []}, True),
        (CHAT, {"messages": [], "stream": False, "n": 1}, True),
        (CHAT, {"messages": [], "stream": True}, False),  # a stream of its own: sent as it is
        (CHAT, {"messages": [], "n": 2}, False),  # llama.cpp streams each choice with its own usage
        (CHAT, {"messages": [], "response_format": {"type": "json_object"}}, False),
        (CHAT, {"messages": [], "response_format": {"type": "json_schema", "json_schema": {}}}, False),
        (CHAT, {"messages": [], "response_format": {"type": "text"}}, True),
        (CHAT, {"messages": [], "grammar": "root ::= x"}, False),
        (TEXT, {"prompt": "Hi"}, True),
        (TEXT, {"prompt": ["Hi", "there"]}, False),  # several prompts stream in turn
        (TEXT, {"prompt": [1, 2, 3]}, False),
        ("/v1/embeddings", {"input": "Hi"}, False),
        ("/v1/responses", {"input": "Hi"}, False),
    ],
)
def test_only_a_request_whose_stream_is_one_answer_goes_as_a_stream(
    endpoint: str, body: dict[str, Any], expected: bool
) -> None:
    assert streamed.streamable(endpoint, body) is expected


def test_the_stream_asks_for_its_usage_and_keeps_the_rest_of_the_request_exactly() -> None:
    body = {"model": "m", "messages": [], "seed": 2**70, "stream_options": {"x": 1}}
    sent = streamed.stream_payload(body)
    assert b'"seed":1180591620717411303424' in sent  # exact past 64 bits
    assert orjson.loads(sent.replace(b"1180591620717411303424", b"0"))["stream_options"] == {
        "include_usage": True
    }
    assert orjson.loads(sent.replace(b"1180591620717411303424", b"0"))["stream"] is True


def test_a_chat_answer_is_its_deltas_joined_with_the_last_events_usage() -> None:
    raw = sse(
        chunk([{"finish_reason": None, "index": 0, "delta": {"role": "assistant", "content": None}}]),
        chunk([{"finish_reason": None, "index": 0, "delta": {"content": "Hel"}}]),
        chunk([{"finish_reason": None, "index": 0, "delta": {"content": "lo"}}]),
        chunk([{"finish_reason": "stop", "index": 0, "delta": {}}]),
        chunk(
            [], usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}, timings={"cache_n": 1}
        ),
    )
    answer, error = streamed.assemble(CHAT, raw)
    assert not error
    assert orjson.loads(answer) == {
        "choices": [
            {"finish_reason": "stop", "index": 0, "message": {"role": "assistant", "content": "Hello"}}
        ],
        "created": 7,
        "id": "chatcmpl-1",
        "model": "m",
        "object": "chat.completion",
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        "timings": {"cache_n": 1},
    }


def test_tool_calls_and_log_probabilities_are_joined_piece_by_piece() -> None:
    def lp(t: str) -> dict[str, Any]:
        return {"token": t, "logprob": -0.1, "top_logprobs": []}

    raw = sse(
        chunk([{"index": 0, "delta": {"role": "assistant", "content": None}}]),
        chunk(
            [{"index": 0, "delta": {"reasoning_content": "Think"}, "logprobs": {"content": [lp("Think")]}}]
        ),
        chunk([{"index": 0, "delta": {"reasoning_content": "ing"}, "logprobs": {"content": [lp("ing")]}}]),
        chunk(
            [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "get", "arguments": ""},
                            }
                        ]
                    },
                }
            ]
        ),
        chunk([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}}]),
        chunk([{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}}]),
        chunk(
            [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 1, "id": "call_2", "function": {"name": "now"}}]},
                }
            ]
        ),
        chunk([{"finish_reason": "tool_calls", "index": 0, "delta": {}}]),
    )
    choice = orjson.loads(streamed.assemble(CHAT, raw)[0])["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["logprobs"] == {"content": [lp("Think"), lp("ing")]}
    assert choice["message"] == {
        "role": "assistant",
        "content": None,  # a whole answer with tool calls has no content either
        "reasoning_content": "Thinking",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get", "arguments": '{"city":"Paris"}'},
            },
            {"id": "call_2", "function": {"name": "now"}},
        ],
    }


def test_an_answer_with_no_content_event_has_empty_content() -> None:
    raw = sse(
        chunk([{"index": 0, "delta": {"role": "assistant", "content": None}}]),
        chunk([{"finish_reason": "length", "index": 0, "delta": {}}]),
    )
    assert orjson.loads(streamed.assemble(CHAT, raw)[0])["choices"][0]["message"] == {
        "role": "assistant",
        "content": "",
    }


def test_a_text_completion_joins_its_text_and_keeps_the_usage_of_its_last_event() -> None:
    def text(t: str, finish: str | None = None, **top: Any) -> dict[str, Any]:
        c = {"text": t, "index": 0, "logprobs": None, "finish_reason": finish}
        return {
            "choices": [c],
            "created": 7,
            "model": "m",
            "object": "text_completion",
            "id": "cmpl-1",
            **top,
        }

    raw = sse(text("-"), text("by"), text("", "length", usage={"total_tokens": 4}))
    assert orjson.loads(streamed.assemble(TEXT, raw)[0]) == {
        "choices": [{"text": "-by", "index": 0, "logprobs": None, "finish_reason": "length"}],
        "created": 7,
        "model": "m",
        "object": "text_completion",
        "id": "cmpl-1",
        "usage": {"total_tokens": 4},
    }


def test_an_error_event_is_the_answer() -> None:
    raw = b"data: null\n\n" + sse(
        chunk([{"index": 0, "delta": {"content": "x"}}]), {"error": {"code": 500, "message": "boom"}}
    )
    answer, error = streamed.assemble(CHAT, raw)
    assert error and orjson.loads(answer) == {"error": {"code": 500, "message": "boom"}}


def test_comments_crlf_and_events_in_several_data_lines_are_read() -> None:
    one = chunk([{"index": 0, "delta": {"content": "a"}}])
    text = orjson.dumps(one).decode()
    raw = f": keep-alive\r\n\r\nevent: message\r\ndata: {text[:10]}\r\ndata: {text[10:]}\r\n\r\ndata: [DONE]\r\n\r\n"
    # two data lines make one payload joined by a line break: still one JSON object
    assert orjson.loads(streamed.assemble(CHAT, raw.encode())[0])["choices"][0]["message"]["content"] == "a"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"data: [DONE]\n\n",
        b"data: null\n\n",
        b"data: {not json\n\n",
        b"data: [1, 2]\n\n",
        b": only a comment\n\n",
    ],
)
def test_a_stream_that_makes_no_answer_is_broken(raw: bytes) -> None:
    with pytest.raises(streamed.BrokenStream):
        streamed.assemble(CHAT, raw)


def test_events_after_done_are_ignored() -> None:
    raw = sse(chunk([{"index": 0, "delta": {"content": "a"}}])) + sse(
        chunk([{"index": 0, "delta": {"content": "b"}}])
    )
    assert orjson.loads(streamed.assemble(CHAT, raw)[0])["choices"][0]["message"]["content"] == "a"


@pytest.mark.parametrize(
    ("raw", "expected"), [(b"data: {}", True), (b"\n: hi", True), (b'{"id": 1}', False), (b"", False)]
)
def test_an_answer_is_an_event_stream_when_it_starts_like_one(raw: bytes, expected: bool) -> None:
    assert streamed.is_event_stream(raw) is expected


def test_a_null_first_then_a_value_and_a_repeated_role_or_finish_reason_are_not_joined() -> None:
    raw = sse(
        chunk(
            [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": None, "tool_calls": None},
                    "logprobs": None,
                }
            ]
        ),
        chunk([{"index": 0, "delta": {"role": "assistant", "content": "a"}, "logprobs": {"content": None}}]),
        chunk([{"index": 0, "delta": {"content": "b"}, "logprobs": {"content": [{"token": "b"}]}}]),
        chunk([{"finish_reason": "stop", "index": 0, "delta": {}}]),
        chunk([{"finish_reason": "stop", "index": 0, "delta": {}}]),
    )
    choice = orjson.loads(streamed.assemble(CHAT, raw)[0])["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": "ab", "tool_calls": None}
    assert choice["logprobs"] == {"content": [{"token": "b"}]}


@pytest.mark.parametrize(
    "piece",
    [
        {"index": 0, "delta": "text"},
        {"index": 0, "message": "text", "delta": {"content": 3}},
        {"index": 0, "delta": {"tool_calls": [1, "x", {"index": None}, {"function": "f"}]}},
        {"index": 0, "delta": {"tool_calls": {"index": 0}}},
        {"index": "0", "logprobs": [1, 2], "text": 5},
        {"index": 0, "delta": {"content": ["a"]}, "logprobs": "x"},
    ],
)
@pytest.mark.parametrize("endpoint", [CHAT, TEXT])
def test_an_odd_piece_from_the_engine_makes_an_answer_not_an_exception(
    piece: dict[str, Any], endpoint: str
) -> None:
    """Whatever JSON an engine streams, the line gets an answer (or a broken-stream error), never a crash in the
    worker's assembly: `_merge` is total over JSON."""
    raw = sse(chunk([{"index": 0, "delta": {"content": "a"}}]), chunk([piece]), chunk([piece]))
    answer = orjson.loads(streamed.assemble(endpoint, raw)[0])
    assert answer["object"] in ("chat.completion", "text_completion") and answer["choices"]
