"""Retry decisions for upstream calls, as pure functions (openai-python's rules)."""

from __future__ import annotations

import email.utils
import math
import random

RETRYABLE_STATUS = frozenset({408, 409, 429})
MAX_RETRY_AFTER = 60.0


def is_retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUS or status >= 500


def _finite(value: float) -> float | None:
    """A finite, non-negative number of seconds, or None (NaN, infinite)."""
    return max(0.0, value) if math.isfinite(value) else None


def _seconds(text: str, scale: float = 1.0) -> float | None:
    """A header's number of seconds (times `scale`), or None when it is not a finite number."""
    if len(text) > 32:  # a header value is the upstream's: never parse an unbounded one
        return None
    try:
        return _finite(float(text) * scale)
    except ValueError:
        return None


def parse_retry_after(headers: dict[str, str] | None, now: float) -> float | None:
    """Seconds to wait from `retry-after-ms`, `retry-after` (seconds or HTTP date); None if absent or invalid.

    The value is the upstream's and is never trusted: anything that is not a finite number or a date that
    `email.utils` can turn into a timestamp (the year 10000 cannot) counts as absent, and the caller caps what is
    left (`backoff_delay` honours at most MAX_RETRY_AFTER seconds, as openai-python does)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        value = _seconds(ms, 1 / 1000.0)
        if value is not None:
            return value
    ra = headers.get("retry-after")
    if ra is None:
        return None
    value = _seconds(ra)
    if value is not None:
        return value
    if len(ra) > 64:
        return None
    try:
        parsed = email.utils.parsedate_tz(ra)
        if parsed is None:
            return None
        return _finite(float(email.utils.mktime_tz(parsed)) - now)
    except (ValueError, OverflowError, OSError, TypeError):
        return None


def backoff_delay(
    retries_done: int,
    retry_after: float | None,
    *,
    base: float = 0.5,
    cap: float = 8.0,
    rng: random.Random | None = None,
) -> float:
    """Delay before the next try: Retry-After when it is a positive, reasonable wait (at most 60 s), else
    exponential backoff with jitter from `base` (openai-python's 0.5 s).

    "Retry-After: 0" asks for a retry at once; it gets a backoff from a tenth of `base` (50 ms, 100 ms, ...)
    instead: retrying at the same instant while the upstream is still full only buys another 429, and with several
    workers sharing an upstream a line could spin through all its retries within milliseconds."""
    if retry_after is not None and 0 < retry_after <= MAX_RETRY_AFTER:
        return retry_after
    if retry_after == 0:
        base /= 10
    r = (rng or random).random()
    delay = min(base * (2.0 ** min(retries_done, 60)), cap)  # no float overflow after very many tries
    return delay * (1.0 - 0.25 * r)
