"""`batchyard submit`, `batchyard batches ...`, `batchyard files ...`: a client for any OpenAI-compatible Batch API
(a batchyard server, OpenAI itself), on the official `openai` SDK."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from openai import OpenAI, omit
from openai.types import Batch

from batchyard.cli import outcome, remote

F = TypeVar("F", bound=Callable[..., Any])
CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"]}
ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/moderations"]


def connection_options(fn: F) -> F:
    """--base-url and --api-key, read from OPENAI_BASE_URL and OPENAI_API_KEY as the openai SDK reads them."""
    fn = click.option(
        "--api-key",
        envvar="OPENAI_API_KEY",
        show_envvar=True,
        default=None,
        help="API key (a batchyard server started without --api-key takes any).",
    )(fn)
    return click.option(
        "--base-url",
        envvar="OPENAI_BASE_URL",
        show_envvar=True,
        default=remote.DEFAULT_BASE_URL,
        help="Base URL of the Batch API, ending in /v1. Unlike the openai SDK (api.openai.com), the default is a "
        "local batchyard; use https://api.openai.com/v1 for OpenAI. The URL used is printed on stderr.",
    )(fn)


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print the API's JSON (for scripts).")(fn)


def wait_options(fn: F) -> F:
    fn = click.option(
        "--poll-interval",
        default=1.0,
        type=click.FloatRange(0.05, 3600),
        help="Seconds between status checks.",
    )(fn)
    return click.option("-q", "--quiet", is_flag=True, help="No progress bar.")(fn)


def _metadata(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict[str, str] | None:
    pairs: dict[str, str] = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{v!r} is not KEY=VALUE")
        pairs[key] = value
    return pairs or None


def _endpoint_of(path: Path) -> str | None:
    """The url of the file's first line, when it has one."""
    with open(path, "rb") as fh:
        for raw in fh:
            if raw.strip():
                with contextlib.suppress(ValueError):
                    url = json.loads(raw).get("url")
                    return url if isinstance(url, str) else None
                return None
    return None


def _print_batch(b: Batch, as_json: bool) -> None:
    if as_json:
        remote.echo_json(b.model_dump(mode="json"))
        return
    c = b.request_counts
    counts = f"{c.completed + c.failed}/{c.total} done, {c.failed} failed" if c else "-"
    click.echo(f"{b.id}  {b.status}  {b.endpoint}  {counts}")
    for name in ("input_file_id", "output_file_id", "error_file_id"):
        if getattr(b, name):
            click.echo(f"  {name}: {getattr(b, name)}")
    if b.metadata:
        click.echo(f"  metadata: {json.dumps(b.metadata)}")


def _finish(
    client: OpenAI, b: Batch, out: Path | None, errors: Path | None, quiet: bool, poll: float
) -> None:
    """Wait for `b`, download its files, exit with its outcome."""
    b = remote.wait(client, b, poll, quiet)
    remote.download_results(client, b, out, errors)
    code = remote.report(b)
    if code == outcome.SOME_FAILED and not (errors or out):
        remote.stderr.print(f"error lines: batchyard files download {b.error_file_id}", markup=False)
    sys.exit(code)


EXIT_HELP = f"\b\n{outcome.EXIT_CODES_HELP}"


