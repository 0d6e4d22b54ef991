"""`batchyard webhooks ...`: the webhook endpoints of projects, on the server's own metadata store (the same
--data-dir / --database-url as `serve`, or their BATCHYARD_* variables, or --config), as `batchyard keys` does.

A new endpoint's signing secret (and a rotated one) is printed once, as the last line of stdout
(`SECRET=$(batchyard webhooks add --project p --url https://... | tail -n1)`). The operator's URL is taken as given
(http or https): `webhook_allowed_hosts` limits only the admin API, where URLs come from request bodies. Running
workers see a change at their next delivery.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from batchyard import eventloop
from batchyard.cli.tenancy import SCOPE, Command, _table, _when
from batchyard.config import ServeSwitches, Settings
from batchyard.domain import webhooks as wh
from batchyard.domain.webhooks import WebhookEndpoint
from batchyard.store.base import MetadataStore
from batchyard.store.factory import open_store

T = TypeVar("T")


def register(
    cli: click.Group,
    settings_options: Callable[[str], Callable[[Command], Command]],
    load: Callable[[str], tuple[Settings, ServeSwitches]],
) -> None:
    """Add the `webhooks` group to `cli` (with its way of taking the store's settings)."""

    def on_store(work: Callable[[MetadataStore, Settings], Awaitable[T]]) -> T:
        settings, _ = load(SCOPE)

        async def run() -> T:
            store = open_store(settings)
            await store.open()
            try:
                return await work(store, settings)
            finally:
                await store.close()

        return eventloop.run(run())

    @cli.group()
    def webhooks() -> None:
        """Webhook endpoints of projects: a project's batch events go to its endpoints (and to --webhook-url)."""

    @webhooks.command("add")
    @click.option("--project", "project", required=True, help="The project's name.")
    @click.option("--url", "url", required=True, help="Where its events are POSTed (http:// or https://).")
    @settings_options(SCOPE)
    def add(project: str, url: str, **_: Any) -> None:
        """Add an endpoint to project PROJECT; prints its signing secret once, as the last line."""
        problem = wh.url_problem(url, None)
        if problem is not None:
            raise click.BadParameter(problem, param_hint="--url")

        async def work(store: MetadataStore, _: Settings) -> WebhookEndpoint:
            found = await store.project_by_name(project)
            if found is None:
                raise click.UsageError(f"no project named {project!r} (batchyard projects list)")
            if found.archived:
                raise click.UsageError(f"project {project!r} is archived")
            if len(await store.list_webhook_endpoints(found.id, include_disabled=False)) >= wh.MAX_ENDPOINTS:
                raise click.UsageError(
                    f"project {project!r} has {wh.MAX_ENDPOINTS} endpoints: remove one first"
                )
            made = WebhookEndpoint(wh.endpoint_id(), found.id, url, wh.new_secret(), int(await store.now()))
            await store.insert_webhook_endpoint(made)
            return made

        made = on_store(work)
        click.echo(f"created webhook endpoint {made.id} of project {project}: {made.url}")
        click.echo("its signing secret is shown once, here:", err=True)
        click.echo(made.secret)

    @webhooks.command("list")
    @click.option("--project", "project", default=None, help="Only this project's endpoints (by name).")
    @click.option("--all", "everything", is_flag=True, help="Removed endpoints too.")
    @settings_options(SCOPE)
    def list_endpoints(project: str | None, everything: bool, **_: Any) -> None:
        """List endpoints (id, project, URL, created, previous secret valid until, removed)."""

        async def work(
            store: MetadataStore, _: Settings
        ) -> tuple[list[WebhookEndpoint], dict[str, str], float]:
            pid = None
            if project is not None:
                found = await store.project_by_name(project)
                if found is None:
                    raise click.UsageError(f"no project named {project!r}")
                pid = found.id
            names: dict[str, str] = {}
            after = None
            while True:
                page = await store.list_projects(limit=500, after=after, include_archived=True)
                names.update((p.id, p.name) for p in page.items)
                if not page.has_more or not page.items:
                    break
                after = page.items[-1].id
            found_endpoints = await store.list_webhook_endpoints(pid, include_disabled=everything)
            return found_endpoints, names, await store.now()

        found, names, now = on_store(work)
        rows = [["ID", "PROJECT", "URL", "CREATED", "OLD SECRET UNTIL", "REMOVED"]]
        for e in found:
            grace = e.previous_until if len(e.secrets_at(now)) > 1 else None
            rows.append(
                [
                    e.id,
                    names.get(e.owner, e.owner),
                    e.url,
                    _when(e.created_at),
                    _when(grace),
                    _when(e.disabled_at),
                ]
            )
        _table(rows)

    @webhooks.command("rotate")
    @click.argument("endpoint_id")
    @settings_options(SCOPE)
    def rotate(endpoint_id: str, **_: Any) -> None:
        """Give endpoint ENDPOINT_ID a new secret (printed once, last); the old one still signs for
        --webhook-rotation-grace-seconds (24 h by default), so a receiver can switch without losing events."""

        async def work(store: MetadataStore, settings: Settings) -> WebhookEndpoint | None:
            until = int(await store.now()) + settings.webhook_rotation_grace_seconds
            return await store.rotate_webhook_secret(endpoint_id, wh.new_secret(), until)

        rotated = on_store(work)
        if rotated is None:
            raise click.UsageError(f"no endpoint {endpoint_id!r} (or it was removed)")
        click.echo(
            f"rotated the secret of {rotated.id}; the previous one signs too until {_when(rotated.previous_until)}"
        )
        click.echo("the new signing secret is shown once, here:", err=True)
        click.echo(rotated.secret)

    @webhooks.command("remove")
    @click.argument("endpoint_id")
    @settings_options(SCOPE)
    def remove(endpoint_id: str, **_: Any) -> None:
        """Remove endpoint ENDPOINT_ID: nothing more is sent to it (its attempts stay in the delivery log)."""

        async def work(store: MetadataStore, _: Settings) -> WebhookEndpoint | None:
            return await store.disable_webhook_endpoint(endpoint_id, int(await store.now()))

        gone = on_store(work)
        if gone is None:
            raise click.UsageError(f"no endpoint {endpoint_id!r}")
        click.echo(f"removed webhook endpoint {gone.id} at {_when(gone.disabled_at)}")
