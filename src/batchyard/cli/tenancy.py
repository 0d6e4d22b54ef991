"""`batchyard keys ...` and `batchyard projects ...`: projects and API keys, on the server's own metadata store
(the same --data-dir / --database-url as `serve`, or their BATCHYARD_* variables, or --config).

A new key is printed once, as the last line of stdout (`KEY=$(batchyard keys create --project p | tail -n1)`); the
store keeps only its sha256 and the prefix shown in `keys list`. A running server sees a new key at once and a
revoked one within --api-key-cache-seconds (5 s by default).
"""

from __future__ import annotations

import datetime
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from batchyard import eventloop
from batchyard.config import ServeSwitches, Settings
from batchyard.domain import fairshare, tenancy
from batchyard.domain.tenancy import ApiKeyRecord, ProjectRecord
from batchyard.store.base import MetadataStore
from batchyard.store.factory import open_store

T = TypeVar("T")
Command = Callable[..., Any]
SCOPE = "keys"  # the settings these commands take (config.COMMAND_SCOPES): where the store is


async def ensure_project(store: MetadataStore, name: str) -> tuple[ProjectRecord, bool]:
    """The project named `name`, made if missing (and whether it was made now)."""
    found = await store.project_by_name(name)
    if found is not None:
        return found, False
    made = tenancy.ProjectRecord(tenancy.project_id(), name, int(await store.now()))
    if await store.insert_project(made):
        return made, True
    raced = await store.project_by_name(name)  # made by another process meanwhile
    assert raced is not None
    return raced, False


def keys_stored(settings: Settings) -> bool:
    """Whether the server's store holds any key (then `serve` requires keys without --api-key)."""
    url = settings.database_url or ""
    if not url or url.startswith("sqlite:///"):  # a database not made yet holds none (and is not made here)
        path = (
            Path(url.removeprefix("sqlite:///")) if url.removeprefix("sqlite:///") else settings.database_path
        )
        if not path.exists():
            return False

    async def ask() -> bool:
        store = open_store(settings)
        await store.open()
        try:
            return await store.has_api_keys()
        finally:
            await store.close()

    return eventloop.run(ask())


