"""A hostile tenant and a misbehaving upstream (issue 9): one line, or one answer, fails alone.

Every case runs through a real `batchyard serve` (two API keys, every model routed to the fake upstream) and ends
with the same check (:func:`assert_contained`): the hostile batch either failed validation with line-numbered
`errors.data`, or it completed with every custom_id exactly once in output ∪ error file (the poison line alone in
the error file or with an upstream answer); a second key's batch, submitted at the same time, completed; `/health`
answers; the worker process never exited. The pure validator gets the same hostile lines, and arbitrary bytes, in
property tests: it never raises.

Request lines are written as JSON *text* (not with a serializer), so they can hold what no serializer writes:
nesting beyond 254 levels, integers beyond 64 bits, lone surrogate escapes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from openai import OpenAI
from openai.types import Batch

from batchyard.domain.validation import BatchValidator
from tests.conftest import Server
from tests.support.batches import TERMINAL, chat_line, jsonl, read_lines, upload
from tests.support.fake_upstream import FakeUpstream, expected_text, nested_json

CHAT: Final = "/v1/chat/completions"
HOSTILE_KEY: Final = "sk-hostile"
NORMAL_KEY: Final = "sk-normal"
WORKER_DIED: Final = "worker process exited"
BOM: Final = b"\xef\xbb\xbf"
YEAR_10000: Final = "Fri, 01 Jan 10000 00:00:00 GMT"
HUGE: Final = 2**70
NORMAL_LINES: Final = 6
WAIT: Final = 30.0


# --------------------------------------------------------------------------- servers and the invariant


@pytest.fixture
def hostile_server(make_server: Callable[..., Server], upstream: FakeUpstream) -> Server:
    """A fresh server per test: a poison line that kills the worker must not leak into the next test."""
    return make_server(
        "--upstream",
        upstream.base_url,
        "--api-key",
        HOSTILE_KEY,
        "--api-key",
        NORMAL_KEY,
        "--lease-seconds",
        "2",
        "--shard-lines",
        "4",
        "--max-retries",
        "2",
    )


def line_text(
    custom_id: str = "poison", *, content: str = '"hello hostile"', extra: str | None = None
) -> str:
    """One chat request line as JSON text; `content` and `extra` (the value of `body.x_hostile`) are JSON text."""
    body = f'{{"model":"fake-model","messages":[{{"role":"user","content":{content}}}]'
    if extra is not None:
        body += f',"x_hostile":{extra}'
    return f'{{"custom_id":{json.dumps(custom_id)},"method":"POST","url":"{CHAT}","body":{body}}}}}'


def hostile_file(poison: str, *, bom: bool = False, crlf: bool = False, around: int = 3) -> bytes:
    """`around` normal lines, the poison line, `around` more normal lines."""
    lines = [json.dumps(chat_line(i)) for i in range(around)]
    lines.append(poison)
    lines += [json.dumps(chat_line(i)) for i in range(around, 2 * around)]
    sep = "\r\n" if crlf else "\n"
    data = (sep.join(lines) + sep).encode("utf-8", "surrogatepass")
    return (BOM + data) if bom else data


@dataclass
class Outcome:
    hostile: Batch
    normal: Batch
    output: list[dict[str, Any]]  # the hostile batch's output lines
    errors: list[dict[str, Any]]  # the hostile batch's error-file lines


def _wait(server: Server, client: OpenAI, batch_id: str, timeout: float = WAIT) -> Batch:
    """Like batches.wait_for, but fails at once when the worker died or the server exited."""
    deadline = time.monotonic() + timeout
    while True:
        log = server.log_path.read_text(errors="replace")
        assert WORKER_DIED not in log, log[-3000:]
        assert server.proc is not None and server.proc.poll() is None, f"serve exited:\n{log[-3000:]}"
        b = client.batches.retrieve(batch_id)
        if b.status in TERMINAL:
            return b
        assert time.monotonic() < deadline, f"batch {batch_id} still {b.status} after {timeout}s"
        time.sleep(0.1)


def submit_both(server: Server, hostile: bytes, endpoint: str = CHAT) -> Outcome:
    """The hostile file under one key and a normal batch under another, created back to back; both awaited."""
    h, n = server.client(HOSTILE_KEY), server.client(NORMAL_KEY)
    hfid = upload(h, hostile)
    nfid = upload(n, [chat_line(100 + i) for i in range(NORMAL_LINES)])
    hb = h.batches.create(input_file_id=hfid, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
    nb = n.batches.create(input_file_id=nfid, endpoint=CHAT, completion_window="24h")
    hostile_batch = _wait(server, h, hb.id)
    normal_batch = _wait(server, n, nb.id)
    output = read_lines(h, hostile_batch.output_file_id)
    errors = read_lines(h, hostile_batch.error_file_id)
    return Outcome(hostile_batch, normal_batch, output, errors)


def input_ids(data: bytes) -> list[str]:
    """The custom_ids of the file's lines that parse (with Python's json: it reads what orjson may refuse)."""
    ids = []
    for raw in data.removeprefix(BOM).split(b"\n"):
        try:
            obj = json.loads(raw.decode("utf-8", "surrogatepass"))
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict) and isinstance(obj.get("custom_id"), str):
            ids.append(obj["custom_id"])
    return ids


def assert_contained(server: Server, data: bytes, outcome: Outcome, poison: str | None = "poison") -> None:
    """The invariant of every hostile case (see the module docstring)."""
    hb = outcome.hostile
    if hb.status == "failed":
        assert hb.errors is not None and hb.errors.data, hb
        for e in hb.errors.data:
            assert isinstance(e.line, int) and e.line >= 1, e
            assert e.code and e.message, e
    else:
        assert hb.status == "completed", hb
        ids = [x["custom_id"] for x in outcome.output + outcome.errors]
        assert sorted(ids) == sorted(input_ids(data)), (outcome.output, outcome.errors)
        for line in outcome.errors:  # an error of batchyard's own, or the upstream's non-2xx answer
            if line["response"] is None:
                assert set(line["error"]) >= {"code", "message"} and line["error"]["message"], line
            else:
                assert line["response"]["status_code"] >= 400 and line["error"] is None, line
        if poison is not None:
            # every line but the poison one got the fake's 200 answer
            for line in outcome.output:
                if line["custom_id"] != poison:
                    assert line["response"]["status_code"] == 200, line
            assert all(line["custom_id"] == poison for line in outcome.errors), outcome.errors
    nb = outcome.normal
    assert nb.status == "completed", nb
    assert nb.request_counts is not None and nb.request_counts.completed == NORMAL_LINES, nb
    normal_out = read_lines(server.client(NORMAL_KEY), nb.output_file_id)
    assert sorted(x["custom_id"] for x in normal_out) == sorted(f"req-{100 + i}" for i in range(NORMAL_LINES))
    assert httpx.get(server.root_url + "/health", timeout=5).status_code == 200
    assert WORKER_DIED not in server.log_path.read_text(errors="replace")


def line_of(outcome: Outcome, custom_id: str = "poison") -> dict[str, Any]:
    (line,) = [x for x in outcome.output + outcome.errors if x["custom_id"] == custom_id]
    return line


# --------------------------------------------------------------------------- the triggers of issue 9, item 1


def test_body_nested_300_levels(hostile_server: Server) -> None:
    data = hostile_file(line_text(extra=nested_json(300).decode()))
    assert_contained(hostile_server, data, submit_both(hostile_server, data))


def test_message_content_nested_600_levels_with_prefix_ordering(hostile_server: Server) -> None:
    content = "[" * 600 + '{"type":"text","text":"deep"}' + "]" * 600
    data = hostile_file(line_text(content=content))
    assert_contained(hostile_server, data, submit_both(hostile_server, data))


def test_upstream_429_with_retry_after_in_the_year_10000(hostile_server: Server) -> None:
    x_fake = {"status": 429, "retry_after": YEAR_10000, "fail_times": 1}
    data = hostile_file(json.dumps(chat_line(0, x_fake=x_fake) | {"custom_id": "poison"}))
    t0 = time.monotonic()
    outcome = submit_both(hostile_server, data)
    assert_contained(hostile_server, data, outcome)
    # capped, not trusted: the retry came after a backoff, and the second try got its 200
    assert time.monotonic() - t0 < 20
    assert line_of(outcome)["response"]["status_code"] == 200


def test_upstream_200_body_nested_300_levels(hostile_server: Server) -> None:
    # pretty-printed (raw newlines), so the body cannot be spliced in verbatim and is written again
    x_fake = {"nested": 300, "pretty": True}
    data = hostile_file(json.dumps(chat_line(0, x_fake=x_fake) | {"custom_id": "poison"}))
    assert_contained(hostile_server, data, submit_both(hostile_server, data))


def test_upstream_error_body_nested_300_levels(hostile_server: Server) -> None:
    data = hostile_file(
        json.dumps(chat_line(0, x_fake={"status": 400, "nested": 300}) | {"custom_id": "poison"})
    )
    outcome = submit_both(hostile_server, data)
    assert_contained(hostile_server, data, outcome)
    line = line_of(outcome)
    assert line["error"] is not None or line["response"]["status_code"] == 400


def test_integer_beyond_64_bits_reaches_the_upstream_exactly(
    hostile_server: Server, upstream: FakeUpstream
) -> None:
    data = hostile_file(line_text(extra=str(HUGE)))
    outcome = submit_both(hostile_server, data)
    assert_contained(hostile_server, data, outcome)
    sent = [b for b in upstream.received() if b'"poison"' in b or b"hello hostile" in b]
    assert sent, upstream.received()
    assert all(orjson.loads(b)["x_hostile"] == HUGE for b in sent), sent  # orjson: ints beyond 64 bits raise
    assert all(b'"x_hostile":' + str(HUGE).encode() in b.replace(b" ", b"") for b in sent), sent


def test_bom_at_the_start_of_the_file_is_accepted(hostile_server: Server) -> None:
    data = hostile_file(line_text(), bom=True)
    outcome = submit_both(hostile_server, data)
    assert outcome.hostile.status == "completed", outcome.hostile
    assert_contained(hostile_server, data, outcome)
    assert not outcome.errors


def test_upstream_100_continue_is_skipped(hostile_server: Server) -> None:
    line = chat_line(0, x_fake={"continue_100": True}) | {"custom_id": "poison"}
    data = hostile_file(json.dumps(line))
    outcome = submit_both(hostile_server, data)
    assert_contained(hostile_server, data, outcome)
    answer = line_of(outcome)["response"]
    assert answer["status_code"] == 200
    assert answer["body"]["choices"][0]["message"]["content"] == expected_text(line["body"])


def test_crlf_file(hostile_server: Server) -> None:
    data = hostile_file(line_text(), crlf=True)
    outcome = submit_both(hostile_server, data)
    assert outcome.hostile.status == "completed" and not outcome.errors
    assert_contained(hostile_server, data, outcome)


# --------------------------------------------------------------------------- a misbehaving upstream

UPSTREAM_MISBEHAVIOUR: Final = [
    pytest.param({"nested": 2000}, id="200-nested-2000"),
    pytest.param({"status": 500, "nested": 2000}, id="500-nested-2000"),
    pytest.param({"huge_int": True}, id="200-huge-int"),
    pytest.param({"huge_usage": True}, id="200-huge-usage"),
    pytest.param({"odd_unicode": True}, id="200-odd-unicode"),
    pytest.param({"pretty": True}, id="200-pretty"),
    pytest.param({"status": 429, "retry_after": "inf", "fail_times": 1}, id="429-retry-after-inf"),
    pytest.param({"status": 429, "retry_after": "nan", "fail_times": 1}, id="429-retry-after-nan"),
    pytest.param({"status": 429, "retry_after": "-1", "fail_times": 1}, id="429-retry-after-minus-1"),
    pytest.param({"status": 429, "retry_after": "1e309", "fail_times": 1}, id="429-retry-after-1e309"),
    pytest.param({"status": 429, "retry_after": "9" * 4000, "fail_times": 1}, id="429-retry-after-long"),
    pytest.param(
        {"status": 429, "retry_after_ms": "99999999999", "fail_times": 1}, id="429-retry-after-ms-huge"
    ),
    pytest.param({"many_headers": 10_000}, id="10000-headers"),
    pytest.param({"header_bytes": 1_000_000}, id="1MB-header"),
    pytest.param({"bad_status_line": True}, id="bad-status-line"),
    pytest.param({"content_length": 100}, id="content-length-too-long"),
    pytest.param({"content_length": -10}, id="content-length-too-short"),
]


@pytest.mark.parametrize("x_fake", UPSTREAM_MISBEHAVIOUR)
def test_misbehaving_upstream_answer_fails_alone(hostile_server: Server, x_fake: dict[str, Any]) -> None:
    data = hostile_file(json.dumps(chat_line(0, x_fake=x_fake) | {"custom_id": "poison"}))
    t0 = time.monotonic()
    outcome = submit_both(hostile_server, data)
    assert outcome.hostile.status == "completed", outcome.hostile
    assert_contained(hostile_server, data, outcome)
    if "fail_times" in x_fake:  # an absurd wait is capped: the retry came soon and got its 200
        assert time.monotonic() - t0 < 20
        assert line_of(outcome)["response"]["status_code"] == 200


# --------------------------------------------------------------------------- hostile lines, generated

_DEPTHS: Final = [
    254,
    255,
    300,
    600,
    1023,
    1024,
    1025,
    1100,
]  # around orjson's write (254) and read (1024) limits
_FLOATS: Final = ["1e308", "-1e308", "1.7976931348623157e308", "5e-324", "1e-400", "1e400", "-0.0", "0e0"]


def _json_string(s: str, ascii_only: bool) -> str:
    return json.dumps(
        s, ensure_ascii=ascii_only
    )  # ensure_ascii=False keeps lone surrogates raw (surrogatepass)


odd_text = st.text(
    alphabet=st.one_of(
        st.characters(
            codec=None, min_codepoint=0, max_codepoint=0x10FFFF
        ),  # includes lone surrogates and NUL
        st.sampled_from(
            ["\x00", "\u2028", "\u2029", "\u200f", "\u202e", "\ufeff", "\ud800", "\udfff", "\r", "\n"]
        ),
    ),
    max_size=40,
)


@st.composite
def nested_value(draw: st.DrawFn) -> str:
    n = draw(st.one_of(st.sampled_from(_DEPTHS), st.integers(1, 1100)))
    if draw(st.booleans()):
        return "[" * n + "]" * n
    return '{"a":' * n + "1" + "}" * n


json_values: st.SearchStrategy[str] = st.one_of(
    nested_value(),
    st.integers(-(2**200), 2**200).map(str),
    st.sampled_from(_FLOATS),
    st.builds(_json_string, odd_text, st.booleans()),
    st.integers(10_000, 300_000).map(lambda n: json.dumps("x" * n)),
    st.builds(lambda v: f'{{"k":{v},"n":null,"t":true}}', st.sampled_from(['"v"', "[]", "{}", "1e308"])),
)


@st.composite
def poison_lines(draw: st.DrawFn) -> str:
    where = draw(st.sampled_from(["extra", "content", "content_list", "custom_id", "model"]))
    if where == "extra":
        return line_text(extra=draw(json_values))
    if where == "content":
        return line_text(content=draw(json_values))
    if where == "content_list":
        n = draw(st.one_of(st.sampled_from([300, 600, 700]), st.integers(1, 700)))
        return line_text(content="[" * n + '{"type":"text","text":"deep"}' + "]" * n)
    text = _json_string(draw(odd_text), draw(st.booleans()))
    if where == "custom_id":
        return line_text().replace('"custom_id":"poison"', f'"custom_id":{text}', 1)
    return line_text().replace('"model":"fake-model"', f'"model":{text}', 1)


@st.composite
def hostile_files(draw: st.DrawFn) -> bytes:
    return hostile_file(draw(poison_lines()), bom=draw(st.booleans()), crlf=draw(st.booleans()), around=2)


E2E = settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: each example is a whole batch
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


@E2E
@given(data=hostile_files())
def test_generated_hostile_lines_fail_alone(hostile_server: Server, data: bytes) -> None:
    outcome = submit_both(hostile_server, data)
    poison = "poison" if b'"custom_id":"poison"' in data else None
    assert_contained(hostile_server, data, outcome, poison=poison)


@E2E
@given(
    metadata=st.one_of(
        st.dictionaries(odd_text, st.one_of(odd_text, st.integers(-(2**70), 2**70), st.none()), max_size=20),
        st.lists(st.integers(), max_size=3),
        st.text(max_size=5),
        st.integers(),
        st.builds(lambda n: {"k": "v" * n}, st.integers(500, 100_000)),
    )
)
def test_odd_metadata_gets_a_batch_or_an_openai_4xx(hostile_server: Server, metadata: Any) -> None:
    h = hostile_server.client(HOSTILE_KEY)
    fid = upload(h, [chat_line(0)])
    body = json.dumps(
        {"input_file_id": fid, "endpoint": CHAT, "completion_window": "24h", "metadata": metadata}
    ).encode("utf-8", "surrogatepass")
    r = httpx.post(
        hostile_server.base_url + "/batches",
        content=body,
        headers={"Authorization": f"Bearer {HOSTILE_KEY}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert r.status_code in (200, 400), r.text
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert httpx.get(hostile_server.root_url + "/health", timeout=5).status_code == 200


# --------------------------------------------------------------------------- the validator, directly


def _validate(data: bytes, cuts: list[int]) -> Any:
    v = BatchValidator(CHAT, lambda model: True, shard_lines=3, max_errors=1000)
    prev = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        v.feed(data[prev:cut])
        prev = max(prev, cut)
    v.feed(data[prev:])
    return v.finish()


def _check_result(data: bytes, result: Any) -> None:
    physical = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    for e in result.errors:
        assert e.line is None or 1 <= e.line <= physical, (e, physical)
        assert e.code and e.message
    if result.ok:
        assert sum(s.line_count for s in result.shards) == result.total_lines
        assert all(0 <= s.start < s.end <= len(data) for s in result.shards)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 4000), max_size=6))
def test_validator_never_raises_on_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    _check_result(data, _validate(data, cuts))


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=hostile_files(), cuts=st.lists(st.integers(0, 10**6), max_size=4))
def test_validator_never_raises_on_hostile_files(data: bytes, cuts: list[int]) -> None:
    result = _validate(data, cuts)
    _check_result(data, result)
    if not result.ok:
        assert result.errors and all(e.line is not None for e in result.errors), result.errors


def _reserializable(line: bytes) -> bool:
    try:
        orjson.dumps(orjson.loads(line))
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return False
    return True


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(depth=st.integers(1, 1100))
def test_validator_accepts_only_lines_that_can_be_written_back(depth: int) -> None:
    line = line_text(extra=nested_json(depth).decode()).encode()
    result = _validate(line + b"\n", [])
    if result.ok:
        assert _reserializable(line), (depth, "accepted, but orjson cannot write it back")
    else:
        assert [(e.line, e.code) for e in result.errors] == [(1, "invalid_json_line")], result.errors
    if depth <= 32:  # ordinary nesting stays accepted
        assert result.ok, (depth, result.errors)


@pytest.mark.parametrize("cuts", [[], [1, 2]], ids=["one-chunk", "bom-split-across-chunks"])
def test_validator_accepts_a_bom(cuts: list[int]) -> None:
    result = _validate(BOM + jsonl([chat_line(0), chat_line(1)]), cuts)
    assert result.ok, result.errors
    assert result.total_lines == 2
    assert result.shards[0].start == len(BOM)
