"""The `batchyard` command line. Every option also reads BATCHYARD_<NAME> and a TOML file given with --config."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import sys
import tomllib
from pathlib import Path
from typing import Any

import click

from batchyard.config import Settings

CONTEXT = {"auto_envvar_prefix": "BATCHYARD", "show_default": True, "help_option_names": ["-h", "--help"]}


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value:
        try:
            with open(value, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise click.BadParameter(f"cannot read {value}: {e}") from e
        section: dict[str, Any] = data.get("serve", data)
        # Keys are named like the options (`api-key`, `upstream`, `data_dir`): map them to the parameter names.
        names = {
            o.lstrip("-").replace("-", "_"): p.name for p in ctx.command.params for o in p.opts if p.name
        }
        defaults = {}
        for k, v in section.items():
            if isinstance(v, dict):
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


@cli.command(context_settings={**CONTEXT, "auto_envvar_prefix": "BATCHYARD"})
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    callback=_load_config,
    is_eager=True,
    expose_value=False,
    help="TOML file with option values (a [serve] table or top-level keys).",
)
@click.option("--host", default="127.0.0.1", show_envvar=True, help="Address to bind.")
@click.option("--port", default=8000, type=int, show_envvar=True, help="Port to bind.")
@click.option(
    "--data-dir",
    default="./batchyard-data",
    type=click.Path(file_okay=False),
    show_envvar=True,
    help="Directory for the SQLite database and stored files.",
)
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    envvar="BATCHYARD_UPSTREAM",
    show_envvar=True,
    help="[MODEL=]URL of an OpenAI-compatible base URL ending in /v1; MODEL may be a glob. Repeatable.",
)
@click.option("--upstream-api-key", default=None, show_envvar=True, help="Bearer key sent to the upstreams.")
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    envvar="BATCHYARD_API_KEY",
    show_envvar=True,
    help="Require 'Authorization: Bearer KEY' on /v1 routes. Repeatable; each key is its own owner.",
)
@click.option(
    "--insecure-no-auth",
    is_flag=True,
    show_envvar=True,
    help="Allow binding a non-loopback address with no --api-key.",
)
@click.option("--no-worker", is_flag=True, show_envvar=True, help="Serve the API only (no batch execution).")
@click.option(
    "--concurrency",
    default=64,
    type=click.IntRange(1, 4096),
    show_envvar=True,
    help="Requests in flight per upstream.",
)
@click.option(
    "--shard-lines",
    default=1000,
    type=click.IntRange(1, 1_000_000),
    show_envvar=True,
    help="Request lines per shard (the unit of claiming, retrying and committing).",
)
@click.option(
    "--max-shards",
    default=4,
    type=click.IntRange(1, 256),
    show_envvar=True,
    help="Shards this process runs at once.",
)
@click.option(
    "--lease-seconds",
    default=30.0,
    type=click.FloatRange(0.5, 3600),
    show_envvar=True,
    help="Lease of a claimed shard; a dead worker's shards are taken over after it.",
)
@click.option(
    "--attempt-timeout",
    default=600.0,
    type=click.FloatRange(0.1, 86400),
    show_envvar=True,
    help="Overall deadline of one upstream attempt, body included.",
)
@click.option(
    "--max-retries",
    default=6,
    type=click.IntRange(0, 100),
    show_envvar=True,
    help="Retries of 408/409/429/5xx and connection errors per line.",
)
@click.option(
    "--cancel-grace",
    default=30.0,
    type=click.FloatRange(0, 3600),
    show_envvar=True,
    help="Seconds in-flight lines of a cancelled or expired batch get to finish.",
)
@click.option(
    "--max-lines",
    default=50_000,
    type=click.IntRange(1, 100_000_000),
    show_envvar=True,
    help="Most request lines in one batch input file.",
)
@click.option(
    "--max-batch-file-bytes",
    default=200 * 1024 * 1024,
    type=click.IntRange(1),
    show_envvar=True,
    help="Largest input file for purpose 'batch' (larger uploads get 413).",
)
@click.option(
    "--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]), show_envvar=True
)
def serve(**opts: Any) -> None:
    """Run the API server and a worker on one machine (SQLite + a local directory)."""
    logging.basicConfig(
        level=opts["log_level"].upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not opts["api_keys"] and not opts["insecure_no_auth"] and not _is_loopback(opts["host"]):
        raise click.UsageError(
            f"refusing to bind {opts['host']} with no --api-key; add --api-key KEY or --insecure-no-auth"
        )
    settings = Settings(
        data_dir=Path(opts["data_dir"]),
        host=opts["host"],
        port=opts["port"],
        upstreams=[parse_upstream(u) for u in opts["upstreams"]],
        upstream_api_key=opts["upstream_api_key"],
        api_keys=list(opts["api_keys"]),
        insecure_no_auth=opts["insecure_no_auth"],
        run_worker=not opts["no_worker"],
        concurrency=opts["concurrency"],
        shard_lines=opts["shard_lines"],
        max_shards=opts["max_shards"],
        lease_seconds=opts["lease_seconds"],
        attempt_timeout=opts["attempt_timeout"],
        max_retries=opts["max_retries"],
        cancel_grace=opts["cancel_grace"],
        max_lines=opts["max_lines"],
        max_batch_file_bytes=opts["max_batch_file_bytes"],
    )
    sys.exit(asyncio.run(_serve(settings)) if sys.platform == "win32" else _serve_uvloop(settings))


def _serve_uvloop(settings: Settings) -> int:
    import uvloop

    return uvloop.run(_serve(settings))


async def _serve(settings: Settings) -> int:
    import uvicorn

    from batchyard.runtime import Runtime

    died = asyncio.Event()
    rt = Runtime.create(settings)
    config = uvicorn.Config(
        rt.app(died.set),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)

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
