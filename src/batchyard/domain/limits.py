"""Limits of the Batch API and parsing of the values that carry them."""

from __future__ import annotations

import re

ENDPOINTS = ("/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/moderations")
MAX_INPUT_LINES = 50_000
# Files OpenAI does not let anyone download again ("Not allowed to download files of purpose: user_data").
NO_DOWNLOAD_PURPOSES = ("assistants", "user_data")


def supported_endpoints() -> str:
    """The endpoints as OpenAI lists them in a message: "'/v1/a', '/v1/b', and '/v1/c'"."""
    quoted = [f"'{e}'" for e in ENDPOINTS]
    return ", ".join(quoted[:-1]) + ", and " + quoted[-1]


MAX_BATCH_FILE_BYTES = 200 * 1024 * 1024
MAX_FILE_BYTES = 512 * 1024 * 1024
METADATA_MAX_PAIRS = 16
METADATA_MAX_KEY = 64
METADATA_MAX_VALUE = 512
MAX_WINDOW_SECONDS = 7 * 24 * 3600
FILE_EXPIRY_MIN = 3600
FILE_EXPIRY_MAX = 2_592_000
BATCH_FILE_DEFAULT_EXPIRY = 30 * 24 * 3600
FILE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
# Per-key caps (defaults of the settings; 0 there means no limit).
MAX_STORED_BYTES_PER_KEY = 100 * 1000**3
MAX_FILES_PER_KEY = 10_000
MAX_PENDING_UPLOADS_PER_KEY = 100
MAX_ACTIVE_BATCHES_PER_KEY = 100
# String caps at the edge (what a client sends is stored and echoed in every listing: keep each bounded).
MAX_FILENAME_CHARS = 1024  # as the multipart parser's cap (a longer multipart filename is truncated there)
MAX_MIME_TYPE_CHARS = 255  # RFC 6838: type and subtype of at most 127 characters each
MAX_PURPOSE_CHARS = 64
# C0 controls and DEL: never part of a name, a type or a purpose (PostgreSQL refuses NUL in text outright).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# In metadata values a tab or a line break is ordinary text; the other controls are not.
_VALUE_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

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


def json_type(value: object) -> str:
    """How OpenAI names a JSON value's type in its messages ("an array", "null", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def metadata_problem(metadata: object) -> tuple[str, str, str] | None:
    """Why metadata is invalid, as OpenAI says it: (message, param, code); None when it is valid."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        return (
            f"Invalid type for 'metadata': expected an object, but got {json_type(metadata)} instead.",
            "metadata",
            "invalid_type",
        )
    if len(metadata) > METADATA_MAX_PAIRS:
        return (
            f"Invalid 'metadata': too many properties. Expected an object with at most {METADATA_MAX_PAIRS} "
            f"properties, but got an object with {len(metadata)} properties instead.",
            "metadata",
            "object_above_max_properties",
        )
    for k, v in metadata.items():
        if not isinstance(k, str) or len(k) > METADATA_MAX_KEY:
            return (
                f"Invalid 'metadata': keys must be strings of at most {METADATA_MAX_KEY} characters.",
                "metadata",
                "invalid_value",
            )
        param = f"metadata.{k}" if not has_control(k) else "metadata"
        if not isinstance(v, str):
            return (
                f"Invalid type for '{param}': expected a string, but got {json_type(v)} instead.",
                param,
                "invalid_type",
            )
        if len(v) > METADATA_MAX_VALUE:
            return (
                f"Invalid '{param}': string too long. Expected a string with maximum length "
                f"{METADATA_MAX_VALUE}, but got a string with length {len(v)} instead.",
                param,
                "string_above_max_length",
            )
        if has_control(k) or _VALUE_CONTROL.search(v) is not None:
            return (
                "Invalid 'metadata': keys and values must not contain control characters.",
                "metadata",
                "invalid_value",
            )
    return None


def has_control(value: str) -> bool:
    """Whether `value` holds a control character (C0 or DEL)."""
    return _CONTROL.search(value) is not None


def clean_filename(name: str) -> str:
    """A client's filename as stored: control characters (NUL included) become U+FFFD, the rest is kept verbatim."""
    return _CONTROL.sub("\ufffd", name)
