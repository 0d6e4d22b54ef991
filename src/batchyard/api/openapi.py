"""The OpenAPI document at /openapi.json (and /docs).

FastAPI lists the routes, but they read their bodies by hand (to answer OpenAI's exact errors), so it cannot see
their request and response bodies. Those are taken from OpenAI's own spec, which is the authority for them anyway:
`openai_reference.openapi.json` beside this module is the `/batches`, `/files` and `/uploads` part of OpenAI's
published OpenAPI document (openai/openai-openapi, MIT licence), with its schemas and the four batch webhooks.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

_TAKEN = ("summary", "description", "parameters", "requestBody", "responses")


def reference() -> dict[str, Any]:
    text = resources.files("batchyard.api").joinpath("openai_reference.openapi.json").read_text()
    return dict(json.loads(text))


def document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document of `app`, with OpenAI's bodies, parameters and schemas for the routes OpenAI defines."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    ref = reference()
    for path, operations in ref["paths"].items():
        ours = doc["paths"].get("/v1" + path)
        if ours is None:
            continue
        for method, op in operations.items():
            if method in ours:
                ours[method].update({k: op[k] for k in _TAKEN if k in op})
    doc.setdefault("components", {}).setdefault("schemas", {}).update(ref["components"]["schemas"])
    doc["webhooks"] = ref.get("webhooks", {})
    app.openapi_schema = doc
    return doc
