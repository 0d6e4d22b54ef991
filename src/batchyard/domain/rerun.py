"""Which lines a retry batch (`POST /v1/batches/{id}/retry`, a batchyard extension) takes from an ended batch: pure.

A line of the error file is picked when no codes are asked for, or when one of its codes is: `error.code` for a line
that got no HTTP answer (`batch_expired`, `request_timeout`, ...), else the HTTP status as text (`"429"`) and the
upstream body's `error.code` when it has one.
"""

from __future__ import annotations

from typing import Any

import orjson

MAX_CODES = 64
MAX_CODE_CHARS = 128


def line_codes(line: dict[str, Any]) -> set[str]:
    codes: set[str] = set()
    error = line.get("error")
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        codes.add(error["code"])
    response = line.get("response")
    if isinstance(response, dict):
        if isinstance(response.get("status_code"), int):
            codes.add(str(response["status_code"]))
        body = response.get("body")
        inner = body.get("error") if isinstance(body, dict) else None
        if isinstance(inner, dict) and isinstance(inner.get("code"), str):
            codes.add(inner["code"])
    return codes


def picked(raw: bytes, codes: frozenset[str] | None) -> str | None:
    """The custom_id of an error-file line if the retry takes it, else None."""
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
        return None
    if codes is not None and not (line_codes(line) & codes):
        return None
    return str(line["custom_id"])


BOM = b"\xef\xbb\xbf"  # skipped at the start of an input file, as the validator does


def custom_id_of(raw: bytes) -> str | None:
    """The custom_id of an input line (None for a line that has none: it was not run, so it is not retried)."""
    try:
        line = orjson.loads(raw.removeprefix(BOM))
    except orjson.JSONDecodeError:
        return None
    cid = line.get("custom_id") if isinstance(line, dict) else None
    return cid if isinstance(cid, str) else None
