"""Online requests (the front door: /v1/chat/completions and the like) take priority over batch lines.

`OnlineGate.hold(member)` wraps every online upstream call, for its whole duration (a stream included). While online
requests are in flight on an upstream, batch lines there yield their slots (see the lead's implementation). This
default gate records nothing: an API process without a worker beside it has no batch lines to make yield.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from batchyard.upstreams.pool import Member


class OnlineGate:
    @contextlib.asynccontextmanager
    async def hold(self, member: Member) -> AsyncIterator[None]:
        """The online request to `member` is in flight for the block's duration."""
        yield
