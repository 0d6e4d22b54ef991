"""Route a model name to its upstreams: exact names first, then glob patterns (in order), then the catch-all.

Several upstreams may serve the same pattern: they form a group that the dispatcher balances (see pool.py). Each
upstream is a `Member` with its own limiter, made when the router is built (see factory.py for the one built from
the settings).
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections.abc import Callable, Sequence

from batchyard.upstreams.base import Upstream
from batchyard.upstreams.limiter import AdaptiveLimiter, Limiter
from batchyard.upstreams.pool import Member

log = logging.getLogger(__name__)


class Router:
    def __init__(
        self,
        routes: Sequence[tuple[str | None, Upstream | Member]],
        *,
        limiter: Callable[[], Limiter] = AdaptiveLimiter,
    ) -> None:
        """`routes`: (model name, glob, or None/"*" for every model; its upstream). A bare `Upstream` becomes a
        `Member` with a limiter of its own from `limiter` (one per upstream, however many routes name it)."""
        self._exact: dict[str, list[Member]] = {}
        self._globs: dict[str, list[Member]] = {}  # insertion-ordered
        self._default: list[Member] = []
        wrapped: dict[int, Member] = {}
        for pattern, target in routes:
            if isinstance(target, Member):
                member = target
            elif id(target) in wrapped:
                member = wrapped[id(target)]
            else:
                member = wrapped[id(target)] = Member(target, limiter())
            if pattern is None or pattern == "*":
                group = self._default
            elif any(c in pattern for c in "*?["):
                group = self._globs.setdefault(pattern, [])
            else:
                group = self._exact.setdefault(pattern, [])
            if member not in group:
                group.append(member)
        self._listed: dict[int, tuple[float, list[str]]] = {}  # upstream -> (when, the ids it listed)

    def group(self, model: str) -> list[Member] | None:
        """Every upstream that serves `model` at the most specific matching level, or None."""
        if "\x00" in model:  # no backend names a model with NUL, and PostgreSQL text cannot hold it
            return None
        members = self._exact.get(model)
        if members:
            return members
        for pattern, group in self._globs.items():
            if fnmatch.fnmatchcase(model, pattern):
                return group
        return self._default or None

    def is_routable(self, model: str) -> bool:
        return self.group(model) is not None

    @property
    def members(self) -> list[Member]:
        seen: dict[int, Member] = {}
        for group in [*self._exact.values(), *self._globs.values(), self._default]:
            for m in group:
                seen.setdefault(id(m), m)
        return list(seen.values())

    def routes(self) -> list[tuple[str, Member]]:
        """(pattern, member) of every route, as `group` tries them: exact names, globs, then "*" (the catch-all)."""
        exact = [(name, m) for name, group in self._exact.items() for m in group]
        globs = [(pattern, m) for pattern, group in self._globs.items() for m in group]
        return [*exact, *globs, *(("*", m) for m in self._default)]

    @property
    def upstreams(self) -> list[Upstream]:
        seen: dict[int, Upstream] = {}
        for m in self.members:
            seen.setdefault(id(m.upstream), m.upstream)
        return list(seen.values())

    async def start(self) -> None:
        """Start every upstream (inside the event loop that will call them), and ask each engine how many requests
        it runs at once (`Upstream.engine_slots`; once, 2 s at most). An engine that says so is llama.cpp's server:
        its adaptive limit is held at or below its slots (what else that means, the upstream decides itself:
        HTTPUpstream.engine_slots)."""
        for up in self.upstreams:
            await up.start()
        members = self.members
        found = await asyncio.gather(*(m.upstream.engine_slots(timeout=2.0) for m in members))
        for member, slots in zip(members, found, strict=True):
            if slots is None:
                continue
            if isinstance(member.limiter, AdaptiveLimiter):
                member.limiter.hold_at_most(slots)
                log.info(
                    "upstream %s runs %d requests at once (its /props): concurrency limit held at %d or below",
                    member.upstream.name,
                    slots,
                    member.limiter.max_limit,
                )

    async def aclose(self) -> None:
        """Close every upstream, started or not."""
        for up in self.upstreams:
            await up.close()

    def model_names(self) -> list[str]:
        return sorted(self._exact)

    async def list_models(self, *, timeout: float = 3.0, ttl: float = 60.0) -> list[str]:
        """Every model id a request can name: the exact routes, and what the upstreams of glob and catch-all routes
        list at their /v1/models (matching the glob; asked at most once a minute each, `timeout` at most; an
        upstream that does not answer lists nothing)."""
        names = set(self.model_names())
        wanted = [(p, m) for p, g in self._globs.items() for m in g] + [(None, m) for m in self._default]

        async def listed(member: Member) -> list[str]:
            key = id(member.upstream)
            hit = self._listed.get(key)
            if hit is not None and time.monotonic() - hit[0] < ttl:
                return hit[1]
            ids = await member.upstream.list_models(timeout=timeout) or []
            self._listed[key] = (time.monotonic(), ids)
            return ids

        found = await asyncio.gather(*(listed(m) for _, m in wanted))
        for (pattern, _), ids in zip(wanted, found, strict=True):
            names.update(i for i in ids if pattern is None or fnmatch.fnmatchcase(i, pattern))
        return sorted(names)
