"""What the API layer needs, passed explicitly (no globals, no lookups by name)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from batchyard.api.quotas import CreateRates, Holds
from batchyard.blobs.base import BlobStore
from batchyard.config import Settings
from batchyard.store.base import MetadataStore
from batchyard.upstreams.online import OnlineGate
from batchyard.upstreams.router import Router


@dataclass(slots=True)
class Services:
    store: MetadataStore
    blobs: BlobStore
    router: Router
    settings: Settings
    notify: Callable[[], None] = field(default=lambda: None)  # wakes an in-process worker
    rates: CreateRates = field(default_factory=CreateRates)  # creates per owner per minute (api/quotas.py)
    holds: Holds = field(
        default_factory=Holds
    )  # what requests in flight will store, per owner (api/quotas.py)
    online: OnlineGate = field(default_factory=OnlineGate)  # online requests first (upstreams/online.py)
