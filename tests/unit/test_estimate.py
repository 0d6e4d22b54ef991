"""The dry run's input-token estimate (domain/estimate.py)."""

from __future__ import annotations

from batchyard.domain.estimate import input_tokens


def test_chat_messages_count_their_text_and_framing() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "system", "content": "a" * 8}, {"role": "user", "content": "b" * 5}],
    }
    assert input_tokens(body) == 4 + 2 * 4  # 13 characters -> 4 tokens, 2 messages


def test_parts_inputs_and_prompts() -> None:
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "c" * 16}]}]}
    assert input_tokens(parts) == 4 + 4
    assert input_tokens({"input": ["abcd", "efgh"]}) == 2
    assert input_tokens({"prompt": "x" * 9, "max_tokens": 99}) == 3
    assert input_tokens({"model": "m"}) == 0
