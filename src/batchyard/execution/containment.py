"""Where failures stop: what a dependency outage and an unexpected error do to a worker loop.

The worker never dies of the work it does (DESIGN.md, "Failure is contained per item"):

- a line that fails, fails alone (the shard runner's lanes turn any error into that line's error line);
- a shard attempt that fails for a reason other than a lost lease is handed back and counted; at
  `QUARANTINE_AFTER` counted failures its lines end as `shard_quarantined` error lines;
- a dependency that is down (the blob store, the metadata store, the disk: `DEPENDENCY_ERRORS`) pauses the work
  that needs it: the shard is handed back with a short `retry_at`, the loop waits with a bounded exponential backoff
  (`Backoff`, 0.5 s doubling to 10 s, 5 s for shards) and logs once per interval; while it lasts, a shard runner
  probes the blob store (`BlobStore.probe`) before it claims a shard, so no line is sent whose result could not be
  stored; everything resumes when the dependency is back.
"""

from __future__ import annotations

import logging

from batchyard.domain.retry import backoff_delay
from batchyard.errors import BlobError, BlobNotFound, StoreError
from batchyard.throttled_log import ThrottledLog

# The metadata store, the blob store and the operating system (disk full, connection refused, a timeout).
DEPENDENCY_ERRORS: tuple[type[BaseException], ...] = (StoreError, BlobError, OSError)
QUARANTINE_AFTER = 3  # counted failures of a shard before its lines end as error lines


def is_outage(e: BaseException) -> bool:
    """A dependency error that waiting may cure: not a blob that is missing for good (BlobNotFound)."""
    return isinstance(e, DEPENDENCY_ERRORS) and not isinstance(e, BlobNotFound)


def failure_delay(failures: int) -> float:
    """How long a shard whose attempt failed (for the `failures`-th time before this one) is not claimed: 1 s,
    2 s, 4 s, ... up to 30 s, so that one that fails at once every time never keeps a worker busy."""
    return float(min(30, 2**failures))


def describe(e: BaseException, limit: int = 500) -> str:
    """An error in one bounded line, for logs and for `last_error` (no traceback, no unbounded message)."""
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Backoff:
    """Bounded exponential backoff for one loop (`retry.backoff_delay`: base, 2·base, ... up to cap, with jitter),
    and its throttled log: `failed(e)` gives the next delay and says so at most once per interval; `ok()` ends
    the outage (saying so once, when there was one)."""

    def __init__(self, what: str, logger: logging.Logger, *, base: float = 0.5, cap: float = 10.0) -> None:
        self.what = what
        self.base = base
        self.cap = cap
        self.failures = 0
        self._log = ThrottledLog(logger)

    def failed(self, e: BaseException) -> float:
        delay = backoff_delay(self.failures, None, base=self.base, cap=self.cap)
        self.failures += 1
        self._log.log(
            logging.WARNING, "paused", "%s paused: %s; retrying in %.1f s", self.what, describe(e), delay
        )
        return delay

    def ok(self) -> None:
        if self.failures:
            self._log.logger.warning("%s resumed after %d failed tries", self.what, self.failures)
        self.failures = 0
        self._log.forget("paused")


class Paused(Exception):
    """A unit of work was handed back because a dependency is down; the loop should wait `delay` seconds."""

    def __init__(self, delay: float, cause: BaseException) -> None:
        super().__init__(describe(cause))
        self.delay = delay
        self.cause = cause
