"""The metadata store named by the settings."""

from __future__ import annotations

import importlib.util

from batchyard.config import Settings
from batchyard.store.base import MetadataStore
from batchyard.store.sqlite import SQLiteStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def check_database_url(url: str | None) -> None:
    """Raise ValueError (one line, for the command line) for a --database-url that cannot be opened here: an
    unknown scheme, or PostgreSQL without the [postgres] extra's driver."""
    if not url or url.startswith("sqlite:///"):
        return
    if url.startswith(POSTGRES_SCHEMES):
        if importlib.util.find_spec("asyncpg") is None:
            raise ValueError(
                "--database-url postgresql://... needs the [postgres] extra (asyncpg): "
                "pip install 'batchyard[postgres]'"
            )
        return
    raise ValueError(f"unsupported --database-url {url!r}: use sqlite:///PATH or postgresql://...")


def open_store(settings: Settings) -> MetadataStore:
    """The metadata store named by --database-url (SQLite in the data dir by default); not opened yet."""
    url = settings.database_url
    check_database_url(url)
    if not url:
        return SQLiteStore(settings.database_path)
    if url.startswith("sqlite:///"):
        return SQLiteStore(url.removeprefix("sqlite:///") or settings.database_path)
    from batchyard.store.postgres import PostgresStore

    # A transaction idle longer than a lease is from a worker the others would take over from anyway.
    return PostgresStore(url, idle_tx_timeout=max(10.0, settings.lease_seconds))
