"""The admin API: projects and their keys, for admin keys, shaped like OpenAI's organization API
(`/v1/organization/projects/...`). OpenAI makes a project's keys through service accounts; here a service account
and its one key are the same record (the service account's id is the key's id), and `POST .../service_accounts`
answers the new key's value once, in `api_key.value`, as OpenAI does. `admin: true` in that body (a batchyard
extension) makes an admin key. Any other key gets a 403.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from batchyard.api.auth import Authenticator
from batchyard.api.deps import bounded_str, json_body, list_body, query_choice, query_int, shown
from batchyard.api.responses import JSONResponse
from batchyard.api.services import Services
from batchyard.domain import fairshare, tenancy
from batchyard.domain.tenancy import ProjectRecord
from batchyard.errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from batchyard.store.base import MetadataStore

PREFIX = "/v1/organization/projects"


def require_admin(auth: Authenticator, request: Request) -> None:
    """403 unless the request's key is an admin key."""
    if not auth.principal(request).admin:
        raise PermissionDenied(
            "You have insufficient permissions for this operation: the admin API needs an admin key "
            "(batchyard keys create --admin, or --admin-api-key).",
            code="insufficient_permissions",
        )


async def find_project(store: MetadataStore, project_id: str, *, active: bool = False) -> ProjectRecord:
    """The project `project_id` (404 when unknown); with `active`, 400 when it is archived (it cannot change)."""
    found = await store.get_project(project_id) if tenancy.PROJECT_ID.fullmatch(project_id) else None
    if found is None:
        raise NotFound(
            f"No project found with id '{shown(project_id)}'.",
            param="project_id",
            code="project_not_found",
        )
    if active and found.archived:
        raise InvalidRequest(
            f"Project {found.id} is archived: it cannot be changed.",
            param="project_id",
            code="project_archived",
        )
    return found


def router(svc: Services, auth: Authenticator) -> APIRouter:
    r = APIRouter()
    store = svc.store

    def admin(request: Request) -> None:
        require_admin(auth, request)

    async def project(project_id: str) -> ProjectRecord:
        return await find_project(store, project_id)

    async def active_project(project_id: str) -> ProjectRecord:
        return await find_project(store, project_id, active=True)

    def name_of(body: dict[str, Any]) -> str:
        name = bounded_str(body, "name", tenancy.MAX_PROJECT_NAME)
        problem = tenancy.project_name_problem(name)
        if problem is not None:
            raise InvalidRequest(f"Invalid 'name': {problem}.", param="name", code="invalid_value")
        return name

    @r.get(PREFIX)
    async def list_projects(request: Request) -> JSONResponse:
        admin(request)
        limit = query_int(request, "limit", 20, 1, 100)
        archived = query_choice(request, "include_archived", "false", ("true", "false")) == "true"
        page = await store.list_projects(
            limit=limit, after=request.query_params.get("after"), include_archived=archived
        )
        return JSONResponse(list_body([p.to_wire() for p in page.items], page.has_more))

    @r.post(PREFIX)
    async def create_project(request: Request) -> JSONResponse:
        admin(request)
        name = name_of(await json_body(request))
        made = ProjectRecord(tenancy.project_id(), name, int(await store.now()))
        if not await store.insert_project(made):
            raise Conflict(f"A project named '{name}' already exists.", param="name", code="project_exists")
        return JSONResponse(made.to_wire())

    @r.get(PREFIX + "/{project_id}")
    async def retrieve_project(request: Request, project_id: str) -> JSONResponse:
        admin(request)
        return JSONResponse((await project(project_id)).to_wire())

    @r.post(PREFIX + "/{project_id}")
    async def modify_project(request: Request, project_id: str) -> JSONResponse:
        """OpenAI's modify-project route; here it sets the project's fair-share `weight` (an extension)."""
        admin(request)
        found = await active_project(project_id)
        body = await json_body(request)
        if "name" in body and body["name"] != found.name:
            raise InvalidRequest("Renaming a project is not supported.", param="name", code="invalid_value")
        weight = body.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise InvalidRequest("'weight' must be a number.", param="weight", code="invalid_type")
        problem = fairshare.weight_problem(float(weight))
        if problem is not None:
            raise InvalidRequest(f"Invalid 'weight': {problem}.", param="weight", code="invalid_value")
        changed = await store.set_project_weight(project_id, float(weight))
        assert changed is not None
        return JSONResponse(changed.to_wire())

    @r.post(PREFIX + "/{project_id}/archive")
    async def archive_project(request: Request, project_id: str) -> JSONResponse:
        admin(request)
        await project(project_id)
        archived = await store.archive_project(project_id, int(await store.now()))
        assert archived is not None
        auth.forget()  # its keys stop working in this process at once
        return JSONResponse(archived.to_wire())

    @r.get(PREFIX + "/{project_id}/api_keys")
    async def list_keys(request: Request, project_id: str) -> JSONResponse:
        admin(request)
        await project(project_id)
        limit = query_int(request, "limit", 20, 1, 100)
        page = await store.list_api_keys(project_id, limit=limit, after=request.query_params.get("after"))
        return JSONResponse(list_body([k.to_wire() for k in page.items], page.has_more))

    @r.delete(PREFIX + "/{project_id}/api_keys/{key_id}")
    async def delete_key(request: Request, project_id: str, key_id: str) -> JSONResponse:
        """Revoke the key (it stays listed, with `revoked_at`)."""
        admin(request)
        await project(project_id)
        if not tenancy.KEY_ID.fullmatch(key_id) or not await _belongs(key_id, project_id):
            raise NotFound(
                f"No API key found with id '{shown(key_id)}'.", param="key_id", code="api_key_not_found"
            )
        key = await store.revoke_api_key(key_id, int(await store.now()))
        assert key is not None
        auth.forget(key.key_hash)
        return JSONResponse({"object": "organization.project.api_key.deleted", "id": key.id, "deleted": True})

    async def _belongs(key_id: str, project_id: str) -> bool:
        return any(k.id == key_id for k in await _keys_of(project_id))

    async def _keys_of(project_id: str) -> list[tenancy.ApiKeyRecord]:
        out: list[tenancy.ApiKeyRecord] = []
        after = None
        while True:
            page = await store.list_api_keys(project_id, limit=500, after=after)
            out += page.items
            if not page.has_more or not page.items:
                return out
            after = page.items[-1].id

    @r.post(PREFIX + "/{project_id}/service_accounts")
    async def create_service_account(request: Request, project_id: str) -> JSONResponse:
        admin(request)
        found = await active_project(project_id)
        body = await json_body(request)
        name = bounded_str(body, "name", 256)
        is_admin = body.get("admin", False)
        if not isinstance(is_admin, bool):
            raise InvalidRequest(
                "Invalid type for 'admin': expected a boolean.", param="admin", code="invalid_type"
            )
        now = int(await store.now())
        value, key = tenancy.make_key(found.id, name, admin=is_admin, now=now)
        await store.insert_api_key(key)
        return JSONResponse(
            {
                "object": "organization.project.service_account",
                "id": key.id,
                "name": name,
                "role": "owner" if is_admin else "member",
                "created_at": now,
                "api_key": {
                    "object": "organization.project.service_account.api_key",
                    "value": value,
                    "name": name,
                    "created_at": now,
                    "id": key.id,
                },
            }
        )

    return r
