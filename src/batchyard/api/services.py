"""What the API layer needs, passed explicitly (no globals, no lookups by name)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from batchyard.blobs.base import BlobStore
from batchyard.config import Settings
from batchyard.store.base import MetadataStore
from batchyard.upstreams.router import Router


@dataclass(slots=True)
class Services:
    store: MetadataStore
    blobs: BlobStore
    router: Router
    settings: Settings
    notify: Callable[[], None] = field(default=lambda: None)  # wakes an in-process worker
