"""batchyard commands as real child processes for tests: `serve` (see tests/conftest.py) and `worker`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ChildProcess:
    """`python -m batchyard.cli.main COMMAND ARGS` with its output in a log file; kill -9, stop, signal, log."""

    def __init__(self, command: str, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.command = command
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self, args: list[str]) -> None:
        env = {**os.environ, **(self.env or {})}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "batchyard.cli.main", self.command, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=env,
            )

    def kill(self) -> None:
        """kill -9: no cleanup of any kind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        """The whole log (not a tail: the access log's lines would push out what a test looks for)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class WorkerProcess(ChildProcess):
    """`batchyard worker` (no API) for scale-out tests."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        super().__init__("worker", log_path, env)
        self.args = args

    def start(self) -> WorkerProcess:
        self.spawn(self.args)
        return self
