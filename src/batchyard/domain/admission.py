"""Admission control at create, pure: can the work queued ahead plus a new batch finish within its completion window
at the throughput measured lately?

The store gives the figures (`MetadataStore.admission_load`): the lines of unfinished batches without an answer yet
(the backlog, all models together, and by owner with the owners' weights), and the lines answered by shards that
finished in the last `WINDOW_S` seconds, with when the first of those shards started. The throughput is those lines
over the time they took (from the first start, or the window's start if later). With no shard finished in the
window there is no figure, and every batch is admitted. The lines ahead of a new batch are those fair share serves
before its last (`ahead`): its owner's backlog and, of each other owner's, as much as that owner's weight gets
meanwhile. A new batch's lines are known only once it is validated: at create they are estimated from its input
file's bytes and the bytes per line of the batches measured (or `DEFAULT_LINE_BYTES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WINDOW_S = 600.0  # throughput is measured over the shards finished in the last ten minutes
DEFAULT_LINE_BYTES = 1000.0  # a request line's size when no batch has been measured
MODES = ("off", "warn", "reject")


@dataclass(frozen=True, slots=True)
class AdmissionLoad:
    now: float  # the store's clock
    backlog_lines: int  # lines of unfinished batches without an output or error line yet
    done_lines: int  # lines answered (not cancelled or expired) by shards finished since now - WINDOW_S
    first_started: float | None  # when the first of those shards' attempts started; None: no shard finished
    input_bytes: int  # input bytes of the batches the bytes-per-line figure comes from
    input_lines: int  # and their lines
    # the backlog by owner: (owner, lines, its fair-share weight), by owner; () from a store that does not split it
    waiting: tuple[tuple[str, int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Verdict:
    """The new batch cannot finish in time: how long the queue ahead and it would take."""

    eta_s: float
    backlog_lines: int
    new_lines: int
    lines_per_s: float
    window_s: int

    def message(self) -> str:
        return (
            f"The batch queue is full: {self.backlog_lines:,} lines are queued ahead of this batch's "
            f"~{self.new_lines:,}, and at the measured {self.lines_per_s:,.1f} lines/s they would take "
            f"~{_duration(self.eta_s)}, past the {_duration(self.window_s)} completion window. "
            "Please try again once some in_progress batches have been completed."
        )


def throughput(load: AdmissionLoad, window_s: float = WINDOW_S) -> float | None:
    """Lines per second answered lately, or None with no figure yet."""
    if load.first_started is None or load.done_lines <= 0:
        return None
    period = load.now - max(load.first_started, load.now - window_s)
    return load.done_lines / max(period, 1.0)


def estimated_lines(file_bytes: int, load: AdmissionLoad) -> int:
    """A new batch's lines, from its input file's size and the bytes per line measured."""
    per_line = load.input_bytes / load.input_lines if load.input_lines > 0 else DEFAULT_LINE_BYTES
    return max(1, math.ceil(file_bytes / max(per_line, 1.0)))


def verdict(
    load: AdmissionLoad,
    new_lines: int,
    window_s: int,
    *,
    owner: str | None = None,
    weight: float | None = None,
) -> Verdict | None:
    """None when the lines served before the last of `new_lines` finish within `window_s` at the measured
    throughput (or when there is no figure yet); else why not. With `owner`, those are what fair share serves first
    (`ahead`; `weight`: the owner's, else the one `load.waiting` gives it, else 1); without, the whole backlog."""
    rate = throughput(load)
    if rate is None:
        return None
    before = load.backlog_lines
    if owner is not None and load.waiting:
        before = ahead(load, owner, _weight_of(load, owner) if weight is None else weight, new_lines)
    eta = (before + new_lines) / rate
    if eta <= window_s:
        return None
    return Verdict(eta, before, new_lines, rate, window_s)


def ahead(load: AdmissionLoad, owner: str, weight: float, new_lines: int) -> int:
    """The lines answered before the last of `owner`'s `new_lines` under weighted fair share (fairshare.py), in the
    fluid model: the owner's own backlog, and of every other owner's backlog what its weight is served meanwhile
    (`mine * its weight / weight`), or all of it when smaller. Not every owner's backlog: a project's batch is not
    queued behind another project's million lines (it gets its share beside them)."""
    mine = new_lines + sum(n for o, n, _ in load.waiting if o == owner)
    own = weight if weight > 0 else 1.0
    others = sum(min(n, mine * (w if w > 0 else 1.0) / own) for o, n, w in load.waiting if o != owner)
    return mine - new_lines + math.ceil(others)


def _weight_of(load: AdmissionLoad, owner: str) -> float:
    return next((w for o, _, w in load.waiting if o == owner), 1.0)


def _duration(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} hours"
    if seconds >= 120:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds:.0f} seconds"
