"""Shard planning across a whole file (domain/planning.py through the validator)."""

from __future__ import annotations

import random
from collections import Counter

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from batchyard.domain.ordering import group_key
from batchyard.domain.planning import ShardPlan, Span, pack_spans, unpack_spans
from batchyard.domain.validation import BatchValidator, iter_lines


def chat_line(cid: str, system: str | None, user: str) -> bytes:
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user}
    ]
    body = {"model": "m", "messages": messages}
    return orjson.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body})


def plan(data: bytes, shard_lines: int, planning: bool = True, chunk: int = 1 << 16) -> list[ShardPlan]:
    v = BatchValidator(
        "/v1/chat/completions", lambda m: True, shard_lines=shard_lines, prefix_planning=planning
    )
    for i in range(0, len(data), chunk):
        v.feed(data[i : i + chunk])
    result = v.finish()
    assert result.ok, result.errors
    return result.shards


def shard_lines(data: bytes, shard: ShardPlan) -> list[tuple[int, bytes]]:
    """What a worker reads for a shard: each span's bytes, numbered from the span's first line."""
    return [pair for s in shard.ranges() for pair in iter_lines(data[s.start : s.end], s.first_line)]


def all_lines(data: bytes) -> list[tuple[int, bytes]]:
    return list(iter_lines(data, 1))


def test_lines_of_a_prompt_spread_over_a_file_land_together() -> None:
    rng = random.Random(7)
    systems = [f"You are assistant {k}. " * 40 for k in range(4)]
    lines = [chat_line(f"r{i}", systems[rng.randrange(4)], f"question {i}") for i in range(400)]
    data = b"\n".join(lines) + b"\n"

    contiguous = plan(data, 100, planning=False)
    planned = plan(data, 100)
    assert len(contiguous) == 4
    groups_per_shard = [
        len({group_key(orjson.loads(raw)["body"]) for _, raw in shard_lines(data, s)}) for s in contiguous
    ]
    assert groups_per_shard == [4, 4, 4, 4]  # every contiguous shard mixes all four prompts

    # Planned: each shard holds one prompt, except where a group ends and the next begins
    shards_of_group: dict[str | None, set[int]] = {}
    for s in planned:
        assert s.line_count == len(shard_lines(data, s)) <= 100
        for _, raw in shard_lines(data, s):
            shards_of_group.setdefault(group_key(orjson.loads(raw)["body"]), set()).add(s.index)
    for indexes in shards_of_group.values():
        assert max(indexes) - min(indexes) + 1 == len(indexes)  # consecutive shards
    assert sum(len(v) for v in shards_of_group.values()) <= len(planned) + 3

    # Nothing lost, nothing twice, line numbers kept
    assert sorted(p for s in planned for p in shard_lines(data, s)) == all_lines(data)
    assert [s.index for s in planned] == list(range(len(planned)))


def test_a_file_whose_groups_already_sit_in_one_shard_keeps_its_contiguous_plan() -> None:
    lines = [chat_line(f"r{i}", f"prompt {i // 50}", f"q{i}") for i in range(200)]
    data = b"\n".join(lines) + b"\n"
    assert plan(data, 50) == plan(data, 50, planning=False)


def test_lines_without_a_shared_context_keep_the_contiguous_plan() -> None:
    # one message each (nothing before the last message), and system prompts that no two lines share
    lines = [chat_line(f"a{i}", None, "same question") for i in range(100)]
    lines += [chat_line(f"b{i}", f"unique {i}", "q") for i in range(100)]
    data = b"\n".join(lines) + b"\n"
    assert plan(data, 30) == plan(data, 30, planning=False)


def test_ungrouped_lines_stay_in_their_shards_around_the_regrouped_ones() -> None:
    # shard 0: a1 x x a2 ; shard 1: x a3 x x  (shard_lines 4; "x" lines have no group)
    rows = [
        ("a1", "A"),
        ("x1", None),
        ("x2", None),
        ("a2", "A"),
        ("x3", None),
        ("a3", "A"),
        ("x4", None),
        ("x5", None),
    ]
    data = b"".join(chat_line(c, s, c) + b"\n\n" for c, s in rows)  # blank lines between: numbering must hold
    planned = plan(data, 4)
    ids = [[orjson.loads(raw)["custom_id"] for _, raw in shard_lines(data, s)] for s in planned]
    assert ids == [["a1", "a2", "a3"], ["x1", "x2"], ["x3", "x4", "x5"]]
    assert [s.line_count for s in planned] == [3, 2, 3]
    assert sorted(p for s in planned for p in shard_lines(data, s)) == all_lines(data)


