"""Settings shared by the server, the worker and the one-shot runner."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchyard.domain import limits


def _optional_int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{what} must be an integer")
    return value


@dataclass(slots=True)
class UpstreamSpec:
    """One `[[upstreams]]` table of the TOML config."""

    base_url: str
    name: str | None = None
    api_key_env: str | None = None  # the key is read from this environment variable, never from the file
    models: list[str] = field(default_factory=lambda: ["*"])  # names or globs
    weight: float = 1.0
    max_concurrency: int | None = None  # None ("auto"): adaptive
    rpm: float | None = None
    tpm: float | None = None
    timeout: float | None = None
    priority: int | None = None  # vLLM `priority` hint added to requests that have none

    @classmethod
    def parse(cls, raw: dict[str, Any], index: int) -> UpstreamSpec:
        where = f"[[upstreams]] #{index + 1}"
        known = {
            "base_url",
            "name",
            "api_key_env",
            "models",
            "weight",
            "max_concurrency",
            "rpm",
            "tpm",
            "timeout",
            "priority",
        }
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        url = raw.get("base_url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"{where}: base_url must be an http(s) URL")
        models = raw.get("models", ["*"])
        if isinstance(models, str):
            models = [models]
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise ValueError(f"{where}: models must be a list of names or globs")
        mc = raw.get("max_concurrency", "auto")
        if mc != "auto" and not (isinstance(mc, int) and mc >= 1):
            raise ValueError(f'{where}: max_concurrency must be a positive integer or "auto"')
        for key in ("weight", "rpm", "tpm", "timeout"):
            v = raw.get(key)
            if v is not None and (not isinstance(v, int | float) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"{where}: {key} must be a positive number")
        return cls(
            base_url=url,
            name=raw.get("name"),
            api_key_env=raw.get("api_key_env"),
            models=list(models),
            weight=float(raw.get("weight", 1.0)),
            max_concurrency=None if mc == "auto" else int(mc),
            rpm=raw.get("rpm"),
            tpm=raw.get("tpm"),
            timeout=raw.get("timeout"),
            priority=_optional_int(raw.get("priority"), f"{where}: priority"),
        )


@dataclass(slots=True)
class Settings:
    data_dir: Path = Path("./batchyard-data")
    host: str = "127.0.0.1"
    port: int = 8000
    # (model pattern or None for every model, base URL)
    upstreams: list[tuple[str | None, str]] = field(default_factory=list)
    upstream_api_key: str | None = None
    upstream_specs: list[UpstreamSpec] = field(default_factory=list)  # [[upstreams]] from the config file
    # the embedded engine: None = on when no upstream is configured
    embedded: bool | None = None
    model_path: str | None = None  # a local GGUF served as the chat model instead of SmolLM2-135M
    embedded_slots: int = 4
    local_models: dict[str, str] = field(
        default_factory=dict
    )  # [models] name = "/path/to.gguf", served embedded
    api_keys: list[str] = field(default_factory=list)
    insecure_no_auth: bool = False
    run_worker: bool = True
    # "thread": a worker in this process on its own loop; "process": a child process (what `serve` uses)
    worker_mode: str = "thread"
    # worker processes `serve` (process mode) and `worker` run; None: auto (see `resolved_workers`)
    workers: int | None = 1
    log_level: str = "info"
    database_url: str | None = None  # sqlite:///path or postgresql://...; default: SQLite in data_dir
    storage_url: str | None = None  # file:///path or s3://bucket/prefix; default: data_dir/blobs
    # execution
    concurrency: int | None = None  # lines in flight per upstream; None: adaptive, up to max_concurrency
    max_concurrency: int = 512
    initial_concurrency: int = 64  # where the automatic concurrency starts
    shard_lines: int = 1000  # lines per shard
    # and bytes per shard at most (a shard is read into memory whole: 1000 lines of 200 KB would be 200 MB)
    shard_bytes: int = 16 * 1024 * 1024
    max_shards: int = 4  # shards one worker runs at once
    lease_seconds: float = 30.0
    prefix_ordering: bool = (
        True  # dispatch requests sharing a prompt prefix together (KV-cache reuse upstream)
    )
    attempt_timeout: float = 600.0  # overall deadline for one upstream attempt
    max_retries: int = 6
    cancel_grace: float = 30.0  # in-flight lines of a cancelled/expired batch get this long to finish
    poll_interval: float = 0.5
    # webhooks (batch.completed / failed / expired / cancelled), signed with webhook_secret
    webhook_urls: list[str] = field(default_factory=list)
    webhook_secret: str | None = None
    # limits
    max_lines: int = limits.MAX_INPUT_LINES
    max_batch_file_bytes: int = limits.MAX_BATCH_FILE_BYTES
    max_file_bytes: int = limits.MAX_FILE_BYTES
    max_response_bytes: int = 64 * 1024 * 1024
    # per-key caps (0: no limit); beyond one the API answers 429 insufficient_quota
    max_stored_bytes_per_key: int = limits.MAX_STORED_BYTES_PER_KEY
    max_files_per_key: int = limits.MAX_FILES_PER_KEY
    max_pending_uploads_per_key: int = limits.MAX_PENDING_UPLOADS_PER_KEY
    max_active_batches_per_key: int = limits.MAX_ACTIVE_BATCHES_PER_KEY
    # HTTP edge (api/server.py): beyond a head limit 431; a head must arrive within head_timeout; idle keep-alive
    # connections close after keep_alive_timeout; at max_connections the oldest idle connection makes room
    max_head_bytes: int = 64 * 1024
    max_headers: int = 100
    head_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 1000
    body_timeout: float = 60.0  # a request body with no byte for this long is cut

    @property
    def database_path(self) -> Path:
        return self.data_dir / "batchyard.sqlite3"

    @property
    def blob_root(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def heartbeat_seconds(self) -> float:
        return max(0.2, self.lease_seconds / 3.0)

    @property
    def embedded_on(self) -> bool:
        """The embedded engine is served: asked for, or by default when no upstream is configured."""
        return self.embedded if self.embedded is not None else not (self.upstreams or self.upstream_specs)

    @property
    def serves_embedded(self) -> bool:
        """True when a worker loads a model in process (the embedded engine or a [models] GGUF)."""
        return self.embedded_on or bool(self.local_models)

    def resolved_workers(self) -> int:
        """Worker processes to run. Auto: one per CPU core, at most 4 — but a single one when a model is loaded
        in process (each worker would load its own copy, and one engine already uses every core)."""
        if self.workers is not None:
            return self.workers
        if self.serves_embedded:
            return 1
        return max(1, min(os.cpu_count() or 1, 4))

    def share(self, n: int) -> Settings:
        """The settings of one of `n` worker processes that together honour this process's limits: the limits
        that are per upstream (concurrency, where the automatic one starts and its ceiling, max_concurrency, rpm, tpm)
        are split n ways."""
        if n <= 1:
            return self

        def split(v: int | None) -> int | None:
            return None if v is None else max(1, math.ceil(v / n))

        specs = [
            dataclasses.replace(
                s,
                max_concurrency=split(s.max_concurrency),
                rpm=None if s.rpm is None else s.rpm / n,
                tpm=None if s.tpm is None else s.tpm / n,
            )
            for s in self.upstream_specs
        ]
        return dataclasses.replace(
            self,
            workers=1,
            concurrency=split(self.concurrency),
            max_concurrency=split(self.max_concurrency) or 1,
            initial_concurrency=split(self.initial_concurrency) or 1,
            upstream_specs=specs,
        )