@click.command(context_settings=CONTEXT, epilog=EXIT_HELP)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--endpoint",
    default=None,
    help="Endpoint of every line: " + ", ".join(ENDPOINTS) + ".",
    show_default="the url of the file's first line",
)
@click.option("--window", "completion_window", default="24h", help="Completion window.")
@click.option("--metadata", multiple=True, callback=_metadata, metavar="KEY=VALUE", help="Repeatable.")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the batch to end, with a progress bar and ETA.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the output lines here "
    "(error lines too, after them, unless --errors is given); implies --wait.",
)
@click.option(
    "--errors",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the error lines here; implies --wait.",
)
@json_option
@wait_options
@connection_options
def submit(
    file: Path,
    endpoint: str | None,
    completion_window: str,
    metadata: dict[str, str] | None,
    wait_: bool,
    output: Path | None,
    errors: Path | None,
    as_json: bool,
    quiet: bool,
    poll_interval: float,
    base_url: str,
    api_key: str | None,
) -> None:
    """Upload FILE (JSONL, purpose batch) and create a batch from it; print its id.

    With --wait (or -o/--errors) wait for it to end, download its files and exit with its outcome.
    """
    endpoint = endpoint or _endpoint_of(file)
    if endpoint is None:
        raise click.UsageError(f"{file}'s first line has no url: give --endpoint")
    client = remote.make_client(base_url, api_key)
    with remote.api_errors(base_url):
        with open(file, "rb") as fh:
            uploaded = client.files.create(file=(file.name, fh), purpose="batch")
        b = client.batches.create(
            input_file_id=uploaded.id,
            endpoint=endpoint,  # type: ignore[arg-type]
            completion_window=completion_window,  # type: ignore[arg-type]
            metadata=metadata or omit,
        )
        if as_json:
            remote.echo_json(b.model_dump(mode="json"))
        else:
            click.echo(b.id)
        if wait_ or output or errors:
            _finish(client, b, output, errors, quiet, poll_interval)


@click.group(context_settings=CONTEXT)
def batches() -> None:
    """List, inspect, cancel batches and download their results."""


@batches.command("list", context_settings=CONTEXT)
@click.option("--limit", default=20, type=click.IntRange(1, 100), help="Batches per page.")
@click.option("--after", default=None, help="List the batches after this batch id.")
@click.option("--all", "all_pages", is_flag=True, help="Every page, not just the first.")
@json_option
@connection_options
def list_batches(
    limit: int, after: str | None, all_pages: bool, as_json: bool, base_url: str, api_key: str | None
) -> None:
    """The batches, newest first."""
    client = remote.make_client(base_url, api_key)
    with remote.api_errors(base_url):
        page = client.batches.list(limit=limit, after=after or omit)
        items = list(page) if all_pages else page.data
        has_more = False if all_pages else page.has_more
    if as_json:
        data = [b.model_dump(mode="json") for b in items]
        remote.echo_json({"object": "list", "data": data, "has_more": has_more})
        return
    for b in items:
        c = b.request_counts
        counts = f"{c.completed + c.failed}/{c.total}  failed {c.failed}" if c else ""
        click.echo(f"{b.id}  {b.status:<11}  {b.endpoint:<20}  {counts}")
    if has_more:
        click.echo(f"(more: --after {items[-1].id}, or --all)", err=True)


@batches.command(
    "get",
    context_settings=CONTEXT,
    epilog="\b\n" + outcome.EXIT_CODES_HELP.replace("Exit codes:", "Exit codes with --wait:"),
)
@click.argument("batch_id")
@click.option("--wait", "wait_", is_flag=True, help="Wait for it to end; exit with its outcome.")
@json_option
@wait_options
@connection_options
def get_batch(
    batch_id: str,
    wait_: bool,
    as_json: bool,
    quiet: bool,
    poll_interval: float,
    base_url: str,
    api_key: str | None,
) -> None:
    """A batch: status, counts, files."""
    client = remote.make_client(base_url, api_key)
    with remote.api_errors(base_url):
        b = client.batches.retrieve(batch_id)
        if wait_:
            b = remote.wait(client, b, poll_interval, quiet or as_json)
    _print_batch(b, as_json)
    if wait_:
        sys.exit(outcome.exit_code(b.status, b.request_counts.failed if b.request_counts else 0))


