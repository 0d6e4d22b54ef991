"""The batch state machine: the transition table, the stamps, the terminal states."""

from __future__ import annotations

import itertools

import pytest

from batchyard.domain.states import (
    ACTIVE,
    CANCELLABLE,
    FINALIZABLE,
    ON_STEP,
    SHARD_TRANSITIONS,
    STAMP,
    TERMINAL,
    TRANSITIONS,
    UPLOAD_TRANSITIONS,
    VALIDATABLE,
    WEBHOOK_TRANSITIONS,
    BatchStatus,
    IllegalTransition,
    ShardStatus,
    Step,
    UploadStatus,
    WebhookStatus,
    check_shard,
    check_transition,
    finished_upload,
    on,
    settled_webhook,
    sources_of,
    webhook_type,
)

S = BatchStatus

# The OpenAI batch lifecycle, written out by hand so that a change to the table shows up here.
LEGAL = {
    (S.VALIDATING, S.IN_PROGRESS): "in_progress_at",
    (S.VALIDATING, S.FAILED): "failed_at",
    (S.VALIDATING, S.CANCELLING): "cancelling_at",
    (S.VALIDATING, S.EXPIRED): "expired_at",
    (S.IN_PROGRESS, S.FINALIZING): "finalizing_at",
    (S.IN_PROGRESS, S.CANCELLING): "cancelling_at",
    (S.FINALIZING, S.COMPLETED): "completed_at",
    (S.FINALIZING, S.EXPIRED): "expired_at",
    (S.CANCELLING, S.CANCELLED): "cancelled_at",
}


def test_every_status_has_a_row() -> None:
    assert set(TRANSITIONS) == set(BatchStatus)


def test_the_table_is_exactly_the_lifecycle() -> None:
    table = {(src, dst) for src, nxt in TRANSITIONS.items() for dst in nxt}
    assert table == set(LEGAL)


@pytest.mark.parametrize(("src", "dst"), sorted(LEGAL), ids=lambda s: str(s))
def test_legal_transition_returns_its_stamp(src: BatchStatus, dst: BatchStatus) -> None:
    assert check_transition(src, dst) == LEGAL[(src, dst)]


ILLEGAL = sorted(set(itertools.product(BatchStatus, BatchStatus)) - set(LEGAL))


@pytest.mark.parametrize(("src", "dst"), ILLEGAL, ids=lambda s: str(s))
def test_illegal_transition_raises(src: BatchStatus, dst: BatchStatus) -> None:
    with pytest.raises(IllegalTransition) as info:
        check_transition(src, dst)
    assert info.value.src == src
    assert info.value.dst == dst
    assert f"{src} -> {dst}" in str(info.value)


def test_illegal_transition_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        check_transition(S.COMPLETED, S.IN_PROGRESS)


def test_no_status_transitions_to_itself() -> None:
    for status in BatchStatus:
        assert status not in TRANSITIONS[status]


def test_terminal_states() -> None:
    assert {S.FAILED, S.COMPLETED, S.EXPIRED, S.CANCELLED} == TERMINAL


def test_validating_is_never_entered() -> None:
    assert sources_of(S.VALIDATING) == frozenset()
    assert S.VALIDATING not in STAMP


def test_every_entered_state_has_a_stamp_field() -> None:
    entered = {dst for nxt in TRANSITIONS.values() for dst in nxt}
    assert entered == set(STAMP)
    for status, field in STAMP.items():
        assert field == f"{status}_at"


@pytest.mark.parametrize(
    ("dst", "sources"),
    [
        (S.CANCELLING, {S.VALIDATING, S.IN_PROGRESS}),
        (S.EXPIRED, {S.VALIDATING, S.FINALIZING}),
        (S.COMPLETED, {S.FINALIZING}),
        (S.CANCELLED, {S.CANCELLING}),
        (S.IN_PROGRESS, {S.VALIDATING}),
        (S.FAILED, {S.VALIDATING}),
    ],
)
def test_sources_of(dst: BatchStatus, sources: set[BatchStatus]) -> None:
    assert sources_of(dst) == frozenset(sources)


def test_active_states_are_those_whose_shards_run() -> None:
    assert frozenset({S.IN_PROGRESS, S.CANCELLING}) == ACTIVE
    assert not ACTIVE & TERMINAL


def test_status_values_are_the_wire_strings() -> None:
    assert [str(s) for s in BatchStatus] == [
        "validating",
        "failed",
        "in_progress",
        "finalizing",
        "completed",
        "expired",
        "cancelling",
        "cancelled",
    ]


def test_unfinished_is_every_status_but_the_terminal_ones() -> None:
    from batchyard.domain.states import UNFINISHED

    assert {S.VALIDATING, S.IN_PROGRESS, S.FINALIZING, S.CANCELLING} == UNFINISHED
    assert not UNFINISHED & TERMINAL


