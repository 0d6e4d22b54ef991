"""The batch state machine: a transition table; each transition stamps its `*_at` field."""

from __future__ import annotations

from enum import StrEnum


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


S = BatchStatus

TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    S.VALIDATING: frozenset({S.IN_PROGRESS, S.FAILED, S.CANCELLING, S.EXPIRED}),
    S.IN_PROGRESS: frozenset({S.FINALIZING, S.CANCELLING}),
    S.FINALIZING: frozenset({S.COMPLETED, S.EXPIRED}),
    S.CANCELLING: frozenset({S.CANCELLED}),
    S.FAILED: frozenset(),
    S.COMPLETED: frozenset(),
    S.EXPIRED: frozenset(),
    S.CANCELLED: frozenset(),
}

TERMINAL: frozenset[BatchStatus] = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)
# Batches not final yet: they may still read their input file and own part blobs.
UNFINISHED: frozenset[BatchStatus] = frozenset(TRANSITIONS) - TERMINAL

# The timestamp field each state stamps when entered.
STAMP: dict[BatchStatus, str] = {
    S.IN_PROGRESS: "in_progress_at",
    S.FAILED: "failed_at",
    S.FINALIZING: "finalizing_at",
    S.COMPLETED: "completed_at",
    S.EXPIRED: "expired_at",
    S.CANCELLING: "cancelling_at",
    S.CANCELLED: "cancelled_at",
}


class IllegalTransition(ValueError):
    def __init__(self, src: BatchStatus, dst: BatchStatus) -> None:
        super().__init__(f"illegal batch transition {src} -> {dst}")
        self.src = src
        self.dst = dst


def check_transition(src: BatchStatus, dst: BatchStatus) -> str | None:
    """Return the `*_at` field to stamp for src -> dst, or raise IllegalTransition."""
    if dst not in TRANSITIONS[src]:
        raise IllegalTransition(src, dst)
    return STAMP.get(dst)


def sources_of(dst: BatchStatus) -> frozenset[BatchStatus]:
    """Every state from which dst can be entered."""
    return frozenset(s for s, nxt in TRANSITIONS.items() if dst in nxt)


# Batches whose shards may still be worked on (dispatching or draining unexecuted lines).
ACTIVE: frozenset[BatchStatus] = frozenset({S.IN_PROGRESS, S.CANCELLING})
