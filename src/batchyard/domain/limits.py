"""Limits of the Batch API and parsing of the values that carry them."""

from __future__ import annotations

import re

ENDPOINTS = ("/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/moderations")
MAX_INPUT_LINES = 50_000
MAX_BATCH_FILE_BYTES = 200 * 1024 * 1024
MAX_FILE_BYTES = 512 * 1024 * 1024
MAX_REPORTED_ERRORS = 100
METADATA_MAX_PAIRS = 16
METADATA_MAX_KEY = 64
METADATA_MAX_VALUE = 512
MAX_WINDOW_SECONDS = 7 * 24 * 3600
FILE_EXPIRY_MIN = 3600
FILE_EXPIRY_MAX = 2_592_000
BATCH_FILE_DEFAULT_EXPIRY = 30 * 24 * 3600
FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")

_WINDOW = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_completion_window(value: str) -> int | None:
    """Seconds for "24h" (OpenAI) or any "<n>s|m|h|d" up to 7 days (batchyard extension); None if invalid."""
    m = _WINDOW.fullmatch(value)
    if m is None:
        return None
    seconds = int(m.group(1)) * _UNIT[m.group(2)]
    if seconds > MAX_WINDOW_SECONDS:
        return None
    return seconds


def metadata_problem(metadata: object) -> str | None:
    """Why metadata is invalid, or None."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        return "metadata must be an object of string keys and string values."
    if len(metadata) > METADATA_MAX_PAIRS:
        return f"metadata can have at most {METADATA_MAX_PAIRS} pairs."
    for k, v in metadata.items():
        if not isinstance(k, str) or len(k) > METADATA_MAX_KEY:
            return f"metadata keys must be strings of at most {METADATA_MAX_KEY} characters."
        if not isinstance(v, str) or len(v) > METADATA_MAX_VALUE:
            return f"metadata values must be strings of at most {METADATA_MAX_VALUE} characters."
    return None
