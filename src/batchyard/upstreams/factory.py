"""The router of one process, built from the settings: every upstream a member with its own limiter."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from batchyard.config import Settings, UpstreamSpec
from batchyard.upstreams.base import Upstream
from batchyard.upstreams.http import HTTPUpstream
from batchyard.upstreams.limiter import AdaptiveLimiter, Limiter
from batchyard.upstreams.pool import Member, TokenBucket
from batchyard.upstreams.router import Router


def default_limiter(settings: Settings) -> Callable[[], Limiter]:
    """The limiter of an upstream with no limit of its own: `--concurrency` fixed, else adaptive (starting at
    `initial_concurrency`, never above `max_concurrency`)."""
    fixed = settings.concurrency
    if fixed is not None:
        return lambda: Limiter(fixed)
    initial, ceiling = min(settings.initial_concurrency, settings.max_concurrency), settings.max_concurrency
    return lambda: AdaptiveLimiter(initial=initial, max_limit=ceiling)


def build_router(settings: Settings) -> Router:
    """Routes for --upstream and [[upstreams]], plus the embedded engine's exact model names when it is on."""
    limiter = default_limiter(settings)
    routes: list[tuple[str | None, Upstream | Member]] = list(_embedded_routes(settings))
    for spec in settings.upstream_specs:
        member = _spec_member(spec, settings, limiter)
        routes.extend((pattern, member) for pattern in spec.models)
    by_url: dict[str, Upstream] = {}  # several --upstream flags with one URL share its connections and limit
    for pattern, url in settings.upstreams:
        http = by_url.get(url)
        if http is None:
            http = by_url[url] = HTTPUpstream(
                url,
                api_key=settings.upstream_api_key,
                max_body=settings.max_response_bytes,
                stream_lines=settings.stream_batch_lines,
                preemptible_streams=settings.online_priority == "pause",
            )
        routes.append((pattern, http))
    return Router(routes, limiter=limiter)


def _spec_member(spec: UpstreamSpec, settings: Settings, limiter: Callable[[], Limiter]) -> Member:
    key = os.environ.get(spec.api_key_env) if spec.api_key_env else settings.upstream_api_key
    return Member(
        HTTPUpstream(
            spec.base_url,
            api_key=key,
            name=spec.name,
            max_body=settings.max_response_bytes,
            stream_lines=settings.stream_batch_lines,
            preemptible_streams=settings.online_priority == "pause",
        ),
        Limiter(spec.max_concurrency) if spec.max_concurrency is not None else limiter(),
        weight=spec.weight,
        timeout=spec.timeout,
        rpm=TokenBucket(spec.rpm) if spec.rpm else None,
        tpm=TokenBucket(spec.tpm) if spec.tpm else None,
        priority=spec.priority,
    )


def _embedded_routes(settings: Settings) -> list[tuple[str | None, Upstream]]:
    """The embedded engine's models (when it is on) and each [models] GGUF, served in this process."""
    if not settings.serves_embedded:
        return []
    from batchyard.upstreams.embedded import CHAT_MODEL, EmbeddedUpstream, embedded_routes

    routes: list[tuple[str | None, Upstream]] = []
    if settings.embedded_on:
        engine = EmbeddedUpstream(
            model_path=settings.model_path,
            slots=settings.embedded_slots,
            threads=settings.embedded_threads,
            chat_model=Path(settings.model_path).stem if settings.model_path else CHAT_MODEL,
        )
        routes.extend(embedded_routes(engine))
    for name, path in settings.local_models.items():
        local = EmbeddedUpstream(
            model_path=path,
            slots=settings.embedded_slots,
            threads=settings.embedded_threads,
            chat_model=name,
            embeddings=False,
        )
        routes.append((name, local))
    return routes
