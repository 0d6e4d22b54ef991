"""Migrations, on every backend: applied to an empty database they give exactly the schema written down below, and
applying them again (reopening, or several processes opening one new database at once) changes nothing.

The expected schema is one backend-neutral table of columns, keys and indexes, mapped to each backend's types, and
compared with what the database itself reports (SQLite's pragmas, PostgreSQL's catalogs). So a migration that adds,
drops or retypes a column, or forgets an index, fails here; and so does one backend drifting from the other.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg

from batchyard.domain.models import FileRecord
from batchyard.store import postgres as pg_store
from batchyard.store import sqlite as sqlite_store
from tests.contract.conftest import Clock, StoreFactory
from tests.support.postgres import PostgresCluster

# -- the intended schema --------------------------------------------------------------------------------------

# Logical type -> (SQLite declared type, PostgreSQL type). "serial" is the insertion order every list pages by.
TYPES = {
    "serial": ("INTEGER AUTOINCREMENT", "bigint IDENTITY ALWAYS"),
    "int": ("INTEGER", "integer"),
    "bigint": ("INTEGER", "bigint"),
    "text": ("TEXT", "text"),
    "bool": ("INTEGER", "boolean"),
    "float": ("REAL", "double precision"),
    "json": ("TEXT", "json"),
    "bytes": ("BLOB", "bytea"),
}
# Logical default -> (SQLite, PostgreSQL), as each reports it.
DEFAULTS = {
    "zero": ("0", "0"),
    "false": ("0", "false"),
    "pending": ("'pending'", "'pending'::text"),
    "one": ("1.0", "1.0"),
}

NULL, NOT_NULL = False, True
TIMESTAMPS = ["in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at"]

# table -> [(column, logical type, NOT NULL, default)], in table order
COLUMNS: dict[str, list[tuple[str, str, bool, str | None]]] = {
    "schema_migrations": [("version", "int", NOT_NULL, None)],
    "files": [
        ("seq", "serial", NOT_NULL, None),
        ("id", "text", NOT_NULL, None),
        ("owner", "text", NOT_NULL, None),
        ("bytes", "bigint", NOT_NULL, None),
        ("created_at", "bigint", NOT_NULL, None),
        ("expires_at", "bigint", NULL, None),
        ("filename", "text", NOT_NULL, None),
        ("purpose", "text", NOT_NULL, None),
        ("status", "text", NOT_NULL, None),
        ("blob_key", "text", NOT_NULL, None),
        ("sha256", "text", NOT_NULL, None),
        ("deleted", "bool", NOT_NULL, "false"),
        ("blob_removed", "bool", NOT_NULL, "false"),
    ],
    "batches": [
        ("seq", "serial", NOT_NULL, None),
        ("id", "text", NOT_NULL, None),
        ("owner", "text", NOT_NULL, None),
        ("endpoint", "text", NOT_NULL, None),
        ("input_file_id", "text", NOT_NULL, None),
        ("completion_window", "text", NOT_NULL, None),
        ("status", "text", NOT_NULL, None),
        ("created_at", "bigint", NOT_NULL, None),
        ("expires_at", "bigint", NOT_NULL, None),
        ("metadata", "json", NULL, None),
        ("output_expires_after", "bigint", NULL, None),
        ("model", "text", NULL, None),
        ("output_file_id", "text", NULL, None),
        ("error_file_id", "text", NULL, None),
        *[(name, "bigint", NULL, None) for name in TIMESTAMPS],
        ("cancelled_at", "bigint", NULL, None),
        ("errors", "json", NULL, None),
        ("total", "bigint", NOT_NULL, "zero"),
        ("planned", "bool", NOT_NULL, "false"),
        ("job_owner", "text", NULL, None),
        ("job_lease_until", "float", NULL, None),
    ],
    "shards": [
        ("batch_id", "text", NOT_NULL, None),
        ("idx", "int", NOT_NULL, None),
        ("start_off", "bigint", NOT_NULL, None),
        ("end_off", "bigint", NOT_NULL, None),
        ("first_line", "bigint", NOT_NULL, None),
        ("line_count", "int", NOT_NULL, None),
        ("status", "text", NOT_NULL, "pending"),
        ("attempt", "int", NOT_NULL, "zero"),
        ("lease_owner", "text", NULL, None),
        ("lease_until", "float", NULL, None),
        *[
            (name, "bigint", NOT_NULL, "zero")
            for name in (
                "completed",
                "failed",
                "expired",
                "input_tokens",
                "cached_tokens",
                "output_tokens",
                "reasoning_tokens",
            )
        ],
        ("out_key", "text", NULL, None),
        ("err_key", "text", NULL, None),
        ("failures", "int", NOT_NULL, "zero"),
        ("last_error", "text", NULL, None),
        ("retry_at", "float", NULL, None),
        ("spans", "bytes", NULL, None),
        ("cancelled", "int", NOT_NULL, "zero"),
        ("upstream_failed", "int", NOT_NULL, "zero"),
        ("started_at", "float", NULL, None),
        ("done_at", "float", NULL, None),
    ],
    "uploads": [
        ("seq", "serial", NOT_NULL, None),
        ("id", "text", NOT_NULL, None),
        ("owner", "text", NOT_NULL, None),
        ("filename", "text", NOT_NULL, None),
        ("purpose", "text", NOT_NULL, None),
        ("bytes", "bigint", NOT_NULL, None),
        ("mime_type", "text", NOT_NULL, None),
        ("status", "text", NOT_NULL, None),
        ("created_at", "bigint", NOT_NULL, None),
        ("expires_at", "bigint", NOT_NULL, None),
        ("file_expires_after", "bigint", NULL, None),
        ("file_id", "text", NULL, None),
    ],
    "upload_parts": [
        ("id", "text", NOT_NULL, None),
        ("upload_id", "text", NOT_NULL, None),
        ("bytes", "bigint", NOT_NULL, None),
        ("blob_key", "text", NOT_NULL, None),
        ("created_at", "bigint", NOT_NULL, None),
    ],
    "webhook_events": [
        ("seq", "serial", NOT_NULL, None),
        ("id", "text", NOT_NULL, None),
        ("batch_id", "text", NOT_NULL, None),
        ("owner", "text", NOT_NULL, None),
        ("type", "text", NOT_NULL, None),
        ("created_at", "bigint", NOT_NULL, None),
        ("status", "text", NOT_NULL, "pending"),
        ("attempts", "int", NOT_NULL, "zero"),
        ("next_at", "float", NOT_NULL, None),
        ("lease_owner", "text", NULL, None),
        ("lease_until", "float", NULL, None),
        ("last_error", "text", NULL, None),
    ],
    "projects": [
        ("seq", "serial", NOT_NULL, None),
        ("id", "text", NOT_NULL, None),
        ("name", "text", NOT_NULL, None),
        ("created_at", "bigint", NOT_NULL, None),
        ("archived_at", "bigint", NULL, None),
        ("weight", "float", NOT_NULL, "one"),
    ],
    "api_keys": [
        ("seq", "serial", NOT_NULL, None),
        ("id", "text", NOT_NULL, None),
        ("project_id", "text", NOT_NULL, None),
        ("name", "text", NOT_NULL, None),
        ("key_hash", "text", NOT_NULL, None),
        ("prefix", "text", NOT_NULL, None),
        ("admin", "bool", NOT_NULL, "false"),
        ("created_at", "bigint", NOT_NULL, None),
        ("revoked_at", "bigint", NULL, None),
    ],
    "idempotency_keys": [
        ("owner", "text", NOT_NULL, None),
        ("key", "text", NOT_NULL, None),
        ("route", "text", NOT_NULL, None),
        ("fingerprint", "text", NOT_NULL, None),
        ("object_id", "text", NOT_NULL, None),
        ("created_at", "bigint", NOT_NULL, None),
    ],
    "webhook_endpoints": [
        ("seq", "serial", NOT_NULL, None),
        ("id", "text", NOT_NULL, None),
        ("owner", "text", NOT_NULL, None),
        ("url", "text", NOT_NULL, None),
        ("secret", "text", NOT_NULL, None),
        ("previous_secret", "text", NULL, None),
        ("previous_until", "bigint", NULL, None),
        ("created_at", "bigint", NOT_NULL, None),
        ("disabled_at", "bigint", NULL, None),
    ],
    "webhook_deliveries": [
        ("seq", "serial", NOT_NULL, None),
        ("event_id", "text", NOT_NULL, None),
        ("endpoint_id", "text", NOT_NULL, None),
        ("attempted_at", "float", NOT_NULL, None),
        ("duration_ms", "int", NOT_NULL, None),
        ("status_code", "int", NULL, None),
        ("error", "text", NULL, None),
    ],
    "upstream_load": [
        ("holder", "text", NOT_NULL, None),
        ("upstream", "text", NOT_NULL, None),
        ("machine", "text", NOT_NULL, None),
        ("demand", "int", NOT_NULL, None),
        ("in_flight", "int", NOT_NULL, None),
        ("expires_at", "float", NOT_NULL, None),
    ],
}
PRIMARY_KEYS = {
    "schema_migrations": ("version",),
    "files": ("seq",),
    "batches": ("seq",),
    "shards": ("batch_id", "idx"),
    "uploads": ("seq",),
    "upload_parts": ("id",),
    "webhook_events": ("seq",),
    "projects": ("seq",),
    "api_keys": ("seq",),
    "idempotency_keys": ("owner", "key"),
    "webhook_endpoints": ("seq",),
    "webhook_deliveries": ("seq",),
    "upstream_load": ("holder", "upstream"),
}
UNIQUE = {
    "files": [("id",)],
    "batches": [("id",)],
    "uploads": [("id",)],
    "webhook_events": [("batch_id",), ("id",)],
    "projects": [("id",), ("name",)],
    "api_keys": [("id",), ("key_hash",)],
    "webhook_endpoints": [("id",)],
}
# index -> (table, columns, partial-index predicate as (SQLite, PostgreSQL) report it)
INDEXES: dict[str, tuple[str, tuple[str, ...], tuple[str, str] | None]] = {
    "files_owner_seq": ("files", ("owner", "seq"), None),
    "batches_owner_seq": ("batches", ("owner", "seq"), None),
    "batches_status": ("batches", ("status",), None),
    "shards_open": ("shards", ("status", "lease_until"), ("status != 'done'", "(status <> 'done'::text)")),
    "upload_parts_upload": ("upload_parts", ("upload_id",), None),
    "webhook_events_due": ("webhook_events", ("status", "next_at"), None),
    "api_keys_project": ("api_keys", ("project_id", "seq"), None),
    "idempotency_keys_created": ("idempotency_keys", ("created_at",), None),
    "webhook_endpoints_owner": ("webhook_endpoints", ("owner", "seq"), None),
    "webhook_deliveries_event": ("webhook_deliveries", ("event_id", "seq"), None),
    "webhook_events_owner": ("webhook_events", ("owner", "seq"), None),
    "shards_done": ("shards", ("done_at",), None),
}


def expected(backend: str) -> dict[str, Any]:
    """The intended schema in the form `snapshot` reports it for `backend`."""
    i = 0 if backend == "sqlite" else 1
    return {
        "columns": {
            table: [
                (name, TYPES[typ][i], not_null, None if default is None else DEFAULTS[default][i])
                for name, typ, not_null, default in cols
            ]
            for table, cols in COLUMNS.items()
        },
        "primary_keys": PRIMARY_KEYS,
        "unique": {t: sorted(u) for t, u in UNIQUE.items()},
        "indexes": {
            name: (table, cols, None if pred is None else pred[i])
            for name, (table, cols, pred) in INDEXES.items()
        },
    }


# -- what the database says -----------------------------------------------------------------------------------


def sqlite_snapshot(path: Path) -> dict[str, Any]:
    with sqlite3.connect(path) as db:
        tables = {
            name: sql
            for name, sql in db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'")
            if not name.startswith("sqlite_")
        }
        columns: dict[str, list[tuple[str, str, bool, str | None]]] = {}
        primary_keys: dict[str, tuple[str, ...]] = {}
        unique: dict[str, list[tuple[str, ...]]] = {}
        indexes: dict[str, tuple[str, tuple[str, ...], str | None]] = {}
        for table, sql in tables.items():
            info = db.execute(f"PRAGMA table_info({table})").fetchall()  # cid, name, type, notnull, dflt, pk
            pk = [r[1] for r in sorted((r for r in info if r[5]), key=lambda r: r[5])]
            primary_keys[table] = tuple(pk)
            cols = []
            for _, name, typ, notnull, dflt, _pk in info:
                if re.search(rf"\b{name}\s+INTEGER\s+PRIMARY\s+KEY\s+AUTOINCREMENT\b", sql, re.IGNORECASE):
                    typ += " AUTOINCREMENT"
                rowid_alias = pk == [name] and typ.startswith("INTEGER")  # never NULL, whatever it declares
                cols.append((name, typ, bool(notnull) or rowid_alias, dflt))
            columns[table] = cols
            for _, index, _unique, origin, partial in db.execute(f"PRAGMA index_list({table})"):
                index_cols = tuple(r[2] for r in db.execute(f"PRAGMA index_info({index})"))
                if origin == "u":
                    unique.setdefault(table, []).append(index_cols)
                elif origin == "c":
                    (index_sql,) = db.execute(
                        "SELECT sql FROM sqlite_master WHERE name = ?", (index,)
                    ).fetchone()
                    pred = index_sql.split(" WHERE ", 1)[1].strip() if partial else None
                    indexes[index] = (table, index_cols, pred)
    return {
        "columns": columns,
        "primary_keys": primary_keys,
        "unique": {t: sorted(u) for t, u in unique.items()},
        "indexes": indexes,
    }


async def postgres_snapshot(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT table_name, column_name, data_type, is_nullable, column_default, is_identity, "
            "identity_generation FROM information_schema.columns WHERE table_schema = 'public' "
            "ORDER BY table_name, ordinal_position"
        )
        index_rows = await conn.fetch(
            "SELECT t.relname AS table_name, i.relname AS index_name, x.indisprimary, con.contype::text AS contype, "
            "ARRAY(SELECT a.attname FROM unnest(x.indkey::int2[]) WITH ORDINALITY k(attnum, n) "
            "      JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum ORDER BY k.n) AS cols, "
            "pg_get_expr(x.indpred, x.indrelid) AS pred "
            "FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid "
            "JOIN pg_namespace n ON n.oid = t.relnamespace LEFT JOIN pg_constraint con ON con.conindid = x.indexrelid "
            "AND con.contype <> 'f' "  # a foreign key names the index it references: not its own constraint
            "WHERE n.nspname = 'public'"
        )
        others = await conn.fetch(
            "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind NOT IN ('r', 'i', 'S')"  # views, types, ...: none expected
        )
    finally:
        await conn.close()
    assert [tuple(r) for r in others] == []
    columns: dict[str, list[tuple[str, str, bool, str | None]]] = {}
    for r in rows:
        typ = r["data_type"] + (f" IDENTITY {r['identity_generation']}" if r["is_identity"] == "YES" else "")
        columns.setdefault(r["table_name"], []).append(
            (r["column_name"], typ, r["is_nullable"] == "NO", r["column_default"])
        )
    primary_keys: dict[str, tuple[str, ...]] = {}
    unique: dict[str, list[tuple[str, ...]]] = {}
    indexes: dict[str, tuple[str, tuple[str, ...], str | None]] = {}
    for r in index_rows:
        cols = tuple(r["cols"])
        if r["indisprimary"]:
            primary_keys[r["table_name"]] = cols
        elif r["contype"] == "u":
            unique.setdefault(r["table_name"], []).append(cols)
        else:
            indexes[r["index_name"]] = (r["table_name"], cols, r["pred"])
    return {
        "columns": {t: columns[t] for t in sorted(columns)},
        "primary_keys": primary_keys,
        "unique": {t: sorted(u) for t, u in unique.items()},
        "indexes": indexes,
    }


async def snapshot(backend: str, db_path: Path, pg_dsn: str | None) -> dict[str, Any]:
    if backend == "sqlite":
        return sqlite_snapshot(db_path)
    assert pg_dsn is not None
    return await postgres_snapshot(pg_dsn)


async def versions(backend: str, db_path: Path, pg_dsn: str | None) -> list[int]:
    """The versions the database's schema_migrations table lists."""
    if backend == "sqlite":
        with sqlite3.connect(db_path) as db:
            return [r[0] for r in db.execute("SELECT version FROM schema_migrations ORDER BY version")]
    conn = await asyncpg.connect(pg_dsn)
    try:
        return [r[0] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")]
    finally:
        await conn.close()


def all_versions(backend: str) -> list[int]:
    mod = sqlite_store if backend == "sqlite" else pg_store
    return [v for v, _ in mod.migrations()]


def assert_same_schema(got: dict[str, Any], want: dict[str, Any]) -> None:
    # Piece by piece, so that a failure shows the table or index that differs.
    assert sorted(got["columns"]) == sorted(want["columns"])
    for table, cols in want["columns"].items():
        assert got["columns"][table] == cols, table
    assert got["primary_keys"] == want["primary_keys"]
    assert got["unique"] == want["unique"]
    assert got["indexes"] == want["indexes"]


# -- tests ----------------------------------------------------------------------------------------------------


def test_sqlite_migration_statements_split_where_sqlite_says_a_statement_ends() -> None:
    """A `;` inside a string literal, a comment or a trigger body does not end a statement."""
    script = (
        "CREATE TABLE t (a TEXT DEFAULT 'x;y'); -- a comment; with a semicolon\n"
        "CREATE TRIGGER t_ins AFTER INSERT ON t BEGIN\n"
        "  UPDATE t SET a = a || ';' WHERE rowid = NEW.rowid;\n"
        "  SELECT 1;\n"
        "END;\n"
        "/* a block comment; */ INSERT INTO t (a) VALUES ('p;q');\n"
        "INSERT INTO t DEFAULT VALUES"
    )
    stmts = sqlite_store._statements(script)
    assert len(stmts) == 4
    assert stmts[1].startswith("CREATE TRIGGER") and stmts[1].endswith("END;")
    assert stmts[3] == "INSERT INTO t DEFAULT VALUES"  # the last one needs no `;`
    db = sqlite3.connect(":memory:")
    for stmt in stmts:
        db.execute(stmt)
    assert sorted(r[0] for r in db.execute("SELECT a FROM t")) == ["p;q;", "x;y;"]


def test_both_backends_have_the_same_numbered_migrations() -> None:
    sq, pg = all_versions("sqlite"), all_versions("postgres")
    assert sq == pg
    assert sq == list(range(1, len(sq) + 1))


def test_the_expected_schema_is_the_same_on_both_backends() -> None:
    # The mapping itself must not let the backends drift: same tables, same columns in the same order.
    sq, pg = expected("sqlite"), expected("postgres")
    assert {t: [c[0] for c in cols] for t, cols in sq["columns"].items()} == {
        t: [c[0] for c in cols] for t, cols in pg["columns"].items()
    }
    assert {t: [c[2] for c in cols] for t, cols in sq["columns"].items()} == {
        t: [c[2] for c in cols] for t, cols in pg["columns"].items()
    }


async def test_migrations_give_exactly_the_intended_schema(
    backend: str, make_store: StoreFactory, db_path: Path, pg_dsn: str | None
) -> None:
    s = make_store(Clock())
    await s.open()
    await s.close()
    assert_same_schema(await snapshot(backend, db_path, pg_dsn), expected(backend))
    assert await versions(backend, db_path, pg_dsn) == all_versions(backend)


async def test_reapplying_is_a_no_op(
    backend: str, make_store: StoreFactory, db_path: Path, pg_dsn: str | None
) -> None:
    first = make_store(Clock())
    await first.open()
    f = FileRecord(
        id="file-1", owner="key_a", bytes=3, created_at=1, filename="a.jsonl", purpose="batch", blob_key="k"
    )
    await first.insert_file(f)
    await first.close()
    before = await snapshot(backend, db_path, pg_dsn)
    for _ in range(3):
        again = make_store(Clock())
        await again.open()
        assert await again.get_file(None, f.id) == f  # nothing dropped or recreated
        await again.close()
    assert await snapshot(backend, db_path, pg_dsn) == before
    assert await versions(backend, db_path, pg_dsn) == all_versions(backend)


async def test_postgres_migrate_reports_nothing_to_do_the_second_time(pg_cluster: PostgresCluster) -> None:
    dsn = await pg_cluster.create_database()
    try:
        conn = await asyncpg.connect(dsn)
        try:
            assert await pg_store.migrate(conn) == all_versions("postgres")
            assert await pg_store.migrate(conn) == []
        finally:
            await conn.close()
        assert_same_schema(await postgres_snapshot(dsn), expected("postgres"))
    finally:
        await pg_cluster.drop_database(dsn)


async def test_many_processes_opening_a_new_database_at_once(
    backend: str, make_store: StoreFactory, db_path: Path, pg_dsn: str | None
) -> None:
    # Each store has its own connection(s), as separate processes would: the migrations are applied once (the
    # advisory lock on PostgreSQL, BEGIN IMMEDIATE on SQLite), and none of the openers fails.
    stores = [make_store(Clock()) for _ in range(8)]
    opened = await asyncio.gather(*(s.open() for s in stores), return_exceptions=True)
    await asyncio.gather(*(s.close() for s in stores))
    assert [repr(r) for r in opened if r is not None] == []
    assert_same_schema(await snapshot(backend, db_path, pg_dsn), expected(backend))
    assert await versions(backend, db_path, pg_dsn) == all_versions(backend)


async def test_a_sqlite_database_at_the_current_schema_opens_and_reads_while_another_process_holds_the_write_lock(
    db_path: Path,
) -> None:
    # A worker stopped (SIGSTOP) inside a commit keeps SQLite's write lock; an API replica started meanwhile must
    # still open the store and serve reads, rather than wait for the lock its migrations do not need.
    first = sqlite_store.SQLiteStore(db_path, clock=Clock())
    await first.open()
    f = FileRecord(
        id="file-1", owner="key_a", bytes=3, created_at=1, filename="a.jsonl", purpose="batch", blob_key="k"
    )
    await first.insert_file(f)
    await first.close()
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("PRAGMA busy_timeout=0")
    holder.execute("BEGIN IMMEDIATE")
    try:
        again = sqlite_store.SQLiteStore(db_path, clock=Clock())
        await asyncio.wait_for(again.open(), timeout=10)  # before: waited the 30 s busy timeout, then failed
        assert await again.get_file(None, f.id) == f
        await again.close()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
