"""The waiters of a limiter, served in weighted fair order by key (start-time fair queuing) instead of one FIFO.

Each key (a batch's owner: a project) is a flow with its own FIFO of waiters and a weight. A flow's head carries a
virtual start tag; the flow with the smallest tag is served next (ties: the flow that has waited longest as a flow),
and serving it moves its tag on by 1/weight. With every flow backlogged, a flow of weight 3 is served three times
for every once of a flow of weight 1, whatever the number of waiters of each; a flow that goes idle and comes back
starts at the current virtual time (no credit saved up while idle, and none lost by a short gap: its tag never goes
back). Waiters without a key form one flow of weight 1, so a limiter used without keys stays a plain FIFO.
"""

from __future__ import annotations

import asyncio
from collections import deque

Waiter = asyncio.Future[None]


class FairQueue:
    """Futures waiting for a slot, by key; `popleft` gives the next one in weighted fair order."""

    def __init__(self) -> None:
        self._flows: dict[str | None, deque[Waiter]] = {}  # keys with waiters, in the order they became busy
        self._weights: dict[str | None, float] = {}
        self._tags: dict[str | None, float] = {}  # start tag of each flow's head (kept a while once idle)
        self._now = 0.0  # virtual time: the tag of the flow served last
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __contains__(self, fut: Waiter) -> bool:
        return any(fut in q for q in self._flows.values())

    def append(self, fut: Waiter, key: str | None = None, weight: float = 1.0) -> None:
        q = self._flows.get(key)
        if q is None:
            q = self._flows[key] = deque()
            self._tags[key] = max(self._tags.get(key, self._now), self._now)
        self._weights[key] = weight if weight > 0 else 1.0
        q.append(fut)
        self._len += 1

    def remove(self, fut: Waiter) -> None:
        for key, q in self._flows.items():
            if fut in q:
                q.remove(fut)
                self._len -= 1
                if not q:
                    del self._flows[key]
                return
        raise ValueError("not waiting")

    def popleft(self) -> Waiter:
        if not self._flows:
            raise IndexError("no waiters")
        key = min(self._flows, key=self._tags.__getitem__)  # the first of equal tags: the longest busy
        q = self._flows[key]
        fut = q.popleft()
        self._len -= 1
        self._now = self._tags[key]
        self._tags[key] += 1.0 / self._weights[key]
        if not q:
            del self._flows[key]
            self._forget_idle()
        return fut

    def _forget_idle(self) -> None:
        """Idle flows whose tag the virtual time has passed would start at `_now` anyway: drop them."""
        if len(self._tags) > 2 * len(self._flows) + 64:
            for k in [k for k, t in self._tags.items() if k not in self._flows and t <= self._now]:
                del self._tags[k]
                self._weights.pop(k, None)
