"""The partial-results cursor (domain/results.py)."""

from __future__ import annotations

import base64

from batchyard.domain.results import At, Cursor, Kind, decode


def test_done_merges_ranges_and_forgets_the_position_inside() -> None:
    c = Cursor().inside(3, Kind.ERROR, 2)
    c = c.done(1).done(0).done(3).done(5).done(4)
    assert c.read == ((0, 1), (3, 5)) and c.at is None
    assert [c.has_read(i) for i in range(7)] == [True, True, False, True, True, True, False]


def test_skip() -> None:
    c = Cursor(((0, 0),), At(2, Kind.ERROR, 4))
    assert c.skip(0, Kind.OUTPUT) == -1 and c.skip(0, Kind.ERROR) == -1
    assert c.skip(2, Kind.OUTPUT) == -1  # an earlier kind of the shard was read in full
    assert c.skip(2, Kind.ERROR) == 4
    assert c.skip(1, Kind.OUTPUT) == 0
    assert Cursor((), At(2, Kind.OUTPUT, 3)).skip(2, Kind.ERROR) == 0


def test_round_trip_and_garbage() -> None:
    c = Cursor(((0, 4), (9, 9)), At(7, Kind.OUTPUT, 12))
    assert decode(c.encode()) == c
    assert decode(Cursor().encode()) == Cursor()
    for bad in ["", "!!!", "x" * 70_000, base64.urlsafe_b64encode(b'{"r": [[3, 1]], "a": null}').decode()]:
        assert decode(bad) is None
    assert decode(base64.urlsafe_b64encode(b'{"r": [], "a": [1, 5, 0]}').decode()) is None  # no kind 5
    assert decode(base64.urlsafe_b64encode(b"[1]").decode()) is None
