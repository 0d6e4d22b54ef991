"""Fixtures shared by the e2e modules; each module defines its own module-scoped `srv` (a `batchyard serve`)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from openai import OpenAI

from tests.conftest import Server
from tests.support.batches import chat_line, upload


@pytest.fixture(scope="module")
def oai(srv: Server) -> OpenAI:
    """The official SDK against this module's server."""
    return srv.client()


@pytest.fixture(scope="module")
def http(srv: Server) -> Iterator[httpx.Client]:
    """A raw HTTP client, for status codes and bodies the SDK would hide."""
    with httpx.Client(base_url=srv.root_url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def input_file(oai: OpenAI) -> str:
    """A small valid batch input file."""
    return upload(oai, [chat_line(i) for i in range(3)])
