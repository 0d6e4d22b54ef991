"""JSON in and out of the worker, exact and bounded: what a tenant sends or an upstream answers never breaks it.

orjson is the fast path everywhere. Where it would change or refuse a value, the slow path keeps it exact:

- integers beyond 64 bits: orjson reads them as floats (a tenant's `seed` of 2**70 would reach the upstream as
  1.1805916207174113e+21) and cannot write them; a line holding a run of 20 or more digits is read with the
  standard library instead (exact Python ints), and a body that orjson cannot write is written by it too;
- nesting: orjson reads 1024 levels but writes only 254, and recursive Python code over a deep value hits the
  interpreter's limit; validation therefore refuses request lines nested deeper than MAX_DEPTH (checked cheaply:
  a line with fewer brackets than that cannot be that deep), and upstream bodies are never re-serialized, only
  spliced into result lines (`compact_raw`).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

MAX_DEPTH = 128  # nesting levels of a request line (the line's own object is level 1)
# A run of 20 digits: a number orjson might not read exactly (u64's maximum has 20). Found by mapping every digit to
# "0" and everything else to " " and searching for 20 zeros: ~2 us for a 4 KB line, where the regular expression
# [0-9]{20} takes ~25 us (more than everything else the worker does with a line).
_DIGITS = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_RUN = b"0" * 20
_NOT_DIGITS = bytes(i for i in range(256) if not 0x30 <= i <= 0x39)


def has_long_digit_run(raw: bytes) -> bool:
    # Most lines hold fewer than 20 digits in all: counted by deleting every other byte (~1.3 us for 4 KB, where
    # mapping and searching take ~2.3 us), they need no search.
    return len(raw.translate(None, _NOT_DIGITS)) >= 20 and _RUN in raw.translate(_DIGITS)


def loads(raw: bytes) -> Any:
    """A request line parsed exactly (raises orjson.JSONDecodeError / ValueError on invalid JSON)."""
    obj = orjson.loads(raw)
    if has_long_digit_run(raw):  # maybe an integer past 64 bits: orjson gave a float for it
        return json.loads(raw)
    return obj


def dumps(obj: Any) -> bytes:
    """Compact JSON for a value read by `loads` (exact integers of any size)."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # orjson.JSONEncodeError: an integer past 64 bits, or deeper than orjson writes
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def depth_exceeds(buf: bytes, start: int, end: int, obj: Any, limit: int = MAX_DEPTH) -> bool:
    """True when `obj`, parsed from `buf[start:end]`, nests arrays/objects more than `limit` levels deep."""
    if buf.count(b"[", start, end) + buf.count(b"{", start, end) <= limit:
        return False  # each level opens a bracket: too few of them for that depth (two C scans, no walk)
    return nested_deeper(obj, limit)


def nested_deeper(obj: Any, limit: int = MAX_DEPTH) -> bool:
    """True when `obj` nests arrays/objects more than `limit` levels deep (iterative: no recursion limit)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, dict | list))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, dict | list))
    return False


def compact_raw(raw: bytes) -> bytes:
    """A valid JSON text on one line, byte for byte otherwise: in valid JSON a CR or LF can only be whitespace
    between tokens (inside strings they must be escaped), so each is replaced by a space."""
    raw = raw.strip()
    if b"\n" in raw or b"\r" in raw:
        raw = raw.replace(b"\r", b" ").replace(b"\n", b" ")
    return raw
