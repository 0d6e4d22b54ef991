"""The FastAPI application: routes, error envelope, auth, health."""

from __future__ import annotations

from fastapi import FastAPI, Request

from batchyard.api import batches, errors, files, openapi, uploads
from batchyard.api.auth import Authenticator
from batchyard.api.responses import JSONResponse
from batchyard.api.services import Services


def create_app(svc: Services) -> FastAPI:
    app = FastAPI(
        title="batchyard",
        description="Self-hosted, OpenAI-compatible Batch API.",
        version="0.1.0",
        default_response_class=JSONResponse,
    )
    errors.install(app)
    auth = Authenticator(svc.settings.api_keys)
    app.include_router(files.router(svc, auth.owner))
    app.include_router(batches.router(svc, auth.owner))
    app.include_router(uploads.router(svc, auth.owner))

    app.openapi = lambda: openapi.document(app)  # type: ignore[method-assign]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, object]:
        auth.owner(request)
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "batchyard"}
            for m in svc.router.model_names()
        ]
        return {"object": "list", "data": data}

    return app
