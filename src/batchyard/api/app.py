"""The FastAPI application: routes, error envelope, auth, health."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request

from batchyard.api import (
    admin,
    batches,
    errors,
    files,
    metrics_route,
    online,
    openapi,
    ui_routes,
    uploads,
    webhooks,
)
from batchyard.api.auth import Authenticator
from batchyard.api.responses import JSONResponse
from batchyard.api.services import Services
from batchyard.errors import NotFound


def create_app(svc: Services) -> FastAPI:
    auth = Authenticator(
        svc.settings.api_keys,
        store=svc.store,
        admin_keys=svc.settings.admin_api_keys,
        cache_seconds=svc.settings.api_key_cache_seconds,
    )
    app = FastAPI(
        dependencies=[Depends(auth.resolve)],  # who the request is: static or stored keys (api/auth.py)
        title="batchyard",
        description="Self-hosted, OpenAI-compatible Batch API.",
        version="0.1.0",
        default_response_class=JSONResponse,
        docs_url=None,  # served from vendored files by ui_routes
        redoc_url=None,
        redirect_slashes=False,  # a trailing slash is an unknown URL, as at OpenAI (not a 307 to follow)
    )
    errors.install(app)
    app.include_router(files.router(svc, auth.owner))
    app.include_router(batches.router(svc, auth.owner))
    app.include_router(uploads.router(svc, auth.owner))
    app.include_router(admin.router(svc, auth))
    app.include_router(webhooks.events_router(svc, auth.owner))  # the delivery log (api/webhooks.py)
    app.include_router(webhooks.admin_router(svc, auth))  # a project's webhook endpoints
    app.include_router(online.router(svc, auth.owner))  # the online front door (api/online.py)
    metrics_route.install(app, svc, auth)

    app.openapi = lambda: openapi.document(app)  # type: ignore[method-assign]
    ui_routes.install(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    def model_object(name: str) -> dict[str, object]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "batchyard"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, object]:
        auth.owner(request)
        return {"object": "list", "data": [model_object(m) for m in await svc.router.list_models()]}

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> dict[str, object]:
        auth.owner(request)
        if model not in await svc.router.list_models():
            raise NotFound(f"The model '{model}' does not exist.", param="model", code="model_not_found")
        return model_object(model)

    return app
