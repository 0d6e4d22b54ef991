"""Settings shared by the server, the worker and the one-shot runner: one model.

Each field holds its default and its check once. A field with an `Option` is also a command-line option
(`--name`), an environment variable (`BATCHYARD_NAME`) and a key of the `--config` TOML file (`name` or `na-me`);
`batchyard.settings_sources.load` layers them: flag > environment > file > default. `Settings(...)` itself reads
nothing but its arguments. `python -m batchyard.settings_sources --markdown` prints the table in docs/configuration.md.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from batchyard.domain import limits
from batchyard.domain.webhooks import DEFAULT_GRACE_S
from batchyard.settings_fields import (
    COMMAND_SCOPES,
    ENV_PREFIX,
    Option,
    Positive,
    RouteList,
    Scope,
    Words,
    _auto_or_count,
    _existing_file,
    _http_url,
    _models,
    _not_a_file,
    _webhook_secret,
    _webhook_urls,
    parse_route,
)

__all__ = [
    "COMMAND_SCOPES",
    "ENV_PREFIX",
    "Option",
    "Scope",
    "ServeSwitches",
    "Settings",
    "UpstreamSpec",
    "parse_route",
]


MAX_RESPONSE_BYTES = 64 * 1024 * 1024
MAX_HEAD_BYTES = 64 * 1024


def _bytes_text(n: int) -> str:
    """A size in bytes as --help and the docs show it: "200 MiB (209715200)"."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("GB", 10**9), ("MB", 10**6), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit} ({n})"
    return f"{n} bytes"


class UpstreamSpec(BaseModel):
    """One `[[upstreams]]` table of the TOML config."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    base_url: Annotated[str, AfterValidator(_http_url)]
    name: str | None = None
    api_key_env: str | None = None  # the key is read from this environment variable, never from the file
    models: Annotated[list[Annotated[str, Field(min_length=1)]], BeforeValidator(_models)] = Field(
        default_factory=lambda: ["*"]
    )  # names or globs
    weight: Positive = 1.0
    max_concurrency: Annotated[int | None, _auto_or_count(sys.maxsize)] = None  # None ("auto"): adaptive
    rpm: Positive | None = None
    tpm: Positive | None = None
    timeout: Positive | None = None
    priority: int | None = None  # vLLM `priority` hint added to requests that have none


class _Model(BaseSettings):
    """Frozen, nothing unknown, and built from its arguments only (`load` adds the flags, env and file)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="forbid",
        env_ignore_empty=True,
        enable_decoding=False,  # a repeatable option's variable holds words, not JSON
        validate_by_name=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


EXECUTION: Literal["execution"] = "execution"
STATE: Literal["state"] = "state"
SERVE: Literal["serve"] = "serve"
WORKER: Literal["worker"] = "worker"