@batches.command("cancel", context_settings=CONTEXT)
@click.argument("batch_id")
@json_option
@connection_options
def cancel_batch(batch_id: str, as_json: bool, base_url: str, api_key: str | None) -> None:
    """Cancel a batch (it goes to cancelling, then cancelled; finished lines keep their results)."""
    client = remote.make_client(base_url, api_key)
    with remote.api_errors(base_url):
        b = client.batches.cancel(batch_id)
    _print_batch(b, as_json)


@batches.command("download", context_settings=CONTEXT, epilog=EXIT_HELP)
@click.argument("batch_id")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where the output lines go (error lines too, after them, unless --errors is given).",
    show_default="stdout",
)
@click.option("--errors", type=click.Path(dir_okay=False, path_type=Path), help="Where the error lines go.")
@connection_options
def download_batch(
    batch_id: str, output: Path | None, errors: Path | None, base_url: str, api_key: str | None
) -> None:
    """Download a finished batch's output and error lines; exit with its outcome."""
    client = remote.make_client(base_url, api_key)
    with remote.api_errors(base_url):
        b = client.batches.retrieve(batch_id)
        if b.status not in remote.TERMINAL:
            remote.fail(
                f"{batch_id} is {b.status}: no results yet (wait with `batchyard batches get --wait`)"
            )
        if output is None:  # stdout: the output lines, then the error lines unless --errors takes them
            for file_id in (b.output_file_id, None if errors else b.error_file_id):
                if file_id:
                    remote.download_file(client, file_id, None)
        remote.download_results(client, b, output, errors)
    sys.exit(remote.report(b))


@click.group(context_settings=CONTEXT)
def files() -> None:
    """List, upload, download and delete files."""


@files.command("list", context_settings=CONTEXT)
@click.option("--purpose", default=None, help="Only files of this purpose (batch, batch_output, ...).")
@click.option("--limit", default=100, type=click.IntRange(1, 10000), help="Files per page.")
@json_option
@connection_options
def list_files(purpose: str | None, limit: int, as_json: bool, base_url: str, api_key: str | None) -> None:
    """The files, newest first (every page)."""
    client = remote.make_client(base_url, api_key)
    with remote.api_errors(base_url):
        items = list(client.files.list(limit=limit, purpose=purpose or omit))
    if as_json:
        remote.echo_json({"object": "list", "data": [f.model_dump(mode="json") for f in items]})
        return
    for f in items:
        click.echo(f"{f.id}  {f.purpose:<12}  {f.bytes:>12}  {f.filename}")


@files.command("upload", context_settings=CONTEXT)
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--purpose", default="batch", help="The file's purpose.")
@json_option
@connection_options
def upload_file(path: Path, purpose: str, as_json: bool, base_url: str, api_key: str | None) -> None:
    """Upload a file; print its id."""
    client = remote.make_client(base_url, api_key)
    with remote.api_errors(base_url), open(path, "rb") as fh:
        f = client.files.create(file=(path.name, fh), purpose=purpose)  # type: ignore[arg-type]
    if as_json:
        remote.echo_json(f.model_dump(mode="json"))
    else:
        click.echo(f.id)


@files.command("download", context_settings=CONTEXT)
@click.argument("file_id")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    show_default="stdout",
    help="Where the content goes.",
)
@connection_options
def download_file(file_id: str, output: Path | None, base_url: str, api_key: str | None) -> None:
    """Download a file's content."""
    client = remote.make_client(base_url, api_key)
    with remote.api_errors(base_url):
        remote.download_file(client, file_id, output)


@files.command("delete", context_settings=CONTEXT)
@click.argument("file_id")
@json_option
@connection_options
def delete_file(file_id: str, as_json: bool, base_url: str, api_key: str | None) -> None:
    """Delete a file."""
    client = remote.make_client(base_url, api_key)
    with remote.api_errors(base_url):
        d = client.files.delete(file_id)
    if as_json:
        remote.echo_json(d.model_dump(mode="json"))
    else:
        click.echo(f"deleted {d.id}" if d.deleted else f"not deleted: {d.id}")


COMMANDS = (submit, batches, files)
