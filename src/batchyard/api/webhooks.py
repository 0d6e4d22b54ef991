"""Webhooks per project over HTTP: the project's delivery log (`GET /v1/webhook_events`, any key of the project), and
its endpoints in the admin API (`/v1/organization/projects/{id}/webhooks`, admin keys only), beside api/admin.py.

An endpoint's URL comes from a request body here, so it is taken only when its host matches one of the operator's
`webhook_allowed_hosts` globs (none: every URL is refused, with a 400 that names the setting); http and https only,
and the sender never follows a redirect. A secret is shown once, in the answer that makes it (create, rotate).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request

from batchyard.api.admin import PREFIX, find_project, require_admin
from batchyard.api.auth import Authenticator
from batchyard.api.deps import json_body, list_body, query_choice, query_int, required_str, shown
from batchyard.api.responses import JSONResponse
from batchyard.api.services import Services
from batchyard.domain import webhooks as wh
from batchyard.domain.tenancy import ProjectRecord
from batchyard.domain.webhooks import WebhookEndpoint
from batchyard.errors import InvalidRequest, NotFound

OwnerOf = Callable[[Request], str]


def events_router(svc: Services, owner_of: OwnerOf) -> APIRouter:
    """The delivery log of the caller's project: its events newest first, and one event with every attempt."""
    r = APIRouter()
    store = svc.store
    globals_ = [wh.global_target_id(u) for u in svc.settings.webhook_urls]

    @r.get("/v1/webhook_events")
    async def list_events(request: Request) -> JSONResponse:
        owner = owner_of(request)
        limit = query_int(request, "limit", 20, 1, 100)
        after = request.query_params.get("after")
        if after is not None and not wh.EVENT_ID.fullmatch(after):
            return JSONResponse(list_body([], False))  # names no event: the page after it is empty
        page = await store.list_webhook_events(owner, limit=limit, after=after)
        return JSONResponse(list_body([e.to_log_wire() for e in page.items], page.has_more))

    @r.get("/v1/webhook_events/{event_id}")
    async def retrieve_event(request: Request, event_id: str) -> JSONResponse:
        owner = owner_of(request)
        found = await store.get_webhook_event(owner, event_id) if wh.EVENT_ID.fullmatch(event_id) else None
        if found is None:
            raise NotFound(
                f"No webhook event found with id '{shown(event_id)}'.",
                param="event_id",
                code="webhook_event_not_found",
            )
        ev, attempts = found
        endpoints, took = await store.webhook_targets(ev)
        targets = [*globals_, *(e.id for e in endpoints)]
        targets += sorted(took - set(targets))  # took it, and since removed (or configured elsewhere)
        body = ev.to_log_wire()
        body["targets"] = [{"endpoint_id": t, "delivered": t in took} for t in targets]
        body["delivery_attempts"] = [a.to_wire() for a in attempts]
        return JSONResponse(body)

    return r


def admin_router(svc: Services, auth: Authenticator) -> APIRouter:
    """A project's webhook endpoints: list, add (with a new secret), retrieve, rotate its secret, delete."""
    r = APIRouter()
    store = svc.store
    settings = svc.settings

    def admin(request: Request) -> None:
        require_admin(auth, request)

    async def project(project_id: str, *, active: bool = False) -> ProjectRecord:
        return await find_project(store, project_id, active=active)

    def no_endpoint(endpoint_id: str) -> NotFound:
        return NotFound(
            f"No webhook endpoint found with id '{shown(endpoint_id)}'.",
            param="webhook_id",
            code="webhook_endpoint_not_found",
        )

    async def endpoint(project_id: str, endpoint_id: str) -> WebhookEndpoint:
        """A live endpoint of the project (a deleted one, or another project's, is as unknown)."""
        await project(project_id)
        found = (
            await store.get_webhook_endpoint(endpoint_id) if wh.ENDPOINT_ID.fullmatch(endpoint_id) else None
        )
        if found is None or found.owner != project_id or found.disabled_at is not None:
            raise no_endpoint(endpoint_id)
        return found

    def with_secret(e: WebhookEndpoint, now: float) -> dict[str, Any]:
        return {**e.to_wire(now), "secret": e.secret}

    @r.get(PREFIX + "/{project_id}/webhooks")
    async def list_endpoints(request: Request, project_id: str) -> JSONResponse:
        admin(request)
        await project(project_id)
        disabled = query_choice(request, "include_disabled", "false", ("true", "false")) == "true"
        found = await store.list_webhook_endpoints(project_id, include_disabled=disabled)
        now = await store.now()
        return JSONResponse(list_body([e.to_wire(now) for e in found], False))

    @r.post(PREFIX + "/{project_id}/webhooks")
    async def add_endpoint(request: Request, project_id: str) -> JSONResponse:
        admin(request)
        await project(project_id, active=True)
        url = required_str(await json_body(request), "url")
        problem = wh.url_problem(url, settings.webhook_allowed_hosts)
        if problem is not None:
            raise InvalidRequest(f"Invalid 'url': {problem}.", param="url", code="invalid_url")
        if len(await store.list_webhook_endpoints(project_id, include_disabled=False)) >= wh.MAX_ENDPOINTS:
            raise InvalidRequest(
                f"Project {project_id} has {wh.MAX_ENDPOINTS} webhook endpoints, the most it may have: delete one "
                "first.",
                param="url",
                code="webhook_endpoint_limit_reached",
            )
        now = await store.now()
        made = WebhookEndpoint(wh.endpoint_id(), project_id, url, wh.new_secret(), int(now))
        await store.insert_webhook_endpoint(made)
        return JSONResponse(with_secret(made, now))

    @r.get(PREFIX + "/{project_id}/webhooks/{webhook_id}")
    async def retrieve_endpoint(request: Request, project_id: str, webhook_id: str) -> JSONResponse:
        admin(request)
        return JSONResponse((await endpoint(project_id, webhook_id)).to_wire(await store.now()))

    @r.post(PREFIX + "/{project_id}/webhooks/{webhook_id}/rotate")
    async def rotate_secret(request: Request, project_id: str, webhook_id: str) -> JSONResponse:
        """A new secret; the previous one still signs for `webhook_rotation_grace_seconds`."""
        admin(request)
        await endpoint(project_id, webhook_id)
        now = await store.now()
        until = int(now) + settings.webhook_rotation_grace_seconds
        rotated = await store.rotate_webhook_secret(webhook_id, wh.new_secret(), until)
        if rotated is None:  # deleted meanwhile
            raise no_endpoint(webhook_id)
        return JSONResponse(with_secret(rotated, now))

    @r.delete(PREFIX + "/{project_id}/webhooks/{webhook_id}")
    async def delete_endpoint(request: Request, project_id: str, webhook_id: str) -> JSONResponse:
        """Disable the endpoint: nothing more is sent to it (its past attempts stay in the log)."""
        admin(request)
        await endpoint(project_id, webhook_id)
        await store.disable_webhook_endpoint(webhook_id, int(await store.now()))
        return JSONResponse({"object": "webhook_endpoint.deleted", "id": webhook_id, "deleted": True})

    return r
