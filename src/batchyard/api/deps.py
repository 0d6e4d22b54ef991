"""Request-scoped helpers shared by the routes."""

from __future__ import annotations

from fastapi import Request

from batchyard.errors import InvalidRequest


def query_int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(
            f"Invalid '{name}': expected an integer, got {raw!r}.", param=name, code="invalid_value"
        ) from None
    if not lo <= value <= hi:
        raise InvalidRequest(
            f"Invalid '{name}': must be between {lo} and {hi}.", param=name, code="invalid_value"
        )
    return value


def query_choice(request: Request, name: str, default: str, choices: tuple[str, ...]) -> str:
    value = request.query_params.get(name, default)
    if value not in choices:
        raise InvalidRequest(
            f"Invalid '{name}': must be one of {', '.join(choices)}.", param=name, code="invalid_value"
        )
    return value


def list_body(items: list[dict[str, object]], has_more: bool) -> dict[str, object]:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }
