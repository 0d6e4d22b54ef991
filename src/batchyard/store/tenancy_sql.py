"""The SQL of projects and API keys that the SQLite and PostgreSQL stores share (`?` placeholders; the PostgreSQL
store runs `sql.numbered(...)` of each), and their rows -> records."""

from __future__ import annotations

from typing import Any

from batchyard.domain.states import ACTIVE
from batchyard.domain.tenancy import ApiKeyRecord, KeyHolder, ProjectRecord
from batchyard.store.sql import in_list

Row = Any  # sqlite3.Row or asyncpg.Record

PROJECT_FIELDS = ("id", "name", "created_at", "archived_at", "weight")
KEY_FIELDS = ("id", "project_id", "name", "key_hash", "prefix", "admin", "created_at", "revoked_at")
PROJECT_COLS = ", ".join(PROJECT_FIELDS)
KEY_COLS = ", ".join(KEY_FIELDS)

# A project whose name is taken is not inserted (the caller reads the one there).
INSERT_PROJECT = f"INSERT INTO projects ({PROJECT_COLS}) VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING"
GET_PROJECT = f"SELECT {PROJECT_COLS} FROM projects WHERE id = ?"
PROJECT_BY_NAME = f"SELECT {PROJECT_COLS} FROM projects WHERE name = ?"
ARCHIVE_PROJECT = "UPDATE projects SET archived_at = COALESCE(archived_at, ?) WHERE id = ?"
SET_PROJECT_WEIGHT = "UPDATE projects SET weight = ? WHERE id = ?"
INSERT_KEY = f"INSERT INTO api_keys ({KEY_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
GET_KEY = f"SELECT {KEY_COLS} FROM api_keys WHERE id = ?"
REVOKE_KEY = "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?"
KEY_HOLDER = (
    "SELECT k.id, k.project_id, k.name, k.key_hash, k.prefix, k.admin, k.created_at, k.revoked_at, "
    "p.name AS project_name, p.created_at AS project_created_at, p.archived_at AS project_archived_at "
    "FROM api_keys k JOIN projects p ON p.id = k.project_id WHERE k.key_hash = ?"
)
HAS_KEYS = "SELECT 1 FROM api_keys LIMIT 1"
# The input bytes of an owner's planned batches of one model that still have lines to send (enqueued tokens).
ENQUEUED_BYTES = (
    "SELECT COALESCE(SUM(f.bytes), 0) FROM batches b JOIN files f ON f.id = b.input_file_id "
    f"WHERE b.owner = ? AND b.model = ? AND b.planned AND b.status IN {in_list(ACTIVE)}"
)


def list_projects(include_archived: bool, after: bool) -> str:
    """Projects in creation order; `after`: the statement takes the id to page after as its first argument."""
    where = []
    if after:
        where.append("seq > (SELECT seq FROM projects WHERE id = ?)")
    if not include_archived:
        where.append("archived_at IS NULL")
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return f"SELECT {PROJECT_COLS} FROM projects{clause} ORDER BY seq LIMIT ?"


def list_keys(project: bool, after: bool) -> str:
    """Keys in creation order: of one project (its id first) and after one key (its id next), when asked."""
    where = []
    if project:
        where.append("project_id = ?")
    if after:
        where.append("seq > (SELECT seq FROM api_keys WHERE id = ?)")
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return f"SELECT {KEY_COLS} FROM api_keys{clause} ORDER BY seq LIMIT ?"


def project_values(p: ProjectRecord) -> tuple[Any, ...]:
    return (p.id, p.name, p.created_at, p.archived_at, p.weight)


def key_values(k: ApiKeyRecord) -> tuple[Any, ...]:
    return (k.id, k.project_id, k.name, k.key_hash, k.prefix, k.admin, k.created_at, k.revoked_at)


def project_from_row(row: Row) -> ProjectRecord:
    return ProjectRecord(
        row["id"], row["name"], int(row["created_at"]), _opt_int(row["archived_at"]), float(row["weight"])
    )


def key_from_row(row: Row) -> ApiKeyRecord:
    return ApiKeyRecord(
        id=row["id"],
        project_id=row["project_id"],
        name=row["name"],
        key_hash=row["key_hash"],
        prefix=row["prefix"],
        created_at=int(row["created_at"]),
        admin=bool(row["admin"]),
        revoked_at=_opt_int(row["revoked_at"]),
    )


def holder_from_row(row: Row) -> KeyHolder:
    key = key_from_row(row)
    project = ProjectRecord(
        key.project_id,
        row["project_name"],
        int(row["project_created_at"]),
        _opt_int(row["project_archived_at"]),
    )
    return KeyHolder(key, project)


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)
