"""An estimate of a request line's input tokens, for the dry run (`POST /v1/batches/validate`): pure.

Not a tokenizer: the text a request sends (message contents, `input`, `prompt`, `instructions`) counted at about
four characters a token, OpenAI's rule of thumb for English, plus a few tokens a message for its framing.
"""

from __future__ import annotations

from typing import Any

CHARS_PER_TOKEN = 4
PER_MESSAGE = 4  # role and separators of a chat message
_TEXT_FIELDS = ("messages", "input", "prompt", "instructions", "system")
_MAX_DEPTH = 32


def _chars(value: Any, depth: int = 0) -> tuple[int, int]:
    """(characters of text, messages) in a JSON value: every string, in lists and objects, but not their keys."""
    if depth > _MAX_DEPTH:
        return 0, 0
    if isinstance(value, str):
        return len(value), 0
    if isinstance(value, list):
        chars = msgs = 0
        for item in value:
            c, m = _chars(item, depth + 1)
            chars, msgs = chars + c, msgs + m + (1 if isinstance(item, dict) and "role" in item else 0)
        return chars, msgs
    if isinstance(value, dict):
        chars = msgs = 0
        for key, item in value.items():
            if key in ("role", "type", "name"):
                continue
            c, m = _chars(item, depth + 1)
            chars, msgs = chars + c, msgs + m
        return chars, msgs
    return 0, 0


def input_tokens(body: dict[str, Any]) -> int:
    chars = msgs = 0
    for name in _TEXT_FIELDS:
        if name in body:
            c, m = _chars(body[name])
            chars, msgs = chars + c, msgs + m
    return -(-chars // CHARS_PER_TOKEN) + PER_MESSAGE * msgs
