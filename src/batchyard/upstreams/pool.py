"""Several upstreams for one model: weights, health (ejection and probing back), request/token rate limits.

A `Member` is one upstream as the dispatcher sees it: its own concurrency limiter (fixed or adaptive), a health
record, optional RPM/TPM buckets and attempt timeout. `pick` chooses a member for one attempt: the healthy one with
the most free capacity relative to its weight; an ejected member gets a single probe request once its ejection ends.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from batchyard.upstreams.base import Upstream
from batchyard.upstreams.limiter import Limiter

EJECT_AFTER = 5  # consecutive failures (connection errors, timeouts, 5xx)
EJECT_BASE_S = 5.0
EJECT_MAX_S = 60.0


@dataclass(slots=True)
class Health:
    failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    probing: bool = False

    def available(self, now: float) -> bool:
        if now < self.ejected_until:
            return False
        return not (self.ejections and self.probing)  # half-open: one probe at a time

    def on_attempt(self, now: float) -> None:
        if self.ejections and now >= self.ejected_until:
            self.probing = True

    def on_result(self, ok: bool, now: float) -> None:
        self.probing = False
        if ok:
            self.failures = 0
            self.ejections = 0
            return
        self.failures += 1
        if self.ejections or self.failures >= EJECT_AFTER:
            self.ejections += 1
            self.ejected_until = now + min(EJECT_MAX_S, EJECT_BASE_S * 2 ** (self.ejections - 1))


class TokenBucket:
    """`rate` units per second, bursts up to `capacity`; `take` waits until the units are there."""

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, per_minute / 60.0 * 5)  # a 5-second burst
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: float = 1.0) -> None:
        n = min(n, self.capacity)
        async with self._lock:  # FIFO: one waiter refills at a time
            while True:
                now = time.monotonic()
                self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= n:
                    self._tokens -= n
                    return
                await asyncio.sleep((n - self._tokens) / self.rate)


@dataclass(eq=False)
class Member:
    upstream: Upstream
    limiter: Limiter  # its own concurrency limit, made with it (fixed, or adaptive: see limiter.py)
    weight: float = 1.0
    timeout: float | None = None  # None: the dispatcher's attempt timeout
    rpm: TokenBucket | None = None
    tpm: TokenBucket | None = None
    priority: int | None = (
        None  # sent as the request's `priority` (vLLM's priority scheduling) unless it has one
    )
    health: Health = field(default_factory=Health)

    @property
    def name(self) -> str:
        return self.upstream.name


def healthier_exists(member: Member, members: list[Member], now: float | None = None) -> bool:
    """True when `member` is ejected and another member of its group is not (a queued line should move)."""
    now = time.monotonic() if now is None else now
    return not member.health.available(now) and any(
        m.health.available(now) for m in members if m is not member
    )


def pick(members: list[Member], now: float | None = None) -> Member:
    """The member for the next attempt. Healthy members by free capacity per weight; if every member is ejected,
    the one whose ejection ends first (so lines keep moving toward an answer or an error)."""
    now = time.monotonic() if now is None else now
    if len(members) == 1:
        return members[0]
    healthy = [m for m in members if m.health.available(now)]
    if not healthy:
        return min(members, key=lambda m: m.health.ejected_until)

    def load(m: Member) -> float:
        used = (m.limiter.pending + 1) / m.limiter.limit
        return used / max(m.weight, 1e-9)

    return min(healthy, key=load)
