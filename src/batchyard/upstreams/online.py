"""Online requests (the front door: /v1/chat/completions and the like) take priority over batch lines.

Online requests are served by the API process, batch lines by worker processes (or a worker thread): each has its
own router and limiters. They meet on a *board*, a small shared-memory file of this machine (one per store: the
processes of one deployment on one machine find the same file):

    header   magic, version, generation (bumped on every change)
    entries  64 of them, one per process that serves online requests: its pid, and per upstream (its name hashed
             into 64 cells) the online requests it has in flight there

Only the process that owns an entry writes it, so no lock is needed for counting; a lock file is taken only to claim
an entry. `OnlineGate.hold(member)` (API side) counts one online request in flight on `member` for its whole
duration, a stream included. `BoardWatcher` (worker side) looks at the generation every `POLL_S` (`IDLE_POLL_S`
while it has no batch line) and hands each
member's limiter a *reservation* (upstreams/limiter.py: `Limiter.reserve`):

- `slots` (the default): batch lines get what online requests leave of the upstream's limit; when an online request
  arrives and every slot is taken, the youngest batch requests there are cut (their lines go back to the queue and
  are sent again, counting no retry: `Limiter.preempt`), so the online request finds a free engine slot at once.
- `pause`: no batch line is sent to an upstream while any online request is in flight on it (and for `hold_s`
  after the last one ends, so that a user's next request does not meet a batch that just resumed); the ones in
  flight are cut. For an engine whose slots share the same few CPU cores (llama.cpp on a CPU), where one batch
  request in flight slows an online one down as much as a queue would.
- `off`: batch lines ignore online traffic (the adaptive limit still sees its latency).

A process that died with requests counted is found out (its pid is gone) and its entry cleared. Only this machine's
processes meet here: workers on other machines see the online load only as latency (docs/api.md, online requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import struct
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

from batchyard.store.base import UpstreamLoad
from batchyard.upstreams.pool import Member

log = logging.getLogger("batchyard.online")

Mode = Literal["slots", "pause", "off"]

MAGIC = 0x4259_4F4E  # "BYON"
VERSION = 2
ENTRIES = 64
CELLS = 64
HEADER = struct.Struct("<III")  # magic, version, generation
# an entry: pid, then per cell: online requests in flight, batch demand (holding or waiting for a slot), batch in flight
ONLINE, DEMAND, FLIGHT = 1, 1 + CELLS, 1 + 2 * CELLS
ENTRY_INTS = 1 + 3 * CELLS
SIZE = HEADER.size + ENTRIES * ENTRY_INTS * 4
POLL_S = 0.005  # how often a worker looks at the board's generation while it has batch lines for an upstream
IDLE_POLL_S = 0.05  # and while it has none (a line that starts meanwhile may be cut at the next look)
LIVENESS_S = 1.0  # how often a worker checks that the processes counted are alive
PAUSE_RESERVE = 1 << 30  # a reservation no limit reaches: no batch line is sent


def cell(name: str) -> int:
    """The board cell of an upstream (by name: every process names its upstreams from the same settings)."""
    return zlib.crc32(name.encode()) % CELLS


def default_path(identity: str) -> Path:
    """The board of the deployment whose store is `identity` (a database URL), in shared memory."""
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    shm = Path("/dev/shm")
    folder = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return folder / f"batchyard-online-{os.getuid()}-{digest}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class Board:
    """The shared-memory board at `path` (created when missing, 0600). Each `Board` object writes its own entry
    (claimed on first write): an API and a worker thread of one process have one each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            with _locked(fd):
                # blocks allocated now: a write through the map to a hole on a full disk would be SIGBUS, not an
                # error (ENOSPC here is an OSError the callers contain)
                os.posix_fallocate(fd, 0, SIZE)
                self._map = mmap.mmap(fd, SIZE)
                magic, version, _ = HEADER.unpack_from(self._map, 0)
                if (magic, version) != (MAGIC, VERSION):  # a new board (or of another version): start clean
                    self._map[:SIZE] = bytes(SIZE)
                    HEADER.pack_into(self._map, 0, MAGIC, VERSION, 0)
        finally:
            os.close(fd)
        self._ints = memoryview(self._map).cast("i")  # native int32 view: [magic, version, gen, entries...]
        self._entry: int | None = None
        self._full_until = 0.0  # every entry was taken: not tried again before then

    def close(self) -> None:
        """Clear this object's entry and unmap."""
        if self._entry is not None:
            self._clear(self._entry)
            self._bump()
            self._entry = None
        self._ints.release()
        self._map.close()

    @staticmethod
    def _base(entry: int) -> int:
        return HEADER.size // 4 + entry * ENTRY_INTS

    def _clear(self, entry: int) -> None:
        base = self._base(entry)
        self._ints[base : base + ENTRY_INTS] = memoryview(bytes(ENTRY_INTS * 4)).cast("i")

    def generation(self) -> int:
        return self._ints[2]

    def _bump(self) -> None:
        self._ints[2] = (self._ints[2] + 1) & 0x7FFF_FFFF  # two writers may race: it changes either way

    def _own(self) -> int | None:
        """This object's entry base: claimed once, from a free entry or one whose process is gone. None while every
        entry is taken (tried again every 10 s): this process's load is then not on the board, and it goes on."""
        if self._entry is not None:
            return self._base(self._entry)
        if time.monotonic() < self._full_until:
            return None
        fd = os.open(self.path, os.O_RDWR)
        try:
            with _locked(fd):
                for entry in range(ENTRIES):
                    pid = self._ints[self._base(entry)]
                    if pid == 0 or (pid != os.getpid() and not _alive(pid)):
                        self._clear(entry)
                        self._ints[self._base(entry)] = os.getpid()
                        self._entry = entry
                        return self._base(entry)
        finally:
            os.close(fd)
        self._full_until = time.monotonic() + 10.0
        log.warning(
            "the online board %s is full (%d processes use it): this one is not counted", self.path, ENTRIES
        )
        return None

    def add(self, name: str, n: int) -> None:
        """Count `n` (1 or -1) online requests in flight on the upstream `name`, in this object's entry."""
        base = self._own()
        if base is None:
            return
        i = base + ONLINE + cell(name)
        self._ints[i] = max(0, self._ints[i] + n)
        self._bump()

    def publish(self, batch: dict[int, tuple[int, int]]) -> None:
        """This object's batch load per cell: (demand, in flight); bumps the generation when it changed."""
        base, ints, changed = self._own(), self._ints, False
        if base is None:
            return
        for c, (demand, flight) in batch.items():
            if ints[base + DEMAND + c] != demand or ints[base + FLIGHT + c] != flight:
                ints[base + DEMAND + c], ints[base + FLIGHT + c] = demand, flight
                changed = True
        if changed:
            self._bump()

    def rows(self, *, check_alive: bool = False) -> list[tuple[bool, memoryview]]:
        """(is this object's, its ints) of every entry in use; with `check_alive`, entries of processes that are
        gone are cleared first."""
        out = []
        ints = self._ints
        for entry in range(ENTRIES):
            base = self._base(entry)
            pid = ints[base]
            if pid == 0:
                continue
            if check_alive and pid != os.getpid() and not _alive(pid):
                self._clear(entry)
                continue
            out.append((entry == self._entry, ints[base : base + ENTRY_INTS]))
        return out

    def counts(self, *, check_alive: bool = False) -> list[int]:
        """Online requests in flight per cell, summed over the entries."""
        totals = [0] * CELLS
        for _, row in self.rows(check_alive=check_alive):
            for c in range(CELLS):
                if row[ONLINE + c]:
                    totals[c] += row[ONLINE + c]
        return totals


