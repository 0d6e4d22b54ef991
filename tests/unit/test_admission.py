"""Admission control's rule (domain/admission.py), pure."""

from __future__ import annotations

from batchyard.domain.admission import (
    DEFAULT_LINE_BYTES,
    WINDOW_S,
    AdmissionLoad,
    estimated_lines,
    throughput,
    verdict,
)

NOW = 10_000.0


def load(
    backlog: int = 0, done: int = 0, started_ago: float | None = None, size: int = 0, lines: int = 0
) -> AdmissionLoad:
    first = None if started_ago is None else NOW - started_ago
    return AdmissionLoad(NOW, backlog, done, first, size, lines)


def test_no_figure_admits_everything() -> None:
    assert throughput(load(backlog=10**9)) is None
    assert verdict(load(backlog=10**9), 10**6, 60) is None
    assert verdict(load(backlog=10**9, done=0, started_ago=30), 10**6, 60) is None  # nothing answered


def test_the_throughput_is_over_the_time_the_lines_took_within_the_window() -> None:
    assert throughput(load(done=600, started_ago=60)) == 10.0  # began a minute ago
    assert throughput(load(done=6000, started_ago=3 * WINDOW_S)) == 6000 / WINDOW_S  # clipped to the window
    assert throughput(load(done=5, started_ago=0.0)) == 5.0  # at least a second


def test_a_batch_is_admitted_only_when_the_backlog_and_it_fit_the_window() -> None:
    busy = load(backlog=80_000, done=6000, started_ago=WINDOW_S)  # 10 lines/s
    assert verdict(busy, 6_000, 9_000) is None  # 86,000 lines in 8,600 s
    refused = verdict(busy, 20_000, 9_000)
    assert refused is not None
    assert (refused.backlog_lines, refused.new_lines, refused.lines_per_s) == (80_000, 20_000, 10.0)
    assert refused.eta_s == 10_000
    msg = refused.message()
    assert "80,000 lines are queued ahead of this batch's ~20,000" in msg
    assert "10.0 lines/s" in msg and "~2.8 hours" in msg and "past the 2.5 hours completion window" in msg
    assert msg.endswith("Please try again once some in_progress batches have been completed.")


def test_new_lines_are_estimated_from_the_bytes_per_line_measured() -> None:
    assert estimated_lines(50_000, load(size=1_000_000, lines=2_000)) == 100  # 500 bytes a line
    assert estimated_lines(int(DEFAULT_LINE_BYTES) * 7, load()) == 7  # nothing measured: 1 KB a line
    assert estimated_lines(1, load(size=10, lines=1)) == 1


# -- review 14: the queue ahead of a batch is what fair share serves before it, not every owner's backlog ---------


def test_under_fair_share_another_owners_backlog_counts_only_up_to_its_share() -> None:
    """One project's 10**6 queued lines refused every other project's batch under `--admission reject`, although
    fair share serves a newcomer's lines beside them (at its weight), not after them."""
    waiting = (("proj_a", 1_000_000, 1.0), ("proj_b", 500, 1.0))
    busy = AdmissionLoad(NOW, 1_000_500, 6000, NOW - WINDOW_S, 0, 0, waiting)  # 10 lines/s
    # proj_b's 500 queued + 1,000 new: A is served as much meanwhile, so 3,000 lines in 300 s
    assert verdict(busy, 1_000, 600, owner="proj_b") is None
    late = verdict(busy, 1_000, 200, owner="proj_b")
    assert late is not None and late.eta_s == 300 and late.backlog_lines == 2_000
    # a newcomer with weight 3 gets three lines for each of A's
    assert verdict(busy, 3_000, 450, owner="proj_c", weight=3.0) is None  # 3,000 + A's 1,000 + B's 500: 450 s
    # the big owner itself still waits for its own backlog
    assert verdict(busy, 1_000, 600, owner="proj_a") is not None
    # another owner's backlog smaller than its share counts whole
    small = AdmissionLoad(NOW, 100, 6000, NOW - WINDOW_S, 0, 0, (("proj_a", 100, 1.0),))
    found = verdict(small, 5_000, 100, owner="proj_b")
    assert found is not None and found.backlog_lines == 100 and found.eta_s == 510
    # without an owner (and for a store that gives no split), the whole backlog is ahead, as before
    assert verdict(busy, 1_000, 600) is not None
