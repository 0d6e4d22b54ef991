"""Run a coroutine on a fresh event loop: uvloop where it is installed (not on Windows), else asyncio's own."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on uvloop when it is there (every entry point of batchyard starts its loop here)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows, or a platform without uvloop wheels
        return asyncio.run(main)
    return uvloop.run(main)
