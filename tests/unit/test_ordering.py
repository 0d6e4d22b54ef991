"""Prefix-aware ordering of a shard's requests."""

from __future__ import annotations

from typing import Any

from batchyard.domain.ordering import (
    WAIT,
    Prefixes,
    PrefixScheduler,
    group_hash,
    group_key,
    prefix_key,
    prefix_order,
)


def chat(cid: str, system: str, user: str, model: str = "m") -> dict[str, Any]:
    return {
        "custom_id": cid,
        "body": {
            "model": model,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        },
    }


def test_requests_sharing_a_system_prompt_become_adjacent_and_stable() -> None:
    reqs = [
        chat("1", "You are A.", "q1"),
        chat("2", "You are B.", "q2"),
        chat("3", "You are A.", "q3"),
        chat("4", "You are B.", "q4"),
        chat("5", "You are A.", "q1"),
    ]
    order = [r["custom_id"] for r in prefix_order(reqs)]
    assert order == ["1", "5", "3", "2", "4"]  # A's together, longest shared prefix closest; B's together


def test_models_are_not_mixed() -> None:
    reqs = [chat("1", "S", "x", model="b"), chat("2", "S", "x", model="a"), chat("3", "S", "y", model="b")]
    assert [r["custom_id"] for r in prefix_order(reqs)] == ["2", "1", "3"]


def test_equal_keys_keep_file_order() -> None:
    reqs = [chat(str(i), "S", "same") for i in range(10)]
    assert [r["custom_id"] for r in prefix_order(reqs)] == [str(i) for i in range(10)]


def test_content_parts_completions_and_responses_have_keys() -> None:
    parts = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]}
    assert prefix_key(parts) == ("m", "user", "hello")
    assert prefix_key({"model": "m", "prompt": "once upon"}) == ("m", "once upon")
    assert prefix_key({"model": "m", "instructions": "sys", "input": "hi"}) == ("m", "sys", "hi")
    assert prefix_key({"model": "m", "input": [{"role": "user", "content": "hi"}]}) == ("m", "user", "hi")
    assert prefix_key({}) == ("",)
    hostile = {"model": "m", "messages": [{"role": ["x"], "content": {"a": 1}}, "not a message", {"role": 7}]}
    assert prefix_key(hostile) == (
        "m",
        "['x']",
        "",
        "7",
        "",
    )  # any JSON: strings only, so keys always compare


def test_key_is_bounded() -> None:
    huge = chat("1", "x" * 100_000, "y")
    assert sum(map(len, prefix_key(huge["body"]))) <= 4096 + 64
    many = {"model": "m", "messages": [{"role": "user", "content": "x" * 100}] * 10_000}
    assert len(prefix_key(many)) < 2 * 4096 // 100 + 4  # the messages past the bound are not looked at


def test_a_prompt_within_the_bound_is_not_copied_into_its_key() -> None:
    req = chat("1", "s" * 3000, "u" * 500)
    key = prefix_key(req["body"])
    assert key[2] is req["body"]["messages"][0]["content"] and key[4] is req["body"]["messages"][1]["content"]


# -- PrefixScheduler: one first line per group, then the group; lanes keep to their group ------------------------


def grouped(n_groups: int, per_group: int) -> list[dict[str, Any]]:
    return prefix_order(
        [
            chat(f"{g}-{i}", f"system prompt {g}", f"question {i}")
            for i in range(per_group)
            for g in range(n_groups)
        ]
    )


def test_a_groups_first_line_goes_alone_and_the_rest_waits_for_it() -> None:
    s = PrefixScheduler(grouped(1, 5))
    first = s.take(0)
    assert first["custom_id"] == "0-0"  # the first in prefix order (its user message sorts first)
    assert s.take(1) is WAIT and s.take(2) is WAIT  # the prefix is not cached yet: nobody else sends it
    assert s.done(0, first)  # it came back: the group is open
    taken = [s.take(lane) for lane in (0, 1, 2)]
    assert all(isinstance(t, dict) for t in taken)
    assert s.take(3)["custom_id"].startswith("0-") and s.take(3) is None


def test_each_lane_starts_its_own_group_and_keeps_to_it() -> None:
    s = PrefixScheduler(grouped(4, 3))
    firsts = {lane: s.take(lane) for lane in range(4)}
    groups = {lane: r["custom_id"].split("-")[0] for lane, r in firsts.items()}
    assert sorted(groups.values()) == ["0", "1", "2", "3"]  # four lanes, four groups, four prefills
    for lane, r in firsts.items():
        s.done(lane, r)
    for lane in range(4):
        for _ in range(2):  # the rest of its own group, on the slot that holds its prefix
            r = s.take(lane)
            assert r["custom_id"].split("-")[0] == groups[lane]
            s.done(lane, r)
    assert all(s.take(lane) is None for lane in range(4))


