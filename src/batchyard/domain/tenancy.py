"""Projects and their API keys: records, how a key is made and how it is kept (only its sha256 and a prefix).

A project owns objects: its id is the `owner` of every file, upload, batch and webhook event made with any of its
keys. A key is `sk-by-` and 48 base62 characters from `secrets` (~285 bits), so its sha256 alone is safe to keep and
to look up by; it is shown once, when made. A revoked key, or any key of an archived project, authenticates nothing.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any

KEY_PREFIX = "sk-by-"
KEY_CHARS = 48
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
SHOWN_CHARS = 3  # characters of the random part shown after the prefix: `sk-by-abc…`
MAX_PROJECT_NAME = 64
_PROJECT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]*")
PROJECT_ID = re.compile(r"proj_[0-9A-Za-z]{1,64}")
KEY_ID = re.compile(r"key_[0-9A-Za-z]{1,64}")


def _random(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def project_id() -> str:
    return f"proj_{_random(24)}"


def key_id() -> str:
    return f"key_{_random(24)}"


def new_key() -> str:
    return KEY_PREFIX + _random(KEY_CHARS)


def key_hash(key: str) -> str:
    """What the store keeps of a key (hex sha256): a key is high-entropy, so no salt or slow hash is needed."""
    return hashlib.sha256(key.encode()).hexdigest()


def shown_prefix(key: str) -> str:
    """The part of a key that may be shown after its creation: `sk-by-abc…`."""
    return key[: len(KEY_PREFIX) + SHOWN_CHARS] + "…"


def looks_like_key(token: str) -> bool:
    """Whether a bearer token has the shape of a stored key (anything else is not looked up)."""
    return token.startswith(KEY_PREFIX) and len(token) == len(KEY_PREFIX) + KEY_CHARS


def project_name_problem(name: str) -> str | None:
    """Why `name` cannot name a project, or None."""
    if not name or len(name) > MAX_PROJECT_NAME:
        return f"a project name has 1 to {MAX_PROJECT_NAME} characters"
    if _PROJECT_NAME.fullmatch(name) is None:
        return (
            "a project name has letters, digits, spaces, '.', '_' and '-', and starts with a letter or digit"
        )
    return None


@dataclass(slots=True)
class ProjectRecord:
    id: str
    name: str
    created_at: int
    archived_at: int | None = None
    weight: float = 1.0  # its share of workers and upstream slots (domain/fairshare.py)

    @property
    def archived(self) -> bool:
        return self.archived_at is not None

    def to_wire(self) -> dict[str, Any]:
        """OpenAI's organization.project object."""
        return {
            "id": self.id,
            "object": "organization.project",
            "name": self.name,
            "created_at": self.created_at,
            "archived_at": self.archived_at,
            "status": "archived" if self.archived else "active",
            "weight": self.weight,  # a batchyard extension: its fair share (docs/scheduling.md)
        }


@dataclass(slots=True)
class ApiKeyRecord:
    id: str
    project_id: str
    name: str
    key_hash: str
    prefix: str
    created_at: int
    admin: bool = False
    revoked_at: int | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def to_wire(self) -> dict[str, Any]:
        """OpenAI's organization.project.api_key object (the key itself as its redacted value)."""
        return {
            "id": self.id,
            "object": "organization.project.api_key",
            "name": self.name,
            "redacted_value": self.prefix,
            "created_at": self.created_at,
            "last_used_at": None,
            "owner": {"type": "service_account", "service_account": {"id": self.id, "name": self.name}},
            "admin": self.admin,
            "revoked_at": self.revoked_at,
        }


@dataclass(frozen=True, slots=True)
class KeyHolder:
    """Who a stored key authenticates: its project, and whether it may manage projects."""

    key: ApiKeyRecord
    project: ProjectRecord

    @property
    def active(self) -> bool:
        return not self.key.revoked and not self.project.archived


def make_key(project: str, name: str, *, admin: bool, now: int) -> tuple[str, ApiKeyRecord]:
    """A new key of `project` and the record kept of it; the key is returned once and never stored."""
    key = new_key()
    return key, ApiKeyRecord(
        id=key_id(),
        project_id=project,
        name=name,
        key_hash=key_hash(key),
        prefix=shown_prefix(key),
        created_at=now,
        admin=admin,
    )


def estimated_tokens(text_bytes: int) -> int:
    """Input tokens estimated from the length of the lines' text (about 4 bytes a token), for enqueued-token
    limits."""
    return text_bytes // 4


def enqueued_token_problem(model: str, owner: str, enqueued: int, more: int, limit: int) -> str | None:
    """OpenAI's words when a batch of `more` estimated tokens would pass `owner`'s `limit` for `model` (0: none)."""
    if limit <= 0 or enqueued + more <= limit:
        return None
    return (
        f"Enqueued token limit reached for {model} in organization {owner}. Limit: {limit:,} enqueued tokens. "
        "Please try again once some in_progress batches have been completed."
    )
