"""Prefix-aware ordering of a shard's requests."""

from __future__ import annotations

from typing import Any

from batchyard.domain.ordering import prefix_key, prefix_order


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
    assert "hello" in prefix_key(parts)
    assert "once upon" in prefix_key({"model": "m", "prompt": "once upon"})
    assert "sys" in prefix_key({"model": "m", "instructions": "sys", "input": "hi"})
    assert "hi" in prefix_key({"model": "m", "input": [{"role": "user", "content": "hi"}]})
    assert prefix_key({}) == ""


def test_key_is_bounded() -> None:
    huge = chat("1", "x" * 100_000, "y")
    assert len(prefix_key(huge["body"])) <= 4096