@contextlib.contextmanager
def _locked(fd: int) -> Iterator[None]:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield None
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


class OnlineGate:
    """What the front door wraps each online upstream call in: counts it on the board at `path` (opened on first
    use). Without a path (priority is off) it records nothing."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._board: Board | None = None

    def _open(self) -> Board | None:
        if self._board is None and self.path is not None:
            try:
                self._board = Board(self.path)
            except OSError as e:
                log.warning(
                    "online requests do not take priority: the board %s cannot be opened (%s)", self.path, e
                )
                self.path = None
        return self._board

    @contextlib.asynccontextmanager
    async def hold(self, member: Member) -> AsyncIterator[None]:
        """The online request to `member` is in flight for the block's duration."""
        board = self._open()
        if board is None:
            yield
            return
        board.add(member.name, 1)
        try:
            yield
        finally:
            board.add(member.name, -1)

    def close(self) -> None:
        if self._board is not None:
            self._board.close()
            self._board = None


def fair_level(demands: Sequence[int], capacity: float) -> float:
    """Max-min fair share: the level such that every demand below it is met in full and the rest get the level."""
    remaining, n = float(capacity), len(demands)
    for d in sorted(demands):
        level = remaining / n
        if d >= level:
            return level
        remaining -= d
        n -= 1
    return float("inf")  # every demand is met


def fair_room(mine: int, others: Sequence[tuple[int, int]], capacity: int) -> int:
    """What one holder of a limit may have in flight: its max-min fair part of `capacity` given the others'
    (demand, in flight), and never more than the others leave free of it."""
    level = fair_level([mine, *(d for d, _ in others)], capacity)
    fair = mine if level == float("inf") else max(1, int(level))
    return max(0, min(fair, capacity - sum(f for _, f in others)))


