"""The metadata store named by the settings."""

from __future__ import annotations

from batchyard.config import Settings
from batchyard.store.base import MetadataStore
from batchyard.store.sqlite import SQLiteStore


def open_store(settings: Settings) -> MetadataStore:
    """The metadata store named by --database-url (SQLite in the data dir by default); not opened yet."""
    url = settings.database_url
    if not url:
        return SQLiteStore(settings.database_path)
    if url.startswith("sqlite:///"):
        return SQLiteStore(url.removeprefix("sqlite:///") or settings.database_path)
    if url.startswith(("postgresql://", "postgres://")):
        from batchyard.store.postgres import PostgresStore

        return PostgresStore(url)
    raise ValueError(f"unsupported --database-url {url!r}: use sqlite:///PATH or postgresql://...")