def _when(ts: int | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


def register(
    cli: click.Group,
    settings_options: Callable[[str], Callable[[Command], Command]],
    load: Callable[[str], tuple[Settings, ServeSwitches]],
) -> None:
    """Add the `keys` and `projects` groups to `cli` (with its way of taking the store's settings)."""

    def on_store(work: Callable[[MetadataStore], Awaitable[T]]) -> T:
        settings, _ = load(SCOPE)

        async def run() -> T:
            store = open_store(settings)
            await store.open()
            try:
                return await work(store)
            finally:
                await store.close()

        return eventloop.run(run())

    @cli.group()
    def keys() -> None:
        """API keys of projects, kept (hashed) in the server's metadata store."""

    @keys.command("create")
    @click.option("--project", "project", required=True, help="The project's name (made if missing).")
    @click.option("--admin", is_flag=True, help="The key may also use the admin API (/v1/organization/...).")
    @click.option("--name", "name", default="", help="A name for the key, shown in listings.")
    @settings_options(SCOPE)
    def create(project: str, admin: bool, name: str, **_: Any) -> None:
        """Make a key of project PROJECT; prints it once, as the last line."""
        problem = tenancy.project_name_problem(project)
        if problem is not None:
            raise click.BadParameter(problem, param_hint="--project")

        async def work(store: MetadataStore) -> tuple[ProjectRecord, bool, str, ApiKeyRecord]:
            proj, made = await ensure_project(store, project)
            if proj.archived:
                raise click.UsageError(f"project {project!r} is archived")
            key, rec = tenancy.make_key(proj.id, name or project, admin=admin, now=int(await store.now()))
            await store.insert_api_key(rec)
            return proj, made, key, rec

        proj, made, key, rec = on_store(work)
        if made:
            click.echo(f"created project {proj.name} ({proj.id})")
        click.echo(f"created key {rec.id} {rec.prefix} of project {proj.name}{' (admin)' if admin else ''}")
        click.echo("the key is shown once, here; it is stored only as its sha256:", err=True)
        click.echo(key)

    @keys.command("list")
    @click.option("--project", "project", default=None, help="Only this project's keys (by name).")
    @settings_options(SCOPE)
    def list_keys(project: str | None, **_: Any) -> None:
        """List keys (prefix, project, admin, created, revoked)."""

        async def work(store: MetadataStore) -> tuple[list[ApiKeyRecord], dict[str, str]]:
            pid = None
            if project is not None:
                found = await store.project_by_name(project)
                if found is None:
                    raise click.UsageError(f"no project named {project!r}")
                pid = found.id
            names = {p.id: p.name for p in await _all(store.list_projects, include_archived=True)}
            return await _all(lambda **kw: store.list_api_keys(pid, **kw)), names

        found, names = on_store(work)
        rows = [["ID", "PREFIX", "PROJECT", "ADMIN", "CREATED", "REVOKED"]]
        rows += [
            [
                k.id,
                k.prefix,
                names.get(k.project_id, k.project_id),
                "yes" if k.admin else "no",
                _when(k.created_at),
                _when(k.revoked_at),
            ]
            for k in found
        ]
        _table(rows)

    @keys.command("revoke")
    @click.argument("key_id")
    @settings_options(SCOPE)
    def revoke(key_id: str, **_: Any) -> None:
        """Revoke key KEY_ID: a running server refuses it within --api-key-cache-seconds."""

        async def work(store: MetadataStore) -> ApiKeyRecord | None:
            return await store.revoke_api_key(key_id, int(await store.now()))

        rec = on_store(work)
        if rec is None:
            raise click.UsageError(f"no key {key_id!r}")
        click.echo(f"revoked key {rec.id} {rec.prefix} at {_when(rec.revoked_at)}")

    @cli.group()
    def projects() -> None:
        """Projects: each owns its files, uploads and batches, seen by every key of the project."""

    @projects.command("list")
    @settings_options(SCOPE)
    def list_projects(**_: Any) -> None:
        """List projects (archived ones too)."""
        found = on_store(lambda store: _all(store.list_projects, include_archived=True))
        rows = [["ID", "NAME", "CREATED", "ARCHIVED", "WEIGHT"]]
        rows += [[p.id, p.name, _when(p.created_at), _when(p.archived_at), f"{p.weight:g}"] for p in found]
        _table(rows)

    @projects.command("set-weight")
    @click.argument("name")
    @click.argument("weight", type=float)
    @settings_options(SCOPE)
    def set_weight(name: str, weight: float, **_: Any) -> None:
        """Set project NAME's (or id's) fair-share WEIGHT (default 1): while several projects have work, each gets
        workers and upstream slots in proportion to its weight. Running workers apply it at their next claim."""
        problem = fairshare.weight_problem(weight)
        if problem is not None:
            raise click.BadParameter(problem, param_hint="WEIGHT")

        async def work(store: MetadataStore) -> ProjectRecord | None:
            found = await store.project_by_name(name)
            if found is None and tenancy.PROJECT_ID.fullmatch(name):
                found = await store.get_project(name)
            return None if found is None else await store.set_project_weight(found.id, weight)

        rec = on_store(work)
        if rec is None:
            raise click.UsageError(f"no project {name!r}")
        click.echo(f"project {rec.name} ({rec.id}) weight {rec.weight:g}")


async def _all(page: Callable[..., Awaitable[Any]], **kw: Any) -> list[Any]:
    """Every item of a paged store listing."""
    items: list[Any] = []
    after = None
    while True:
        got = await page(limit=500, after=after, **kw)
        items += got.items
        if not got.has_more or not got.items:
            return items
        after = got.items[-1].id
