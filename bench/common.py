"""Shared pieces of the benchmarks: input files, an nginx zero-cost upstream, a batchyard server subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "bench-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1000, "completion_tokens": 1, "total_tokens": 1001},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_input(path: Path, lines: int, line_bytes: int = 4000, model: str = "bench-model") -> int:
    """A chat batch file of `lines` lines of about `line_bytes` bytes each; returns its size."""
    filler = "lorem ipsum dolor sit amet " * (line_bytes // 27 + 1)
    with open(path, "w") as fh:
        for i in range(lines):
            body = {
                "model": model,
                "max_tokens": 1,
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": f"{i} " + filler[: max(0, line_bytes - 230)]},
                ],
            }
            fh.write(
                json.dumps(
                    {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
                )
                + "\n"
            )
    return path.stat().st_size


def tiny_chat_batch(lines: int, **extra: object) -> bytes:
    """A batch input of `lines` one-line chat requests to model "m" (`extra` is merged into every body)."""
    return "\n".join(
        json.dumps(
            {
                "custom_id": f"r{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}], **extra},
            }
        )
        for i in range(lines)
    ).encode()


TERMINAL = ("completed", "failed", "expired", "cancelled")


class Nginx:
    """Debian's nginx answering a fixed completion body on loopback (`apt-get install nginx-light`)."""

    def __init__(self, workdir: Path, workers: int = 1) -> None:
        self.dir = workdir / "nginx"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        body = json.dumps(COMPLETION).replace("'", "\\'")
        conf = f"""
worker_processes {workers};
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {self.dir}/body;
  client_max_body_size 64m;
  client_body_buffer_size 64k;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{self.port};
    location / {{ default_type application/json; return 200 '{body}'; }}
  }}
}}
"""
        (self.dir / "nginx.conf").write_text(conf)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> Nginx:
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.path.exists(exe):
            sys.exit("nginx not found: apt-get install -y nginx-light")
        self.proc = subprocess.Popen(
            [exe, "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not ready")


class BatchyardServer:
    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.env = env  # None: this process's environment
        self.port = free_port()
        self.data = workdir / "batchyard-data"
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "server.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> BatchyardServer:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "batchyard.cli.main",
                    "serve",
                    "--port",
                    str(self.port),
                    "--data-dir",
                    str(self.data),
                    "--log-level",
                    "warning",
                    *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1)
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("batchyard did not start: " + self.log.read_text()[-2000:])

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(15)


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:  # the process ended
        pass
    return 0


def tree_pids(pid: int) -> list[int]:
    """A process and all its descendants (the server and its worker processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):  # the task ended meanwhile
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """Current resident set size of a process and its descendants together, KiB."""
    return sum(_status_kib(p, "VmRSS:") for p in tree_pids(pid))


def hwm_kib(pid: int) -> int:
    """Peak resident set size (VmHWM) summed over a process and its descendants, KiB: an upper bound of the
    tree's peak, since each process's peak counts even when they came at different times."""
    return sum(_status_kib(p, "VmHWM:") for p in tree_pids(pid))


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="batchyard-bench-"))
