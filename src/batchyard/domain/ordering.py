"""Prefix-aware ordering: dispatch together the requests that share a prompt prefix.

Servers with prefix caching (vLLM, SGLang) keep the KV cache of recent prompts; requests that start with the same
system prompt and first messages reuse it when they run close together. Sorting a shard's requests by their prompt
text (model first) puts requests with a common prefix next to each other, longest shared prefixes closest. The sort
is stable, so requests with equal keys keep their file order.
"""

from __future__ import annotations

from typing import Any

KEY_CHARS = 4096
_MAX_PARTS_DEPTH = 4


def _text(value: Any, depth: int = 0) -> str:
    """The text of a prompt, content, or list of content parts; nesting beyond a few levels holds no prompt text
    a server would cache (and is a tenant's to make as deep as it likes): it is not walked."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and depth < _MAX_PARTS_DEPTH:  # content parts, or a list of prompts
        return "".join(_text(v.get("text", "") if isinstance(v, dict) else v, depth + 1) for v in value)
    return ""


def prefix_key(body: dict[str, Any]) -> str:
    """The text a request's prompt starts with (bounded), prefixed by its model."""
    parts: list[str] = [str(body.get("model", ""))]
    for field in ("instructions", "input", "prompt"):
        if field in body and not isinstance(body.get(field), list | dict):
            parts.append(_text(body.get(field)))
    messages = body.get("messages")
    if not isinstance(messages, list):
        inp = body.get("input")
        messages = inp if isinstance(inp, list) else []
    size = 0
    for m in messages:
        if size > KEY_CHARS:
            break
        if isinstance(m, dict):
            piece = f"{m.get('role', '')}:{_text(m.get('content'))}\x1e"
            parts.append(piece)
            size += len(piece)
    return "\x00".join(parts)[:KEY_CHARS]


def prefix_order(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Requests (parsed input lines) reordered so that shared prompt prefixes are adjacent."""
    return sorted(requests, key=lambda r: prefix_key(r.get("body") or {}))