class BoardWatcher:
    """A worker's side of the board (see the module's doc): each member's limiter gets a reservation for the online
    requests in flight on its upstream, and a share of the limit with the other batch processes of this machine:
    its max-min fair part of the demand, and never more than the others leave free."""

    def __init__(
        self, board: Board, members: Sequence[Member], mode: Mode, hold_s: float = 0.1, *, share: bool = True
    ) -> None:
        """`share`: share each limit with the other processes (false when it is already this process's part)."""
        self.board, self.members, self.mode, self.hold_s = board, list(members), mode, hold_s
        self.share = share
        self._cells = [cell(m.name) for m in self.members]
        self._last_online = [0.0] * len(self.members)  # when each member last had an online request
        # what this machine may have in flight per member, from the other machines' load (MachineShares; None: all)
        self.machine_caps: list[int | None] = [None] * len(self.members)

    def publish(self) -> None:
        load: dict[int, tuple[int, int]] = {}
        for c, m in zip(self._cells, self.members, strict=True):
            demand, flight = load.get(c, (0, 0))
            load[c] = (demand + m.limiter.pending, flight + m.limiter.in_flight)
        self.board.publish(load)

    def apply(self, rows: Sequence[tuple[bool, Sequence[int]]], now: float) -> None:
        for i, member in enumerate(self.members):
            c, limiter = self._cells[i], member.limiter
            online = sum(row[ONLINE + c] for _, row in rows)
            if self.mode == "pause":
                if online:
                    self._last_online[i] = now
                paused = online > 0 or now - self._last_online[i] < self.hold_s
                reserve = PAUSE_RESERVE if paused else 0
            else:
                reserve = online
            limiter.reserve(reserve)
            if not self.share:
                continue
            machine_cap = self.machine_caps[i]
            others = [(row[DEMAND + c], row[FLIGHT + c]) for own, row in rows if not own and row[DEMAND + c]]
            if not others:
                limiter.share(machine_cap)
                continue
            capacity = max(0, limiter.limit - min(reserve, limiter.limit))
            if machine_cap is not None:
                capacity = min(capacity, machine_cap)
            limiter.share(fair_room(limiter.pending, others, capacity))

    async def run(self) -> None:
        """Follow the board until cancelled."""
        gen, checked = -1, 0.0
        pausing = False
        while True:
            now = time.monotonic()
            self.publish()
            current = self.board.generation()
            if current != gen or now - checked >= LIVENESS_S or pausing:
                check = now - checked >= LIVENESS_S
                if check:
                    checked = now
                gen = current
                self.apply(self.board.rows(check_alive=check), now)
                pausing = self.mode == "pause" and any(now - t < self.hold_s for t in self._last_online)
            busy = any(m.limiter.pending for m in self.members)
            await asyncio.sleep(POLL_S if busy else IDLE_POLL_S)


Exchange = Callable[[list[tuple[str, int, int]]], Awaitable[list[UpstreamLoad] | None]]


class MachineShares:
    """Shares each upstream's limit with the workers of other machines (through the store, every `interval`): this
    machine gets its max-min fair part of the demand of all machines, never more than the others leave free; the
    watcher divides it among this machine's processes. `exchange(loads)` records this process's (upstream, demand,
    in flight) and returns the other holders' live rows (None when the store cannot be reached: no cap then)."""

    def __init__(
        self, watcher: BoardWatcher, machine: str, exchange: Exchange, interval: float = 1.0
    ) -> None:
        self.watcher, self.machine, self.exchange, self.interval = watcher, machine, exchange, interval

    def caps(
        self, rows: Sequence[UpstreamLoad], board_rows: Sequence[tuple[bool, Sequence[int]]]
    ) -> list[int | None]:
        w = self.watcher
        out: list[int | None] = []
        for c, member in zip(w._cells, w.members, strict=True):
            machines: dict[str, tuple[int, int]] = {}  # other machine -> its (demand, in flight)
            for r in rows:
                if r.upstream == member.name and r.machine != self.machine:
                    demand, flight = machines.get(r.machine, (0, 0))
                    machines[r.machine] = (demand + r.demand, flight + r.in_flight)
            if not any(d for d, _ in machines.values()):
                out.append(None)
                continue
            limiter = member.limiter
            mine = sum(row[DEMAND + c] for _, row in board_rows)
            capacity = max(0, limiter.limit - min(limiter.reserved, limiter.limit))
            out.append(fair_room(mine, list(machines.values()), capacity))
        return out

    async def run(self) -> None:
        """Exchange every `interval` while this process has batch lines, at once when they start; nothing while it
        has none (its rows expire: it wants nothing)."""
        w = self.watcher
        last = float("-inf")
        while True:
            loads = [(m.name, m.limiter.pending, m.limiter.in_flight) for m in w.members]
            now = time.monotonic()
            if any(demand for _, demand, _ in loads) and now - last >= self.interval:
                last = now
                rows = await self.exchange(loads)
                w.machine_caps = [None] * len(w.members) if rows is None else self.caps(rows, w.board.rows())
            elif now - last >= self.interval:
                last = float("-inf")  # idle: the next line that starts exchanges at once
            await asyncio.sleep(IDLE_POLL_S)
