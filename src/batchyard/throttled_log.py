"""A log line per ongoing condition, not per occurrence: an outage fails every request and every retry, and a log
that says so each time buries everything else (a diagnostic run during development saw 81 ERROR lines in the 8 s
of a PostgreSQL restart)."""

from __future__ import annotations

import logging
import time

EVERY = 30.0  # seconds between two lines about the same thing


class ThrottledLog:
    """Says one thing (a `key`) at most once per `every` seconds, and how many times it kept quiet since."""

    def __init__(self, logger: logging.Logger, every: float = EVERY) -> None:
        self.logger = logger
        self.every = every
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return
        more = self._quiet.pop(key, 0)
        suffix = f" ({more} more since the last report)" if more else ""
        self.logger.log(level, msg + "%s", *args, suffix)
        self._last[key] = now

    def forget(self, key: str) -> None:
        """The condition ended: the next occurrence is logged at once."""
        self._last.pop(key, None)
        self._quiet.pop(key, None)
