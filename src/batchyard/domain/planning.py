"""Shard planning across a whole file: lines that share a prompt prefix land in the same shards.

The validator cuts a file into contiguous shards (1,000 lines, 16 MiB). Prefix ordering then works inside each
shard, so a system prompt whose lines are spread over a 50,000-line file is prefilled cold once per shard that holds
some of them, and shards running at the same time on several workers prefill it at the same moment. When a prefix
group (`ordering.group_key`: the model, the instructions and every message but the last) has lines in more than one
shard, the plan regroups: every group of two lines or more is packed, group after group, into shards of its own,
and each contiguous shard keeps the lines that belong to no such group. A regrouped shard is a list of byte spans
of the input file (`Span`); a worker reads each span (nearby spans in one ranged read) and numbers its lines from
the span's first line, exactly as for a contiguous shard.

Memory: 40 bytes a line that has a group (five flat arrays), plus one dict entry a distinct group; nothing for the
others. Planning gives up (the contiguous plan stands) past `MAX_GROUPED_LINES` or `MAX_GROUPS`.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "MAX_GROUPED_LINES",
    "MAX_GROUPS",
    "PrefixPlanner",
    "ShardPlan",
    "Span",
    "pack_spans",
    "unpack_spans",
]

MAX_GROUPED_LINES = 2_000_000
MAX_GROUPS = 500_000


class Span(NamedTuple):
    start: int  # byte offset of the span's first byte
    end: int  # byte offset just past the span's last line (its newline included)
    first_line: int  # 1-based physical line number of the span's first line


@dataclass(frozen=True, slots=True)
class ShardPlan:
    index: int  # 0-based
    start: int  # byte offset of first byte of the shard's first line (of its lowest span, when it has spans)
    end: int  # byte offset just past the shard's last line (including its newline; of its highest span)
    first_line: int  # 1-based line number of its first line (its lowest, when it has spans)
    line_count: int  # number of request lines in the shard (blank lines are skipped and not counted)
    spans: tuple[Span, ...] = ()  # empty: the shard is the contiguous range start..end

    def ranges(self) -> tuple[Span, ...]:
        """The byte spans to read, in order."""
        return self.spans or (Span(self.start, self.end, self.first_line),)


def pack_spans(spans: tuple[Span, ...]) -> bytes | None:
    """Spans as stored with a shard (flat little-endian int64 triples); None for a contiguous shard."""
    if not spans:
        return None
    flat = array("q", [v for s in spans for v in s])
    if flat.itemsize != 8:  # pragma: no cover - every platform CPython runs on has an 8-byte 'q'
        raise RuntimeError("array('q') is not 64-bit here")
    return flat.tobytes()


def unpack_spans(raw: bytes | memoryview | None) -> tuple[Span, ...]:
    if not raw:
        return ()
    flat = array("q")
    flat.frombytes(bytes(raw))
    return tuple(Span(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3))


class PrefixPlanner:
    """Collects the request lines that have a prefix group while the validator scans, then regroups the plan."""

    def __init__(self, shard_lines: int, shard_bytes: int) -> None:
        self._shard_lines = shard_lines
        self._shard_bytes = shard_bytes
        self._gid: dict[int, int] = {}  # hash of a group key -> group number, in order of first appearance
        self._sizes = array("q")  # lines per group number
        self.group = array("q")  # per grouped line: its group number
        self.start = array("q")  # its byte range
        self.end = array("q")
        self.line = array("q")  # its physical line number
        self.ordinal = array("q")  # its 0-based position among the file's request lines
        self.abandoned = False

    def add(self, key_hash: int, start: int, end: int, line_no: int, ordinal: int) -> None:
        if self.abandoned:
            return
        gid = self._gid.get(key_hash)
        if gid is None:
            if len(self._gid) >= MAX_GROUPS:
                self._abandon()
                return
            gid = self._gid[key_hash] = len(self._gid)
            self._sizes.append(0)
        if len(self.group) >= MAX_GROUPED_LINES:
            self._abandon()
            return
        self._sizes[gid] += 1
        self.group.append(gid)
        self.start.append(start)
        self.end.append(end)
        self.line.append(line_no)
        self.ordinal.append(ordinal)

    def clamp(self, size: int) -> None:
        """The file ended without a newline: its last line ends at the end of the file, not one byte past it."""
        if self.end and self.end[-1] > size:
            self.end[-1] = size

    def _abandon(self) -> None:
        self.abandoned = True
        self._gid.clear()
        for a in (self._sizes, self.group, self.start, self.end, self.line, self.ordinal):
            del a[:]

    def plan(self, shards: list[ShardPlan]) -> list[ShardPlan]:
        """`shards` (the contiguous plan, in file order) regrouped, or `shards` itself when regrouping would not
        bring a group's lines together that are now apart."""
        if self.abandoned or len(shards) < 2 or not self._spread(shards):
            return shards
        sizes = self._sizes
        chosen = [i for i in range(len(self.group)) if sizes[self.group[i]] >= 2]
        # Groups in order of first appearance, each group's lines in file order (a stable sort).
        chosen.sort(key=self.group.__getitem__)
        out: list[ShardPlan] = []
        self._pack_groups(chosen, out)
        self._pack_rest(shards, {i for i in chosen}, out)
        return out

    def _spread(self, shards: list[ShardPlan]) -> bool:
        """Whether some group with two lines or more has lines in two contiguous shards."""
        bounds = [s.end for s in shards]
        seen: dict[int, int] = {}
        shard = 0
        for i in range(len(self.group)):
            while self.start[i] >= bounds[shard]:
                shard += 1
            g = self.group[i]
            first = seen.setdefault(g, shard)
            if first != shard:
                return True
        return False

    def _pack_groups(self, chosen: list[int], out: list[ShardPlan]) -> None:
        spans: list[Span] = []
        count = size = 0
        for i in chosen:
            start, end = self.start[i], self.end[i]
            if count and (count == self._shard_lines or size + end - start > self._shard_bytes):
                out.append(_shard(len(out), spans, count))
                spans, count, size = [], 0, 0
            if spans and spans[-1].end == start:  # the next line of the file: extend the span
                last = spans[-1]
                spans[-1] = Span(last.start, end, last.first_line)
            else:
                spans.append(Span(start, end, self.line[i]))
            count += 1
            size += end - start
        if count:
            out.append(_shard(len(out), spans, count))

    def _pack_rest(self, shards: list[ShardPlan], chosen: set[int], out: list[ShardPlan]) -> None:
        """Each contiguous shard less its regrouped lines: the gaps between them, as spans."""
        n = len(self.group)
        i = 0
        for s in shards:
            # the regrouped lines inside this shard, in file order
            taken: list[int] = []
            while i < n and self.start[i] < s.end:
                if i in chosen:
                    taken.append(i)
                i += 1
            if not taken:
                out.append(ShardPlan(len(out), s.start, s.end, s.first_line, s.line_count))
                continue
            count = s.line_count - len(taken)
            if count == 0:
                continue
            spans: list[Span] = []
            pos, line = s.start, s.first_line
            for t in taken:
                if self.start[t] > pos:
                    spans.append(Span(pos, self.start[t], line))
                pos, line = self.end[t], self.line[t] + 1
            if pos < s.end:
                spans.append(Span(pos, s.end, line))
            out.append(_shard(len(out), spans, count))


def _shard(index: int, spans: list[Span], count: int) -> ShardPlan:
    first = spans[0]
    if len(spans) == 1:
        return ShardPlan(index, first.start, first.end, first.first_line, count)
    start = min(s.start for s in spans)
    end = max(s.end for s in spans)
    return ShardPlan(index, start, end, min(s.first_line for s in spans), count, tuple(spans))
