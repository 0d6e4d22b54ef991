"""Object identifiers: OpenAI-style prefixes with random, URL-safe suffixes."""

from __future__ import annotations

import secrets

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _suffix(n: int = 24) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def file_id() -> str:
    return f"file-{_suffix()}"


def batch_id() -> str:
    return f"batch_{_suffix()}"


def request_line_id() -> str:
    return f"batch_req_{secrets.token_hex(12)}"


def worker_id() -> str:
    return f"worker_{secrets.token_hex(6)}"
