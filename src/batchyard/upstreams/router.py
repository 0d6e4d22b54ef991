"""Route a model name to an upstream: exact names and glob patterns first, then the catch-all."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from batchyard.upstreams.base import Upstream


class Router:
    def __init__(self, routes: Sequence[tuple[str | None, Upstream]]) -> None:
        self._exact: dict[str, Upstream] = {}
        self._globs: list[tuple[str, Upstream]] = []
        self._default: Upstream | None = None
        for pattern, upstream in routes:
            if pattern is None or pattern == "*":
                self._default = self._default or upstream
            elif any(c in pattern for c in "*?["):
                self._globs.append((pattern, upstream))
            else:
                self._exact.setdefault(pattern, upstream)

    def resolve(self, model: str) -> Upstream | None:
        if "\x00" in model:  # no backend names a model with NUL, and PostgreSQL text cannot hold it
            return None
        up = self._exact.get(model)
        if up is not None:
            return up
        for pattern, upstream in self._globs:
            if fnmatch.fnmatchcase(model, pattern):
                return upstream
        return self._default

    def is_routable(self, model: str) -> bool:
        return self.resolve(model) is not None

    @property
    def upstreams(self) -> list[Upstream]:
        seen: dict[int, Upstream] = {}
        for up in [*self._exact.values(), *(u for _, u in self._globs), self._default]:
            if up is not None:
                seen.setdefault(id(up), up)
        return list(seen.values())

    def model_names(self) -> list[str]:
        return sorted(self._exact)
