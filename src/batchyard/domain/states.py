"""Every status rule, as data: the batch state machine (a transition table; each transition stamps its `*_at` field),
what each step of a batch's life does from each state, and the shard, upload and webhook-event lifecycles.

The stores only persist what these decide: they ask `on(event, status)` or `check_transition(src, dst)` and write
the answer (in SQL, with the status as a fenced condition, so a concurrent change makes the write a no-op).
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

E = TypeVar("E", bound=StrEnum)


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
    def __init__(self, src: StrEnum | str, dst: StrEnum | str, kind: str = "batch") -> None:
        super().__init__(f"illegal {kind} transition {src} -> {dst}")
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


# Batches whose shards may still be worked on (dispatching or draining unexecuted lines): shards are claimed only
# from these.
ACTIVE: frozenset[BatchStatus] = frozenset({S.IN_PROGRESS, S.CANCELLING})
# Every state a cancel request moves to cancelling; from any other it is a no-op (already cancelling, finalizing,
# final).
CANCELLABLE: frozenset[BatchStatus] = sources_of(S.CANCELLING)


class Step(StrEnum):
    """What happens to a batch; `ON_STEP` says what each does from each state."""

    CANCEL = "cancel"  # the owner asks to cancel it
    PLANNED = "planned"  # validation passed: its shards are planned
    INVALID = "invalid"  # validation failed: its errors are recorded
    FINALIZE = "finalize"  # every shard is done: its output and error files are built


# From each state the step applies to, the state it leads to (the same state: the batch stays as it is). A state
# not listed refuses the step: a cancel leaves the batch alone, the other steps are not done (the store answers
# False). A batch cancelled before it was validated is still validated (its lines must end as error lines), and
# then stays cancelling, or ends cancelled when its input is invalid.
ON_STEP: dict[Step, dict[BatchStatus, BatchStatus]] = {
    Step.CANCEL: {s: S.CANCELLING for s in CANCELLABLE},
    Step.PLANNED: {S.VALIDATING: S.IN_PROGRESS, S.CANCELLING: S.CANCELLING},
    Step.INVALID: {S.VALIDATING: S.FAILED, S.CANCELLING: S.CANCELLED},
    Step.FINALIZE: {S.IN_PROGRESS: S.FINALIZING, S.CANCELLING: S.CANCELLING, S.FINALIZING: S.FINALIZING},
}

# Batches a validation job is claimed for (not yet planned) and a finalization job (once all shards are done).
VALIDATABLE: frozenset[BatchStatus] = frozenset(ON_STEP[Step.PLANNED])
FINALIZABLE: frozenset[BatchStatus] = frozenset(ON_STEP[Step.FINALIZE])


def on(step: Step, status: BatchStatus) -> BatchStatus | None:
    """The state `step` takes a batch in `status` to (`status` itself: it stays), or None: the step does not apply."""
    return ON_STEP[step].get(status)


def webhook_type(status: BatchStatus) -> str:
    """The webhook event a final status sends ("batch.completed", ...)."""
    if status not in TERMINAL:
        raise ValueError(f"no webhook for the non-final status {status}")
    return f"batch.{status}"


# -- shards, uploads, webhook events ----------------------------------------------------------------------------


class ShardStatus(StrEnum):
    PENDING = "pending"  # waiting for a worker (or, with a retry time, paused)
    RUNNING = "running"  # leased to one attempt
    DONE = "done"  # committed by its attempt: its parts count


# running -> running: a lease that ran out is taken over by a new attempt; running -> pending: given back.
SHARD_TRANSITIONS: dict[ShardStatus, frozenset[ShardStatus]] = {
    ShardStatus.PENDING: frozenset({ShardStatus.RUNNING}),
    ShardStatus.RUNNING: frozenset({ShardStatus.RUNNING, ShardStatus.PENDING, ShardStatus.DONE}),
    ShardStatus.DONE: frozenset(),
}


class UploadStatus(StrEnum):
    PENDING = "pending"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"  # stored by the sweeper; a pending upload past its expiry already reads as expired


UPLOAD_TRANSITIONS: dict[UploadStatus, frozenset[UploadStatus]] = {
    UploadStatus.PENDING: frozenset({UploadStatus.COMPLETED, UploadStatus.CANCELLED, UploadStatus.EXPIRED}),
    UploadStatus.COMPLETED: frozenset(),
    UploadStatus.CANCELLED: frozenset(),
    UploadStatus.EXPIRED: frozenset(),
}


class WebhookStatus(StrEnum):
    PENDING = "pending"  # due at its next try
    DELIVERED = "delivered"
    ABANDONED = "abandoned"  # given up (too old, or refused for good)
    SKIPPED = "skipped"  # nowhere to send it: no endpoint of its project, no --webhook-url


# pending -> pending: a failed try, due again later.
WEBHOOK_TRANSITIONS: dict[WebhookStatus, frozenset[WebhookStatus]] = {
    WebhookStatus.PENDING: frozenset(
        {WebhookStatus.PENDING, WebhookStatus.DELIVERED, WebhookStatus.ABANDONED, WebhookStatus.SKIPPED}
    ),
    WebhookStatus.DELIVERED: frozenset(),
    WebhookStatus.ABANDONED: frozenset(),
    WebhookStatus.SKIPPED: frozenset(),
}


def _member(enum: type[E], value: str) -> E | None:
    try:
        return enum(value)
    except ValueError:
        return None


def check_shard(src: ShardStatus, dst: ShardStatus) -> ShardStatus:
    """dst, if a shard may go from src to dst; else IllegalTransition."""
    if dst not in SHARD_TRANSITIONS[src]:
        raise IllegalTransition(src, dst, "shard")
    return dst


def finished_upload(status: str) -> UploadStatus:
    """The status a pending upload ends in (completed, cancelled, expired); IllegalTransition for any other."""
    dst = _member(UploadStatus, status)
    if dst is None or dst not in UPLOAD_TRANSITIONS[UploadStatus.PENDING]:
        raise IllegalTransition(UploadStatus.PENDING, status, "upload")
    return dst


def settled_webhook(status: str) -> WebhookStatus:
    """The status a pending event takes after a delivery attempt; IllegalTransition for any other."""
    dst = _member(WebhookStatus, status)
    if dst is None or dst not in WEBHOOK_TRANSITIONS[WebhookStatus.PENDING]:
        raise IllegalTransition(WebhookStatus.PENDING, status, "webhook event")
    return dst
