"""MetadataStore backends for the contract suite: every `store` test runs on SQLite, on PostgreSQL and on the in-memory
fake (test_store_contract.py widens `backend` to BACKENDS; the other suites here, such as the migrations, need a real
database and see only DATABASES).

One throwaway PostgreSQL cluster serves the whole session; each PostgreSQL test gets a new, empty database (the store
applies its migrations on open) that is dropped afterwards. Without the PostgreSQL binaries the postgres half is
skipped with the reason; the sqlite half still runs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from batchyard.store.base import MetadataStore
from batchyard.store.memory import MemoryStore
from batchyard.store.postgres import PostgresStore
from batchyard.store.sqlite import SQLiteStore
from tests.support.postgres import PostgresCluster

T0 = 1_700_000_000.25
DATABASES = ["sqlite", "postgres"]  # the backends with a database behind them
BACKENDS = [*DATABASES, "memory"]  # every MetadataStore

StoreFactory = Callable[..., MetadataStore]


class Clock:
    """A fake store clock: leases expire when the test says so."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=DATABASES)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "meta" / "batchyard.sqlite3"


@pytest.fixture
async def pg_dsn(backend: str, request: pytest.FixtureRequest) -> AsyncIterator[str | None]:
    """A new, empty PostgreSQL database for this test (None on the other backends)."""
    if backend != "postgres":
        yield None
        return
    cluster: PostgresCluster = request.getfixturevalue("pg_cluster")
    dsn = await cluster.create_database()
    yield dsn
    await cluster.drop_database(dsn)


@pytest.fixture
def make_store(backend: str, db_path: Path, pg_dsn: str | None) -> StoreFactory:
    """Unopened stores on this test's database: `make_store(clock)`; without a clock, the database's own.

    On "memory" each call makes a new, empty MemoryStore: there is no database for two stores to share.
    """

    def make(clock: Callable[[], float] | None = None) -> MetadataStore:
        if backend == "memory":
            return MemoryStore(clock=clock)
        if backend == "sqlite":
            return SQLiteStore(db_path) if clock is None else SQLiteStore(db_path, clock=clock)
        assert pg_dsn is not None
        return PostgresStore(pg_dsn, clock=clock)

    return make


@pytest.fixture
async def store(make_store: StoreFactory, clock: Clock) -> AsyncIterator[MetadataStore]:
    s = make_store(clock)
    await s.open()
    yield s
    await s.close()
