"""The batch state machine: the transition table, the stamps, the terminal states."""

from __future__ import annotations

import itertools

import pytest

from batchyard.domain.states import (
    ACTIVE,
    STAMP,
    TERMINAL,
    TRANSITIONS,
    BatchStatus,
    IllegalTransition,
    check_transition,
    sources_of,
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