# What each step does from each state, written out by hand (None: the step does not apply).
STEPS = {
    Step.CANCEL: {S.VALIDATING: S.CANCELLING, S.IN_PROGRESS: S.CANCELLING},
    Step.PLANNED: {S.VALIDATING: S.IN_PROGRESS, S.CANCELLING: S.CANCELLING},
    Step.INVALID: {S.VALIDATING: S.FAILED, S.CANCELLING: S.CANCELLED},
    Step.FINALIZE: {S.IN_PROGRESS: S.FINALIZING, S.CANCELLING: S.CANCELLING, S.FINALIZING: S.FINALIZING},
}


@pytest.mark.parametrize(("step", "status"), list(itertools.product(Step, BatchStatus)), ids=str)
def test_each_step_from_each_state(step: Step, status: BatchStatus) -> None:
    assert on(step, status) == STEPS[step].get(status)


def test_every_move_of_a_step_is_a_legal_transition() -> None:
    for moves in ON_STEP.values():
        for src, dst in moves.items():
            assert dst == src or dst in TRANSITIONS[src]
            assert src not in TERMINAL  # nothing happens to a final batch


def test_a_cancel_applies_where_cancelling_can_be_entered() -> None:
    assert frozenset({S.VALIDATING, S.IN_PROGRESS}) == CANCELLABLE == sources_of(S.CANCELLING)
    assert set(ON_STEP[Step.CANCEL]) == CANCELLABLE


def test_a_batch_that_fails_validation_while_cancelling_ends_cancelled() -> None:
    assert on(Step.INVALID, S.CANCELLING) == S.CANCELLED
    assert on(Step.INVALID, S.VALIDATING) == S.FAILED


def test_validation_and_finalization_jobs_are_claimed_where_their_steps_apply() -> None:
    assert frozenset({S.VALIDATING, S.CANCELLING}) == VALIDATABLE == frozenset(ON_STEP[Step.INVALID])
    assert frozenset({S.IN_PROGRESS, S.CANCELLING, S.FINALIZING}) == FINALIZABLE
    assert ACTIVE <= FINALIZABLE


@pytest.mark.parametrize("status", sorted(TERMINAL), ids=str)
def test_webhook_type_of_each_final_status(status: BatchStatus) -> None:
    assert webhook_type(status) == f"batch.{status}"


@pytest.mark.parametrize("status", sorted(set(BatchStatus) - TERMINAL), ids=str)
def test_no_webhook_before_a_final_status(status: BatchStatus) -> None:
    with pytest.raises(ValueError):
        webhook_type(status)


def test_the_other_statuses_are_the_stored_strings() -> None:
    assert [str(s) for s in ShardStatus] == ["pending", "running", "done"]
    assert [str(s) for s in UploadStatus] == ["pending", "completed", "cancelled", "expired"]
    assert [str(s) for s in WebhookStatus] == ["pending", "delivered", "abandoned", "skipped"]


SHARD_LEGAL = {("pending", "running"), ("running", "running"), ("running", "pending"), ("running", "done")}


def test_the_shard_lifecycle() -> None:
    assert set(SHARD_TRANSITIONS) == set(ShardStatus)
    for src, dst in itertools.product(ShardStatus, ShardStatus):
        if (src, dst) in SHARD_LEGAL:
            assert check_shard(src, dst) is dst
        else:
            with pytest.raises(IllegalTransition, match=f"illegal shard transition {src} -> {dst}"):
                check_shard(src, dst)


def test_the_upload_lifecycle() -> None:
    assert set(UPLOAD_TRANSITIONS) == set(UploadStatus)
    assert {s for s in UploadStatus if s != "pending" and not UPLOAD_TRANSITIONS[s]} == {
        "completed",
        "cancelled",
        "expired",
    }
    for status in ("completed", "cancelled", "expired"):
        assert finished_upload(status) == status
        assert isinstance(finished_upload(status), UploadStatus)
    for status in ("pending", "", "done"):
        with pytest.raises(IllegalTransition, match="illegal upload transition pending -> "):
            finished_upload(status)


def test_the_webhook_event_lifecycle() -> None:
    assert set(WEBHOOK_TRANSITIONS) == set(WebhookStatus)
    for status in ("pending", "delivered", "abandoned", "skipped"):
        assert settled_webhook(status) == status
    for status in ("completed", "failed", ""):
        with pytest.raises(IllegalTransition, match="illegal webhook event transition pending -> "):
            settled_webhook(status)
    assert not WEBHOOK_TRANSITIONS[WebhookStatus.DELIVERED]
    assert not WEBHOOK_TRANSITIONS[WebhookStatus.ABANDONED]
    assert not WEBHOOK_TRANSITIONS[WebhookStatus.SKIPPED]
