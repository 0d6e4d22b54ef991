"""Shard planning across a whole file: lines that share a prompt prefix land in the same shards.

The validator cuts a file into contiguous shards (1,000 lines, 16 MiB). Prefix ordering then works inside each
shard, so a system prompt whose lines are spread over a 50,000-line file is prefilled cold once per shard that holds
some of them, and shards running at the same time on several workers prefill it at the same moment. When a prefix
group (`ordering.group_key`: the model, the instructions and every message but the last) has lines in more than one
shard, the plan regroups: every group of two lines or more is packed, group after group, into shards of its own,
and each contiguous shard keeps the lines that belong to no such group. A regrouped shard is a list of byte spans
of the input file (`Span`); a worker reads each span (nearby spans in one ranged read) and numbers its lines from
the span's first line, exactly as for a contiguous shard.

Memory: 56 bytes a run of consecutive lines of one group (seven flat arrays: about one a shard for a file whose
lines share one system prompt, about one a line for a shuffled file), plus one dict entry a distinct group; nothing
for lines without a group. Planning gives up (the contiguous plan stands) past `MAX_RUNS` or `MAX_GROUPS`.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "MAX_GROUPS",
    "MAX_RUNS",
    "PrefixPlanner",
    "ShardPlan",
    "Span",
    "pack_spans",
    "unpack_spans",
]

MAX_RUNS = 2_000_000
MAX_GROUPS = 500_000
_OPEN_SHARDS = (
    16  # small groups are fitted into the last this many planned shards (first fit, bounded: O(groups))
)


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
    """Collects, while the validator scans, the runs of request lines that have a prefix group, then regroups the
    plan. A run is a stretch of consecutive request lines of one group inside one contiguous shard (blank lines
    may sit inside it): a file whose lines all share one system prompt costs one run a shard, a shuffled one about
    one run a line."""

    def __init__(self, shard_lines: int, shard_bytes: int) -> None:
        self._shard_lines = shard_lines
        self._shard_bytes = shard_bytes
        self._gid: dict[int, int] = {}  # hash of a group key -> group number, in order of first appearance
        self._sizes = array("q")  # lines per group number
        self.group = array("q")  # per run: its group number
        self.shard = array("q")  # the contiguous shard it lies in
        self.start = array("q")  # its byte range
        self.end = array("q")
        self.first = array("q")  # the physical line numbers of its first and last lines
        self.last = array("q")
        self.count = array("q")  # its request lines
        self._ordinal = -2  # position among the file's request lines of the last line added
        self._last_hash: int | None = None  # its group's hash, and its contiguous shard
        self._last_shard = -1
        self.abandoned = False

    def add(self, key_hash: int, start: int, end: int, line_no: int, ordinal: int, shard: int) -> None:
        if ordinal == self._ordinal + 1 and key_hash == self._last_hash and shard == self._last_shard:
            # the common case in a file sorted by prompt, or sharing one: the run goes on
            self._ordinal = ordinal
            self.end[-1] = end
            self.last[-1] = line_no
            self.count[-1] += 1
            self._sizes[self.group[-1]] += 1
            return
        if self.abandoned:
            return
        self._ordinal, self._last_hash, self._last_shard = ordinal, key_hash, shard
        gid = self._gid.get(key_hash)
        if gid is None:
            if len(self._gid) >= MAX_GROUPS:
                self._abandon()
                return
            gid = self._gid[key_hash] = len(self._gid)
            self._sizes.append(0)
        if len(self.group) >= MAX_RUNS:
            self._abandon()
            return
        self._sizes[gid] += 1
        self.group.append(gid)
        self.shard.append(shard)
        self.start.append(start)
        self.end.append(end)
        self.first.append(line_no)
        self.last.append(line_no)
        self.count.append(1)

    def clamp(self, size: int) -> None:
        """The file ended without a newline: its last line ends at the end of the file, not one byte past it."""
        if self.end and self.end[-1] > size:
            self.end[-1] = size

    def _abandon(self) -> None:
        self.abandoned = True
        self._last_hash = None
        self._gid.clear()
        for a in (
            self._sizes,
            self.group,
            self.shard,
            self.start,
            self.end,
            self.first,
            self.last,
            self.count,
        ):
            del a[:]

    def plan(self, shards: list[ShardPlan]) -> list[ShardPlan]:
        """`shards` (the contiguous plan, in file order) regrouped, or `shards` itself when regrouping would not
        bring a group's lines together that are now apart."""
        if self.abandoned or len(shards) < 2 or not self._spread():
            return shards
        sizes = self._sizes
        chosen = [i for i in range(len(self.group)) if sizes[self.group[i]] >= 2]
        # Groups in order of first appearance, each group's runs in file order (a stable sort).
        chosen.sort(key=self.group.__getitem__)
        out: list[ShardPlan] = []
        self._pack_groups(chosen, out)
        self._pack_rest(shards, set(chosen), out)
        return out

    def _spread(self) -> bool:
        """Whether some group has runs in two contiguous shards."""
        seen: dict[int, int] = {}
        for g, shard in zip(self.group, self.shard, strict=True):
            if seen.setdefault(g, shard) != shard:
                return True
        return False

    def _pack_groups(self, chosen: list[int], out: list[ShardPlan]) -> None:
        """Runs packed into shards of at most `shard_lines` lines and `shard_bytes` bytes (a run is never split:
        it already fits one contiguous shard), with no group split across shards where it fits in one. A group
        cut at a shard boundary costs a prefill of its prompt on each side: the lanes of the two shards run at
        once, on two of the engine's slots, neither of which has the prompt yet (`bench/prefix_engine.py
        --shard-lines 20` measured it: each cut group ends a lane's run on its slot). So a group that fits goes
        whole into the first of the last few open shards with room for it (first fit, in order of appearance),
        and a larger one is cut into as few near-equal parts as the bounds allow, each a shard of its own."""
        lines, room = self._shard_lines, self._shard_bytes
        shards: list[list[int]] = []  # the runs of each planned shard, in order
        open_: list[
            tuple[int, int, int]
        ] = []  # (shard, lines, bytes) of the last few shards that take small groups
        i = 0
        while i < len(chosen):
            g = self.group[chosen[i]]
            j = i
            n = b = 0
            while j < len(chosen) and self.group[chosen[j]] == g:
                n += self.count[chosen[j]]
                b += self.end[chosen[j]] - self.start[chosen[j]]
                j += 1
            runs = chosen[i:j]
            i = j
            if n <= lines and b <= room:
                for k, (index, used, size) in enumerate(open_):
                    if used + n <= lines and size + b <= room:
                        shards[index].extend(runs)
                        open_[k] = (index, used + n, size + b)
                        break
                else:
                    shards.append(list(runs))
                    open_.append((len(shards) - 1, n, b))
                    if len(open_) > _OPEN_SHARDS:
                        del open_[0]
                continue
            parts = max(-(-n // lines), -(-b // room))
            target = -(-n // parts)
            part: list[int] = []
            count = size = 0
            for r in runs:
                c, s = self.count[r], self.end[r] - self.start[r]
                if part and (count + c > lines or size + s > room):
                    shards.append(part)
                    part, count, size = [], 0, 0
                part.append(r)
                count += c
                size += s
                if count >= target:
                    shards.append(part)
                    part, count, size = [], 0, 0
            if part:
                shards.append(part)
        for runs in shards:
            runs.sort(key=self.start.__getitem__)  # file order within a shard: adjacent runs make one span
            spans: list[Span] = []
            count = 0
            for r in runs:
                start, end = self.start[r], self.end[r]
                if spans and spans[-1].end == start:  # the next lines of the file: extend the span
                    last = spans[-1]
                    spans[-1] = Span(last.start, end, last.first_line)
                else:
                    spans.append(Span(start, end, self.first[r]))
                count += self.count[r]
            out.append(_shard(len(out), spans, count))

    def _pack_rest(self, shards: list[ShardPlan], chosen: set[int], out: list[ShardPlan]) -> None:
        """Each contiguous shard less its regrouped runs: the gaps between them, as spans."""
        by_shard: dict[int, list[int]] = {}
        for i in sorted(chosen):  # runs are recorded in file order
            by_shard.setdefault(self.shard[i], []).append(i)
        for s in shards:
            taken = by_shard.get(s.index, [])
            if not taken:
                out.append(ShardPlan(len(out), s.start, s.end, s.first_line, s.line_count))
                continue
            count = s.line_count - sum(self.count[t] for t in taken)
            if count == 0:
                continue
            spans: list[Span] = []
            pos, line = s.start, s.first_line
            for t in taken:
                if self.start[t] > pos:
                    spans.append(Span(pos, self.start[t], line))
                pos, line = self.end[t], self.last[t] + 1
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
