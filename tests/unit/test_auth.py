"""Bearer-key authentication: owners derived from keys, OpenAI-shaped 401s."""

from __future__ import annotations

import hashlib

import pytest
from starlette.requests import Request

from batchyard.api.auth import ANONYMOUS, Authenticator, owner_of
from batchyard.errors import Unauthorized


def request(authorization: str | None = None) -> Request:
    headers = [] if authorization is None else [(b"authorization", authorization.encode("latin-1"))]
    return Request({"type": "http", "method": "GET", "path": "/v1/batches", "headers": headers})


def test_owner_of_is_a_stable_hash_prefix() -> None:
    assert owner_of("sk-one") == "key_" + hashlib.sha256(b"sk-one").hexdigest()[:16]
    assert owner_of("sk-one") == owner_of("sk-one")
    assert owner_of("sk-one") != owner_of("sk-two")


def test_owner_does_not_contain_the_key() -> None:
    assert "sk-secret" not in owner_of("sk-secret")


def test_no_keys_means_anonymous() -> None:
    auth = Authenticator([])
    assert not auth.enabled
    assert auth.owner(request()) == ANONYMOUS == "default"
    assert auth.owner(request("Bearer whatever")) == ANONYMOUS


def test_each_key_is_its_own_owner() -> None:
    auth = Authenticator(["sk-one", "sk-two"])
    assert auth.enabled
    assert auth.owner(request("Bearer sk-one")) == owner_of("sk-one")
    assert auth.owner(request("Bearer sk-two")) == owner_of("sk-two")


@pytest.mark.parametrize("header", ["bearer sk-one", "BEARER sk-one", "Bearer  sk-one", "Bearer sk-one "])
def test_scheme_case_and_spaces(header: str) -> None:
    assert Authenticator(["sk-one"]).owner(request(header)) == owner_of("sk-one")


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer ", "Basic c2stb25lOg==", "sk-one", "Token sk-one"]
)
def test_missing_key(header: str | None) -> None:
    with pytest.raises(Unauthorized) as info:
        Authenticator(["sk-one"]).owner(request(header))
    err = info.value
    assert err.status_code == 401
    assert err.code == "missing_api_key"
    error = err.to_dict()["error"]
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    assert "Authorization" in err.message


@pytest.mark.parametrize("token", ["sk-two", "sk-on", "sk-one1", "SK-ONE", "sk-one sk-one"])
def test_wrong_key(token: str) -> None:
    with pytest.raises(Unauthorized) as info:
        Authenticator(["sk-one"]).owner(request(f"Bearer {token}"))
    err = info.value
    assert err.status_code == 401
    assert err.code == "invalid_api_key"
    assert err.message == "Incorrect API key provided."
    assert token not in err.message


def test_error_envelope() -> None:
    with pytest.raises(Unauthorized) as info:
        Authenticator(["k"]).owner(request("Bearer nope"))
    assert info.value.to_dict() == {
        "error": {
            "message": "Incorrect API key provided.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