def test_a_lane_without_a_group_to_start_joins_the_largest_open_one() -> None:
    s = PrefixScheduler(grouped(1, 6))
    first = s.take(0)
    s.done(0, first)
    assert s.take(1)["custom_id"].startswith("0-")  # no other group: share this one


def test_lines_sharing_nothing_are_never_held() -> None:
    reqs = [
        {"custom_id": str(i), "body": {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}}
        for i in range(5)
    ]
    s = PrefixScheduler(reqs)
    assert [s.take(i)["custom_id"] for i in range(5)] == ["0", "1", "2", "3", "4"]
    assert s.take(0) is None


def test_drain_lifts_the_holds() -> None:
    s = PrefixScheduler(grouped(1, 3))
    s.take(0)
    assert s.take(1) is WAIT
    s.drain()  # the batch stopped: the remaining lines are only recorded
    assert isinstance(s.take(1), dict) and isinstance(s.take(2), dict) and s.take(2) is None


def test_group_key_is_the_shared_context() -> None:
    a = chat("1", "sys", "q1")["body"]
    b = chat("2", "sys", "q2")["body"]
    assert group_key(a) == group_key(b) is not None
    assert group_key(chat("3", "other", "q1")["body"]) != group_key(a)
    assert group_key({"model": "m", "messages": [{"role": "user", "content": "q"}]}) is None
    assert group_key({"model": "m", "input": "x", "instructions": "be brief"}) is not None


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_two_shards_of_one_group_prefill_it_once() -> None:
    shared = Prefixes()
    a, b = PrefixScheduler(grouped(1, 4), shared), PrefixScheduler(grouped(1, 4), shared)
    first = a.take(0)
    assert isinstance(first, dict)
    assert b.take(0) is WAIT  # shard b's copy of the group waits for shard a's first line
    assert a.done(0, first)  # it came back (the runner wakes every shard's lanes)
    got = [b.take(lane) for lane in range(4)]  # now all of b's lines go, none of them alone
    assert all(isinstance(r, dict) for r in got) and b.take(0) is None
    assert isinstance(PrefixScheduler(grouped(1, 2), shared).take(0), dict)  # a later shard starts warm
    c = PrefixScheduler(grouped(1, 2), shared)
    c.take(0)
    assert isinstance(c.take(1), dict)  # warm: no line of it is held back


def test_a_first_line_given_up_by_its_shard_is_sent_by_another() -> None:
    shared = Prefixes()
    a, b = PrefixScheduler(grouped(1, 3), shared), PrefixScheduler(grouped(1, 3), shared)
    assert isinstance(a.take(0), dict)
    assert b.take(0) is WAIT
    a.close()  # shard a's attempt ended (lost lease, stop) with its first line in flight
    first = b.take(0)
    assert isinstance(first, dict) and b.take(1) is WAIT  # b starts the group itself, first line alone
    assert b.done(0, first) and isinstance(b.take(1), dict)


def test_a_stalled_prefill_and_an_old_warm_entry_stop_counting() -> None:
    clock = FakeClock()
    shared = Prefixes(ttl=10.0, stale=5.0, clock=clock)
    a, b = PrefixScheduler(grouped(1, 3), shared), PrefixScheduler(grouped(1, 3), shared)
    first = a.take(0)
    assert b.take(0) is WAIT
    clock.now = 6.0  # shard a stalled past `stale`: b does not wait for it any more
    assert isinstance(b.take(0), dict) and b.take(1) is WAIT
    a.done(0, first)
    clock.now = 17.0  # warm entries expire after `ttl`: a new shard's first line goes alone again
    c = PrefixScheduler(grouped(1, 3), shared)
    assert isinstance(c.take(0), dict) and c.take(1) is WAIT


def test_group_hash_groups_as_group_key_does() -> None:
    a, b, c = chat("1", "sys", "q1")["body"], chat("2", "sys", "q2")["body"], chat("3", "other", "q1")["body"]
    assert group_hash(a) == group_hash(b) is not None and group_hash(c) != group_hash(a)
    assert group_hash({"model": "m", "messages": [{"role": "user", "content": "q"}]}) is None
    parts = {"model": "m", "messages": [{"role": "system", "content": [{"type": "text", "text": "s"}]}, {}]}
    assert group_hash(parts) == hash(group_key(parts))  # content parts: through group_key's text
    odd = {"model": "m", "messages": ["not an object", {"role": "user", "content": "q"}]}
    assert group_hash(odd) == hash(group_key(odd) or "")
    assert group_hash({"model": "m", "instructions": "be brief", "input": "x"}) is not None


def test_group_hash_fast_path_is_the_general_hash() -> None:
    body = chat("1", "sys", "q")["body"]
    three = {
        **body,
        "messages": [*body["messages"][:1], {"role": "user", "content": "q"}, body["messages"][1]],
    }
    two_of_three = {**three, "messages": three["messages"][:1] + three["messages"][2:]}
    assert group_hash(two_of_three) == group_hash(body)  # same context
    assert group_hash(three) != group_hash(body)  # a longer context
