"""The client side of the CLI (`submit`, `batches`, `files`): an official `openai` client for any OpenAI-compatible
Batch API, API errors turned into one line and an exit code, waiting with a progress bar, downloads."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, NoReturn

import click
import openai
from openai import OpenAI
from openai.types import Batch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from batchyard.cli import outcome

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
NO_KEY = "sk-no-key"  # sent when no key is given: a batchyard without --api-key takes any
TERMINAL = ("completed", "failed", "expired", "cancelled")

stderr = Console(stderr=True, highlight=False, soft_wrap=True)


def fail(message: str, code: int = outcome.ERROR) -> NoReturn:
    stderr.print(f"error: {message}", markup=False)
    sys.exit(code)


def make_client(base_url: str, api_key: str | None, quiet: bool = False) -> OpenAI:
    if not quiet:
        stderr.print(f"batchyard: {base_url}", markup=False, style="dim")
    return OpenAI(base_url=base_url, api_key=api_key or NO_KEY)


@contextlib.contextmanager
def api_errors(base_url: str) -> Iterator[None]:
    """OpenAI's message and code on one line and exit 1, for every error the SDK raises; no traceback."""
    try:
        yield
    except openai.APIStatusError as e:
        err = e.body if isinstance(e.body, dict) else {}  # the SDK keeps the body's "error" object
        if isinstance(err.get("error"), dict):
            err = err["error"]
        message = err.get("message") or e.response.text[:300] or e.response.reason_phrase
        code = err.get("code") or err.get("type")
        fail(f"{message} (HTTP {e.status_code}" + (f", code {code})" if code else ")"))
    except openai.APIConnectionError as e:
        cause = e.__cause__ or e
        fail(f"cannot reach {base_url}: {cause} (is the server running? --base-url / OPENAI_BASE_URL)")
    except openai.OpenAIError as e:
        fail(str(e))


INTERRUPTED = 130


def wait(client: OpenAI, batch: Batch, poll: float, quiet: bool) -> Batch:
    """Poll until `batch` ends; a progress bar with counts and an ETA on stderr meanwhile (unless quiet). Ctrl-C
    stops the waiting only (exit 130): the batch goes on."""
    try:
        return _wait(client, batch, poll, quiet)
    except KeyboardInterrupt:
        stderr.print(
            f"stopped waiting; {batch.id} goes on (batchyard batches get {batch.id} --wait)", markup=False
        )
        sys.exit(INTERRUPTED)


def _wait(client: OpenAI, batch: Batch, poll: float, quiet: bool) -> Batch:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, disable=quiet, transient=False) as bar:
        task = bar.add_task(str(batch.status), total=None, failed=0)
        while True:
            counts = batch.request_counts
            if counts is not None and counts.total:
                bar.update(
                    task,
                    total=counts.total,
                    completed=counts.completed + counts.failed,
                    failed=counts.failed,
                    description=str(batch.status),
                )
            else:
                bar.update(task, description=str(batch.status))
            if batch.status in TERMINAL:
                return batch
            time.sleep(poll)
            batch = client.batches.retrieve(batch.id)


def report(batch: Batch) -> int:
    """One line on how `batch` ended (and a failed validation's errors); its exit code."""
    counts = batch.request_counts
    done, failed = (counts.completed, counts.failed) if counts else (0, 0)
    stderr.print(f"{batch.id} {batch.status}: {done} succeeded, {failed} failed", markup=False)
    if batch.errors and batch.errors.data:
        for e in batch.errors.data:
            where = f"line {e.line}" if e.line is not None else "file"
            param = f" ({e.param})" if e.param else ""
            stderr.print(f"  {where}: {e.code}{param}: {e.message}", markup=False)
    return outcome.exit_code(batch.status, failed)


def download_file(client: OpenAI, file_id: str, dest: Path | None, append: bool = False) -> None:
    """A file's content to `dest` (stdout when None), streamed; a new file appears only once complete."""
    if dest is None:
        _stream(client, file_id, sys.stdout.buffer.write)
        sys.stdout.buffer.flush()
        return
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        if append and dest.exists():
            with open(dest, "ab") as fh:
                _stream(client, file_id, fh.write)
            return
        with open(tmp, "wb") as fh:
            _stream(client, file_id, fh.write)
        os.replace(tmp, dest)
    except OSError as e:
        fail(f"cannot write {dest}: {e.strerror or e}")
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _stream(client: OpenAI, file_id: str, write: Callable[[bytes], Any]) -> None:
    with client.files.with_streaming_response.content(file_id) as response:
        for chunk in response.iter_bytes(1 << 20):
            write(chunk)


def download_results(client: OpenAI, batch: Batch, out: Path | None, errors: Path | None) -> None:
    """The output file to `out` and the error file to `errors` (after the output lines in `out` when no
    `errors` is given, as `batchyard run` writes them); an empty file for a side the batch has none of."""
    targets = [(out, batch.output_file_id), (errors if errors else out, batch.error_file_id)]
    written: set[Path | None] = set()
    for dest, file_id in targets:
        if dest is None:
            continue
        if file_id:
            download_file(client, file_id, dest, append=dest in written)
        elif dest not in written:
            _touch(dest)
        written.add(dest)


def _touch(dest: Path) -> None:
    try:
        dest.write_bytes(b"")
    except OSError as e:
        fail(f"cannot write {dest}: {e.strerror or e}")


def echo_json(obj: Any, out: IO[str] | None = None) -> None:
    click.echo(obj if isinstance(obj, str) else _dumps(obj), file=out)


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, ensure_ascii=False)