class Settings(_Model):
    # -- the upstreams (execution) --
    # (model pattern or None for every model, base URL)
    upstreams: Annotated[
        RouteList,
        Option(
            EXECUTION,
            "[MODEL=]URL of an OpenAI-compatible base URL ending in /v1; MODEL may be a glob. Repeatable.",
            flag="--upstream",
            metavar="[MODEL=]URL",
        ),
    ] = Field(default_factory=list, validation_alias="BATCHYARD_UPSTREAM")
    upstream_api_key: Annotated[str | None, Option(EXECUTION, "Bearer key sent to the upstreams.")] = None
    upstream_specs: list[UpstreamSpec] = Field(default_factory=list)  # [[upstreams]] from the config file
    # the embedded engine: None = on when no upstream is configured
    embedded: Annotated[
        bool | None,
        Option(
            EXECUTION,
            "Serve the embedded engine (smollm2-135m-instruct, multilingual-e5-small) beside the upstreams.",
            flag="--embedded/--no-embedded",
            default_text="on when no --upstream is given",
        ),
    ] = None
    # a local GGUF served as the chat model instead of SmolLM2-135M
    model_path: Annotated[
        str | None,
        AfterValidator(_existing_file),
        Option(
            EXECUTION,
            "A local GGUF served by the embedded engine (named after its file) instead of SmolLM2-135M.",
            metavar="FILE",
        ),
    ] = None
    embedded_slots: Annotated[
        int, Field(ge=1, le=64), Option(EXECUTION, "Requests the embedded engine generates at once.")
    ] = 4
    # [models] name = "/path/to.gguf", served embedded
    local_models: dict[Annotated[str, Field(min_length=1)], Annotated[str, Field(min_length=1)]] = Field(
        default_factory=dict
    )
    # -- the API (serve) --
    host: Annotated[str, Option(SERVE, "Address to bind.")] = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535), Option(SERVE, "Port to bind.")] = 8000
    api_keys: Annotated[
        Words,
        Option(
            SERVE,
            "Require 'Authorization: Bearer KEY' on /v1 routes. Repeatable; each key is its own owner.",
            flag="--api-key",
            metavar="KEY",
        ),
    ] = Field(default_factory=list, validation_alias="BATCHYARD_API_KEY")
    run_worker: bool = True  # set by serve's --no-worker
    # n in each of n worker processes whose concurrency limits are their 1/n of the command's (`share`): they must
    # not share them again with the other processes on the board, and their metrics show the command's limit
    limit_split: int = Field(default=1, ge=1)
    # "thread": a worker in this process on its own loop; "process": a child process (what `serve` uses)
    worker_mode: Literal["thread", "process"] = "thread"
    # -- where state lives (serve, worker) --
    data_dir: Annotated[
        Path,
        AfterValidator(_not_a_file),
        Option(
            STATE,
            "Directory for the SQLite database and stored files (when no URL below says otherwise).",
            metavar="DIRECTORY",
        ),
    ] = Path("./batchyard-data")
    # worker processes `serve` (process mode) and `worker` run; None: auto (see `resolved_workers`)
    workers: Annotated[
        int | None,
        _auto_or_count(256),
        Option(
            STATE,
            "Worker processes: a number, or 'auto' for one per CPU core up to 4 (1 when a model is loaded in "
            "process: the embedded engine or [models]). The per-upstream limits (--concurrency, "
            "--max-concurrency, max_concurrency, rpm, tpm) are split between them, so a batch of one shard gets "
            "only its process's share; one process drives ~18,000 lines/s against a zero-cost upstream "
            "(bench/p1_throughput.py).",
            doc="worker processes of `serve` and `worker`; `auto`: one per core up to 4 (1 when the embedded "
            "engine or a `[models]` GGUF is served). The per-upstream limits (`--concurrency`, "
            "`--max-concurrency`, `max_concurrency`, `rpm`, `tpm`) are totals split between them, so a batch of "
            "one shard only gets its process's share: raise it only when one process's CPU is the bottleneck "
            "(~18,000 lines/s against a zero-cost upstream, `bench/p1_throughput.py`)",
            metavar="N|auto",
        ),
    ] = 1
    log_level: Annotated[Literal["debug", "info", "warning", "error"], Option(EXECUTION, "Log level.")] = (
        "info"
    )
    database_url: Annotated[
        str | None,
        Option(
            STATE,
            "Metadata store: sqlite:///PATH (default: DATA_DIR/batchyard.sqlite3) or postgresql://USER@HOST/DB.",
        ),
    ] = None
    storage_url: Annotated[
        str | None,
        Option(
            STATE,
            "Blob store: file:///PATH (default: DATA_DIR/blobs) or s3://BUCKET/PREFIX (endpoint and credentials "
            "from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION).",
        ),
    ] = None
    # -- execution --
    concurrency: Annotated[
        int | None,
        _auto_or_count(65536),
        Option(
            EXECUTION,
            "Requests in flight per upstream: a number, or 'auto' to find the upstream's capacity (AIMD on "
            "429/503/timeouts and rising latency).",
            doc="requests in flight per upstream; `auto` = AIMD with slow start, a latency gradient and "
            "429/503/timeout back-off, between 1 and `--max-concurrency`, and never above the slots an engine "
            "reports (llama.cpp's `GET /props`)",
            default_text="auto",
            metavar="N|auto",
        ),
    ] = None
    max_concurrency: Annotated[
        int, Field(ge=1, le=65536), Option(EXECUTION, "Ceiling of the automatic concurrency.")
    ] = 512
    initial_concurrency: int = Field(default=64, ge=1)  # where the automatic concurrency starts
    shard_lines: Annotated[
        int,
        Field(ge=1, le=1_000_000),
        Option(EXECUTION, "Request lines per shard (the unit of claiming, retrying and committing)."),
    ] = 1000
    # and bytes per shard at most (a shard is read into memory whole: 1000 lines of 200 KB would be 200 MB)
    shard_bytes: int = 16 * 1024 * 1024
    max_shards: Annotated[
        int, Field(ge=1, le=256), Option(EXECUTION, "Shards each worker process runs at once.")
    ] = 4
    lease_seconds: Annotated[
        float,
        Field(ge=0.5, le=3600),
        Option(EXECUTION, "Lease of a claimed shard; a dead worker's shards are taken over after it."),
    ] = 30.0
    prefix_ordering: Annotated[
        bool,
        Option(
            EXECUTION,
            "Within a shard, dispatch requests that share a prompt prefix together (prefix-cache reuse).",
            doc="within a shard, send requests sharing a prompt prefix together (KV-cache reuse on vLLM/SGLang)",
            flag="--prefix-ordering/--no-prefix-ordering",
        ),
    ] = True
    attempt_timeout: Annotated[
        float,
        Field(ge=0.1, le=86400),
        Option(EXECUTION, "Overall deadline of one upstream attempt, body included."),
    ] = 600.0
    max_retries: Annotated[
        int,
        Field(ge=0, le=100),
        Option(
            EXECUTION,
            "Retries of 408/409/429/5xx and connection errors per line.",
            doc="retries of 408/409/429/5xx and connection errors (a positive Retry-After honoured up to 60 s; "
            "else exponential backoff with jitter from 0.5 s — from 50 ms for `Retry-After: 0`, so a full "
            "upstream is not hammered)",
        ),
    ] = 6
    cancel_grace: Annotated[
        float,
        Field(ge=0, le=3600),
        Option(EXECUTION, "Seconds in-flight lines of a cancelled or expired batch get to finish."),
    ] = 30.0
    poll_interval: float = 0.5
    # webhooks (batch.completed / failed / expired / cancelled), signed with webhook_secret
    webhook_urls: Annotated[
        list[str],
        BeforeValidator(_webhook_urls),
        Option(
            STATE,
            "URL that receives the batch webhooks (batch.completed, batch.failed, batch.expired, "
            "batch.cancelled), signed as OpenAI signs them. Repeatable.",
            flag="--webhook-url",
            metavar="URL",
        ),
    ] = Field(default_factory=list, validation_alias="BATCHYARD_WEBHOOK_URL")
    webhook_secret: Annotated[
        str | None,
        AfterValidator(_webhook_secret),
        Option(
            STATE,
            "Signing secret of the webhooks (whsec_<base64>, as OpenAI's; verify with the openai SDK's "
            "client.webhooks.unwrap). Required with --webhook-url.",
            doc="signing secret of the webhooks (`whsec_<base64>`; prefer `BATCHYARD_WEBHOOK_SECRET` to the "
            "command line); see docs/api.md",
        ),
    ] = None
    # -- limits --
    max_lines: Annotated[
        int,
        Field(ge=1, le=100_000_000),
        Option(EXECUTION, "Most request lines in one batch input file (OpenAI's limit, raisable)."),
    ] = limits.MAX_INPUT_LINES
    max_batch_file_bytes: Annotated[
        int,
        Field(ge=1),
        Option(
            SERVE,
            "Largest input file for purpose 'batch' (larger uploads get 413; OpenAI's limit, raisable).",
            default_text=_bytes_text(limits.MAX_BATCH_FILE_BYTES),
        ),
    ] = limits.MAX_BATCH_FILE_BYTES
    max_file_bytes: int = limits.MAX_FILE_BYTES
    max_response_bytes: Annotated[
        int,
        Field(ge=1024),
        Option(
            EXECUTION,
            "Largest upstream response body; a larger one ends the line as upstream_too_large.",
            default_text=_bytes_text(MAX_RESPONSE_BYTES),
        ),
    ] = MAX_RESPONSE_BYTES
    # per-key caps (0: no limit); beyond one the API answers 429 insufficient_quota
    max_stored_bytes_per_key: Annotated[
        int,
        Field(ge=0),
        Option(
            SERVE,
            "Bytes of live files one API key may hold (uploads and batch outputs; 0: no limit); beyond it, 429.",
            default_text=_bytes_text(limits.MAX_STORED_BYTES_PER_KEY),
        ),
    ] = limits.MAX_STORED_BYTES_PER_KEY
    max_files_per_key: Annotated[
        int, Field(ge=0), Option(SERVE, "Live files one API key may hold (0: no limit); beyond it, 429.")
    ] = limits.MAX_FILES_PER_KEY
    max_pending_uploads_per_key: Annotated[
        int,
        Field(ge=0),
        Option(
            SERVE, "Uploads (/v1/uploads) one API key may have pending at once (0: no limit); beyond it, 429."
        ),
    ] = limits.MAX_PENDING_UPLOADS_PER_KEY
    max_active_batches_per_key: Annotated[
        int,
        Field(ge=0),
        Option(SERVE, "Batches one API key may have not yet finished (0: no limit); beyond it, 429."),
    ] = limits.MAX_ACTIVE_BATCHES_PER_KEY
    # HTTP edge (api/server.py): beyond a head limit 431; a head must arrive within head_timeout; idle keep-alive
    # connections close after keep_alive_timeout; at max_connections the oldest idle connection makes room
    max_head_bytes: Annotated[
        int,
        Field(ge=1024),
        Option(
            SERVE,
            "Largest request head (request line and headers); beyond it, 431 and the connection is closed.",
            doc="largest request head (request line and headers); beyond it 431 `request_header_fields_too_large`"
            " and the connection is closed (counted as bytes arrive: memory stays bounded)",
            default_text=_bytes_text(MAX_HEAD_BYTES),
        ),
    ] = MAX_HEAD_BYTES
    max_headers: Annotated[
        int,
        Field(ge=1),
        Option(SERVE, "Most headers in one request; beyond it, 431 and the connection is closed."),
    ] = 100
    head_timeout: Annotated[
        float,
        Field(ge=0.1, le=3600),
        Option(
            SERVE,
            "Seconds a client has to send a whole request head (from the connection or the head's first byte).",
            doc="seconds to send a whole head, from the connection (or the head's first byte on a keep-alive "
            "connection); then 408 and close (a silent close when nothing came)",
        ),
    ] = 10.0
    keep_alive_timeout: Annotated[
        float, Field(ge=0.1, le=3600), Option(SERVE, "Seconds an idle keep-alive connection stays open.")
    ] = 5.0
    max_connections: Annotated[
        int,
        Field(ge=1),
        Option(
            SERVE,
            "Open connections; at the bound a new one closes the oldest idle one (503 if every one is busy).",
            doc="open connections; at the bound a new one closes the oldest idle one (no request in flight), as "
            "nginx reuses keep-alive connections; 503 `too_many_connections` only when every connection has a "
            "request in flight",
        ),
    ] = 1000
    body_timeout: Annotated[
        float,
        Field(ge=0.1, le=3600),
        Option(
            SERVE,
            "Seconds a request body may go without a byte before the connection is cut.",
            doc="seconds a request body may go without a byte (time while the server paused reading does not "
            "count); then the connection is cut and a partial upload removed",
        ),
    ] = 60.0
    completion_windows: Annotated[
        Literal["durations", "openai"],
        Option(
            SERVE,
            "Which completion_window values a batch may ask for: 'durations' (any of '90s', '30m', '2h', '3d' up "
            "to 7 days, a batchyard extension) or 'openai' (only '24h', as OpenAI).",
            metavar="durations|openai",
        ),
    ] = "durations"
    # -- metrics --
    metrics_require_key: Annotated[
        bool,
        Option(SERVE, "GET /metrics takes a valid API key (by default it needs none, like vLLM's)."),
    ] = False
    metrics_port: Annotated[
        int | None,
        Field(ge=0, le=65535),
        Option(
            WORKER,
            "Serve the Prometheus metrics of this worker (all its processes) on this port at /metrics (0: off).",
            default_text="off",
        ),
    ] = None
    metrics_host: Annotated[
        str, Option(WORKER, "Address the worker's metrics endpoint (--metrics-port) binds.")
    ] = "127.0.0.1"
    log_format: Annotated[
        Literal["text", "json"],
        Option(
            EXECUTION,
            "Log lines as text, or as one JSON object a line (ts, level, logger, msg; access lines add request_id,"
            " method, path, status, duration_ms).",
            doc="`text`, or `json`: one JSON object a line (`ts`, `level`, `logger`, `msg`, `pid`; access lines "
            "add `request_id`, `method`, `path`, `status`, `duration_ms`), from the API and every worker process;"
            " see docs/logging.md",
        ),
    ] = "text"
    # -- tenancy (docs/tenancy.md): projects and their keys live in the store (`batchyard keys ...`) --
    admin_api_keys: Annotated[
        Words,
        Option(
            SERVE,
            "A static key that may also use the admin API (/v1/organization/...); it is accepted as an --api-key "
            "too. Repeatable.",
            flag="--admin-api-key",
            metavar="KEY",
        ),
    ] = Field(default_factory=list, validation_alias="BATCHYARD_ADMIN_API_KEY")
    api_key_cache_seconds: Annotated[
        float,
        Field(ge=0),
        Option(
            SERVE,
            "How long an API process trusts what it read of a stored key: a key revoked (or a project archived) "
            "elsewhere stops working within this time.",
        ),
    ] = 5.0
    project_max_batches_in_progress: Annotated[
        int,
        Field(ge=0),
        Option(SERVE, "Batches one project may have not yet finished (0: no limit); beyond it, 429."),
    ] = 0
    project_max_stored_bytes: Annotated[
        int,
        Field(ge=0),
        Option(SERVE, "Bytes of live files one project may hold (0: no limit); beyond it, 429."),
    ] = 0
    project_max_enqueued_tokens: Annotated[
        int,
        Field(ge=0),
        Option(
            EXECUTION,
            "Estimated input tokens one project may have enqueued per model in unfinished batches (0: no limit); "
            "a batch that would pass it fails validation with token_limit_exceeded, as OpenAI's do.",
        ),
    ] = 0
    project_create_rpm: Annotated[
        int,
        Field(ge=0),
        Option(
            SERVE,
            "Creates (files, uploads, batches) one project (or static key) may make per minute (0: no limit); "
            "beyond it, 429 rate_limit_exceeded with Retry-After.",
        ),
    ] = 0
    # threads of the embedded engine (llama.cpp's cpuparams, and the embedding model's); None: "auto"
    embedded_threads: Annotated[
        int | None,
        _auto_or_count(1024),
        Option(
            EXECUTION,
            "CPU threads of the embedded engine: a number, or 'auto' for half the CPU cores (at least 1). More "
            "threads than free cores is several times slower on a busy machine (docs/embedded.md).",
            doc="CPU threads of the embedded engine (llama.cpp's `n_threads`, and the embedding model's); `auto`: "
            "half the CPU cores, at least 1. A thread that waits for a core busy with other work stalls every "
            "step: on 2 shared cores 1 thread gave 20.7 tokens/s, 2 threads 2.7 (docs/embedded.md)",
            metavar="N|auto",
            default_text="auto",
        ),
    ] = None
    output_order: Annotated[
        Literal["shard", "input"],
        Option(
            EXECUTION,
            "Order of the lines in output and error files: 'shard' (as they were answered, shard by shard, as "
            "OpenAI does not promise any) or 'input' (the input file's; batches are then planned without prefix "
            "regrouping across the file).",
            metavar="shard|input",
        ),
    ] = "shard"
    # -- webhook endpoints per project (docs/webhooks.md) --
    webhook_rotation_grace_seconds: Annotated[
        int,
        Field(ge=0, le=30 * 86_400),
        Option(
            STATE,
            "After a webhook endpoint's secret is rotated, how long the previous secret still signs its deliveries "
            "(each then carries both signatures).",
            default_text="86400 (24 h)",
        ),
    ] = DEFAULT_GRACE_S
    webhook_allowed_hosts: Annotated[
        Words,
        Option(
            SERVE,
            "Host glob (e.g. '*.example.com', 'hooks.internal') that a webhook endpoint added through the admin API "
            "may point at; none: the admin API refuses every endpoint URL (the CLI's `batchyard webhooks add` is not "
            "limited). Repeatable.",
            metavar="GLOB",
        ),
    ] = Field(default_factory=list)
    online_priority: Annotated[
        Literal["slots", "pause", "off"],
        Option(
            EXECUTION,
            "How batch lines yield to online requests (/v1/chat/completions and the like) on the same upstream: "
            "'slots' (batch lines get what online requests leave of the concurrency limit; the youngest are cut "
            "short when an online request needs their slot), 'pause' (no batch line is sent while an online "
            "request is in flight there: for an engine whose slots share a few CPU cores), or 'off'.",
            doc="How batch lines yield to online requests on the same upstream (docs/api.md, online requests): "
            "`slots` (batch lines get what online requests in flight leave of the concurrency limit; the "
            "youngest are cut short and sent again when an online request needs their slot), `pause` (no batch "
            "line is sent to an upstream while an online request is in flight there, nor for 0.1 s after: for "
            "an engine whose slots share a few CPU cores, such as llama.cpp on a CPU), `off`. The API and the "
            "workers of one machine meet on a shared-memory board; workers on other machines see online load "
            "only as latency",
            metavar="slots|pause|off",
        ),
    ] = "slots"
    project_online_rpm: Annotated[
        int,
        Field(ge=0),
        Option(
            SERVE,
            "Online requests (/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses) one project "
            "(or static key) may make per minute (0: no limit); beyond it, 429 rate_limit_exceeded with "
            "Retry-After.",
        ),
    ] = 0
    project_online_concurrency: Annotated[
        int,
        Field(ge=0),
        Option(
            SERVE,
            "Online requests one project (or static key) may have in flight at once, per API process (0: no "
            "limit); beyond it, 429 rate_limit_exceeded. Online requests come before batch lines, so this is what "
            "keeps one project's online traffic from taking every upstream slot from everyone's batches.",
        ),
    ] = 64
    admission: Annotated[
        Literal["off", "warn", "reject"],
        Option(
            EXECUTION,
            "Admission control: when the lines queued ahead plus a new batch cannot finish within its completion "
            "window at the throughput of the last 10 minutes, 'warn' accepts it with an x-batchyard-warning "
            "header, 'reject' also fails it at validation with token_limit_exceeded (as OpenAI does for a full "
            "queue), 'off' checks nothing.",
            doc="admission control (docs/scheduling.md): when the backlog of unanswered lines plus a new batch "
            "cannot finish within its completion window at the throughput measured over the last 10 minutes: "
            "`warn` accepts it with an `x-batchyard-warning` header on the create answer; `reject` also fails it "
            "at validation with `token_limit_exceeded`, as OpenAI fails a batch its queue cannot take; `off` "
            "checks nothing. No measured throughput yet: every batch is admitted",
            metavar="off|warn|reject",
        ),
    ] = "warn"
    stream_batch_lines: Annotated[
        Literal["auto", "on", "off"],
        Option(
            EXECUTION,
            "Send batch requests to an upstream as streams and assemble each answer, so that a request cut short "
            "(the batch was cancelled; an online request needs the engine, under 'pause') stops the engine at "
            "once: 'auto' to a "
            "llama.cpp server (it finishes a plain request whose client left), 'on' to every upstream, 'off'.",
            doc="batch requests sent as streams, their events assembled into the answer a plain request gets "
            "(docs/priority.md): an engine that finishes a plain request whose client went away but stops a "
            "stream, such as llama.cpp's server, then stops at once when a line is cut short by a cancel (after `--cancel-grace`), or for "
            "an online request under `--online-priority pause`. `auto`: to an upstream that answers llama.cpp's `GET /props`; `on`: to every "
            "HTTP upstream; `off`. Only chat and text completions with one choice, one prompt and no JSON constraint "
            "go so",
            metavar="auto|on|off",
        ),
    ] = "auto"

    @model_validator(mode="after")
    def _secret_with_urls(self) -> Settings:
        if self.webhook_urls and not self.webhook_secret:
            raise ValueError("--webhook-url needs --webhook-secret (or BATCHYARD_WEBHOOK_SECRET)")
        return self

    @property
    def database_path(self) -> Path:
        return self.data_dir / "batchyard.sqlite3"

    @property
    def blob_root(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def online_board(self) -> Path:
        """The shared-memory board where this deployment's API and workers on this machine meet (upstreams/online)."""
        if self.database_url is None:  # SQLite: beside its file
            return self.data_dir / "online-board"
        from batchyard.upstreams.online import default_path

        return default_path(self.database_url)

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

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes`, checked like the original."""
        return type(self).model_validate({**self.model_dump(), **changes})

    @property
    def fixed_limits(self) -> bool:
        """A concurrency limit is a number the operator set (`--concurrency N` or an upstream's max_concurrency):
        it is kept exactly, so several processes split it rather than share it (sharing finds capacity within a
        few milliseconds of lag, and may exceed it for that long)."""
        return self.concurrency is not None or any(s.max_concurrency is not None for s in self.upstream_specs)

    @property
    def shares_limits(self) -> bool:
        """The worker processes share each concurrency limit on the board (upstreams/online.py) rather than split
        it: the limits are adaptive and the workers watch the board."""
        return self.online_priority != "off" and not self.fixed_limits

    def share(self, n: int) -> Settings:
        """The settings of one of `n` worker processes that together honour this process's limits: rpm and tpm are
        split n ways, and so are the concurrency limits (where the automatic one starts and its ceiling,
        max_concurrency) unless the processes share them on the board (`shares_limits`)."""
        if n <= 1:
            return self

        def split(v: int | None) -> int | None:
            return None if v is None else max(1, math.ceil(v / n))

        concurrency = not self.shares_limits

        specs = [
            s.model_copy(
                update={
                    "rpm": None if s.rpm is None else s.rpm / n,
                    "tpm": None if s.tpm is None else s.tpm / n,
                    **({"max_concurrency": split(s.max_concurrency)} if concurrency else {}),
                }
            )
            for s in self.upstream_specs
        ]
        update: dict[str, Any] = {"workers": 1, "upstream_specs": specs}
        if concurrency:
            update |= {
                "limit_split": n,
                "concurrency": split(self.concurrency),
                "max_concurrency": split(self.max_concurrency) or 1,
                "initial_concurrency": split(self.initial_concurrency) or 1,
            }
        return self.model_copy(update=update)


class ServeSwitches(_Model):
    """Switches of `serve` that decide how it builds its Settings; they are not settings themselves."""

    insecure_no_auth: Annotated[
        bool, Option(SERVE, "Allow binding a non-loopback address with no --api-key.")
    ] = False
    no_worker: Annotated[
        bool, Option(SERVE, "Serve the API only (no batch execution).", flag="--no-worker")
    ] = False
    worker_in_process: Annotated[
        bool,
        Option(
            SERVE,
            "Run one worker on a thread of the API process instead of --workers child processes (slower under "
            "load).",
        ),
    ] = False
