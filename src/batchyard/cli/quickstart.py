"""`batchyard quickstart`: a real batch on the embedded engine, end to end, in under a minute.

Starts the server in this process on a free loopback port, writes a small sample batch (chat and embeddings),
submits it through the HTTP API with the official openai SDK, shows a progress bar, prints a few results and
where the files are.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import click

from batchyard.cli.progress import ProgressBar
from batchyard.config import Settings
from batchyard.upstreams.embedded import CHAT_MODEL, EMBEDDING_MODEL

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 + 30?",
    "Give a synonym for 'happy'.",
    "What do bees make?",
    "Which planet is known as the red planet?",
    "Translate 'thank you' into Spanish.",
    "What is the boiling point of water in Celsius?",
]
SENTENCES = [
    "Batch APIs trade latency for throughput.",
    "Les chats dorment beaucoup.",
    "A shard is a byte range of the input file.",
    "Der Himmel ist heute blau.",
    "Embeddings map text to vectors.",
    "La lluvia en Sevilla es una maravilla.",
]


def default_dir() -> Path:
    """Where quickstart writes when no --dir is given: `$XDG_CACHE_HOME/batchyard/quickstart` (else
    `~/.cache/batchyard/quickstart`), or a new temporary directory when that cannot be created."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    path = base / "batchyard" / "quickstart"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return Path(tempfile.mkdtemp(prefix="batchyard-quickstart-"))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sample_files(workdir: Path) -> tuple[Path, Path]:
    chat = workdir / "chat-input.jsonl"
    emb = workdir / "embeddings-input.jsonl"
    with open(chat, "w") as fh:
        for i, q in enumerate(QUESTIONS):
            body = {
                "model": CHAT_MODEL,
                "temperature": 0,
                "max_tokens": 24,
                "messages": [
                    {"role": "system", "content": "Answer in one short sentence."},
                    {"role": "user", "content": q},
                ],
            }
            fh.write(
                json.dumps(
                    {"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
                )
                + "\n"
            )
    with open(emb, "w") as fh:
        for i, text in enumerate(SENTENCES):
            fh.write(
                json.dumps(
                    {
                        "custom_id": f"emb-{i}",
                        "method": "POST",
                        "url": "/v1/embeddings",
                        "body": {"model": EMBEDDING_MODEL, "input": text},
                    }
                )
                + "\n"
            )
    return chat, emb


class _InProcessServer:
    """uvicorn serving batchyard on a thread of this process."""

    def __init__(self, settings: Settings) -> None:
        import uvicorn

        from batchyard.runtime import Runtime

        self.runtime = Runtime.create(settings)
        config = uvicorn.Config(
            self.runtime.app(),
            host=settings.host,
            port=settings.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="batchyard-server", daemon=True)

    def __enter__(self) -> _InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise click.ClickException("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def _download_model() -> None:
    from batchyard.embedded.models import ensure_smollm2

    bar: ProgressBar | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            click.echo(f"Fetching {CHAT_MODEL} (Q4_1 GGUF, ~98 MB, once; cached afterwards)", err=True)
            bar = ProgressBar(total, "download", unit="bytes")
        bar.update(done)

    ensure_smollm2(progress=progress)
    if bar is not None:
        bar.close()


def run_quickstart(workdir: Path) -> int:
    from openai import OpenAI

    workdir.mkdir(parents=True, exist_ok=True)
    _download_model()
    port = _free_port()
    settings = Settings(data_dir=workdir / "data", port=port, embedded_slots=4, shard_lines=4)
    chat_in, emb_in = sample_files(workdir)
    started = time.monotonic()
    with _InProcessServer(settings):
        base = f"http://127.0.0.1:{port}/v1"
        click.echo(f"batchyard is serving {base} (OpenAI-compatible; this process only)", err=True)
        client = OpenAI(base_url=base, api_key="quickstart", max_retries=0)
        batches = []
        for path, endpoint in ((chat_in, "/v1/chat/completions"), (emb_in, "/v1/embeddings")):
            with open(path, "rb") as fh:
                f = client.files.create(file=(path.name, fh), purpose="batch")
            b = client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]
            click.echo(f"  created {b.id} for {endpoint} ({path.name})", err=True)
            batches.append(b)
        total = len(QUESTIONS) + len(SENTENCES)
        bar = ProgressBar(total, "quickstart")
        while True:
            batches = [client.batches.retrieve(b.id) for b in batches]
            done = sum(
                (b.request_counts.completed + b.request_counts.failed) if b.request_counts else 0
                for b in batches
            )
            failed = sum(b.request_counts.failed if b.request_counts else 0 for b in batches)
            bar.update(done, failed, "/".join(b.status for b in batches))
            if all(b.status in ("completed", "failed", "expired", "cancelled") for b in batches):
                break
            time.sleep(0.2)
        bar.close()
        return _report(client, batches, workdir, time.monotonic() - started)


def _report(client: Any, batches: list[Any], workdir: Path, elapsed: float) -> int:
    ok = True
    for b in batches:
        kind = "chat" if b.endpoint == "/v1/chat/completions" else "embeddings"
        click.echo(
            f"\n{b.id} {b.endpoint}: {b.status}, {b.request_counts.completed} succeeded, "
            f"{b.request_counts.failed} failed, tokens in/out {b.usage.input_tokens}/{b.usage.output_tokens}"
        )
        if b.status != "completed" or b.output_file_id is None:
            ok = False
            if b.errors:
                for e in b.errors.data[:5]:
                    click.echo(f"  line {e.line}: {e.code}: {e.message}")
            continue
        out = workdir / f"{kind}-output.jsonl"
        client.files.content(b.output_file_id).write_to_file(out)
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        lines.sort(key=lambda x: int(x["custom_id"].split("-")[1]))
        for line in lines[:3]:
            body = line["response"]["body"]
            if kind == "chat":
                q = QUESTIONS[int(line["custom_id"].split("-")[1])]
                a = body["choices"][0]["message"]["content"].strip().replace("\n", " ")
                click.echo(f"  {line['custom_id']}: {q!r} -> {a!r}")
            else:
                vec = body["data"][0]["embedding"]
                click.echo(
                    f"  {line['custom_id']}: {len(vec)}-dim vector [{vec[0]:+.3f}, {vec[1]:+.3f}, ...]"
                )
        click.echo(f"  output file: {out}")
        if b.error_file_id:
            err = workdir / f"{kind}-errors.jsonl"
            client.files.content(b.error_file_id).write_to_file(err)
            click.echo(f"  error file:  {err}")
    click.echo(
        f"\nDone in {elapsed:.1f}s. Inputs and outputs are in {workdir}/. Next: `batchyard serve` and point "
        "any OpenAI client at http://127.0.0.1:8000/v1."
    )
    return 0 if ok else 1


def main(workdir: Path | None) -> None:
    try:
        code = run_quickstart(workdir or default_dir())
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