def test_the_last_line_without_a_newline_and_a_byte_order_mark() -> None:
    rows = [chat_line(f"r{i}", "AB"[i % 2], f"q{i}") for i in range(9)]
    data = b"\xef\xbb\xbf" + b"\n".join(rows)  # BOM first, no newline at the end
    planned = plan(data, 3, chunk=7)
    for s in planned:
        assert all(0 < sp.start < sp.end <= len(data) for sp in s.ranges())
    got = sorted(p for s in planned for p in shard_lines(data, s))
    assert got == list(iter_lines(data[3:], 1))
    ids = [[orjson.loads(raw)["custom_id"] for _, raw in shard_lines(data, s)] for s in planned]
    # a group larger than a shard is cut into near-equal parts, each a shard of its own: no shard holds the end
    # of one group and the start of another (each side of such a cut prefills both prompts)
    assert ids == [["r0", "r2", "r4"], ["r6", "r8"], ["r1", "r3"], ["r5", "r7"]]


def test_a_group_that_fits_a_shard_is_never_cut_and_small_groups_share_shards() -> None:
    rng = random.Random(3)
    sizes = {"A": 17, "B": 23, "C": 20, "D": 3, "E": 2, "F": 41}
    rows = [s for s, n in sizes.items() for _ in range(n)]
    rng.shuffle(rows)
    data = b"".join(chat_line(f"r{i}", f"prompt {s} " * 20, f"q{i}") + b"\n" for i, s in enumerate(rows))
    planned = plan(data, 20)
    assert sorted(p for s in planned for p in shard_lines(data, s)) == all_lines(data)
    shards_of: dict[str, list[int]] = {}
    per_shard: list[Counter[str]] = []
    for s in planned:
        got = Counter(rows[int(orjson.loads(raw)["custom_id"][1:])] for _, raw in shard_lines(data, s))
        per_shard.append(got)
        for group in got:
            shards_of.setdefault(group, []).append(s.index)
        assert s.line_count <= 20
    for group in ("A", "C", "D", "E"):  # each fits a shard: one shard each
        assert len(shards_of[group]) == 1, (group, shards_of)
    assert sorted(per_shard[i]["B"] for i in shards_of["B"]) == [11, 12]  # 23 lines: two near-equal parts
    assert sorted(per_shard[i]["F"] for i in shards_of["F"]) == [13, 14, 14]
    for group in ("B", "F"):  # the parts of a cut group hold nothing else
        assert all(set(per_shard[i]) == {group} for i in shards_of[group])
    assert shards_of["D"] == shards_of["E"] or len(per_shard[shards_of["D"][0]]) > 1  # small ones fill in


def test_spans_pack_and_unpack() -> None:
    spans = (Span(3, 10, 1), Span(2**40, 2**40 + 5, 2**33))
    assert unpack_spans(pack_spans(spans)) == spans
    assert pack_spans(()) is None and unpack_spans(None) == ()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([None, "A", "B", "C", "solo"]), st.booleans()), min_size=1, max_size=60
    ),
    st.integers(1, 9),
    st.integers(1, 50),
)
def test_any_file_every_line_once_and_shards_within_their_bound(
    rows: list[tuple[str | None, bool]], per_shard: int, chunk: int
) -> None:
    parts = []
    solo = Counter[int]()
    for i, (system, blank_after) in enumerate(rows):
        if system == "solo":
            solo[i] += 1
            system = f"solo {i}"  # a group of one line: never regrouped
        parts.append(chat_line(f"r{i}", system, f"q{i}") + (b"\n \n" if blank_after else b"\n"))
    data = b"".join(parts)
    planned = plan(data, per_shard, chunk=chunk)
    assert sorted(p for s in planned for p in shard_lines(data, s)) == all_lines(data)
    for s in planned:
        assert 1 <= s.line_count == len(shard_lines(data, s)) <= per_shard
        spans = s.ranges()
        assert s.start == min(x.start for x in spans) and s.end == max(x.end for x in spans)


def test_a_file_sharing_one_prompt_costs_one_run_a_shard_and_keeps_its_plan() -> None:
    lines = [chat_line(f"r{i}", "You are terse.", f"q{i}") for i in range(1000)]
    data = b"\n".join(lines) + b"\n"
    v = BatchValidator("/v1/chat/completions", lambda m: True, shard_lines=100, prefix_planning=True)
    v.feed(data)
    planner = v._planner
    assert planner is not None
    assert len(planner.group) == 10  # one run a contiguous shard, not one entry a line
    assert v.finish().shards == plan(data, 100, planning=False)
