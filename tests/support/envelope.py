"""Assertions on OpenAI's error envelope."""

from __future__ import annotations

from typing import Any

import httpx

ANY = "<any>"


def assert_envelope(
    resp: httpx.Response, status: int, param: str | None = ANY, code: str | None = ANY
) -> dict[str, Any]:
    """The response has `status` and exactly `{"error": {"message", "type", "param", "code"}}`; returns the error."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param != ANY:
        assert err["param"] == param, err
    if code != ANY:
        assert err["code"] == code, err
    return err
