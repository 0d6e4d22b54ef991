"""Online requests (the front door: /v1/chat/completions and the like) take priority over batch lines.

Online requests are served by the API process, batch lines by worker processes (or a worker thread): each has its
own router and limiters. They meet on a *board*, a small shared-memory file of this machine (one per store: the
processes of one deployment on one machine find the same file):

    header   magic, version, generation (bumped on every change)
    entries  64 of them, one per process that serves online requests: its pid, and per upstream (its name hashed
             into 64 cells) the online requests it has in flight there

Only the process that owns an entry writes it, so no lock is needed for counting; a lock file is taken only to claim
an entry. `OnlineGate.hold(member)` (API side) counts one online request in flight on `member` for its whole
duration, a stream included. `BoardWatcher` (worker side) looks at the generation every `POLL_S` and hands each
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
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Literal

from batchyard.upstreams.pool import Member

log = logging.getLogger("batchyard.online")

Mode = Literal["slots", "pause", "off"]

MAGIC = 0x4259_4F4E  # "BYON"
VERSION = 1
ENTRIES = 64
CELLS = 64
HEADER = struct.Struct("<III")  # magic, version, generation
ENTRY_BYTES = 4 + 4 * CELLS  # pid, then one count per cell
SIZE = HEADER.size + ENTRIES * ENTRY_BYTES
POLL_S = 0.005  # how often a worker looks at the board's generation
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
    """The shared-memory board at `path` (created when missing, 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            with _locked(fd):
                if os.fstat(fd).st_size < SIZE:
                    os.ftruncate(fd, SIZE)
                self._map = mmap.mmap(fd, SIZE)
                magic, version, _ = HEADER.unpack_from(self._map, 0)
                if (magic, version) != (
                    MAGIC,
                    VERSION,
                ):  # a new board (or one of another version): start clean
                    self._map[:SIZE] = bytes(SIZE)
                    HEADER.pack_into(self._map, 0, MAGIC, VERSION, 0)
        finally:
            os.close(fd)
        self._ints = memoryview(self._map).cast("i")  # native int32 view: [magic, version, gen, entries...]
        self._entry: int | None = None

    def close(self) -> None:
        """Clear this process's entry and unmap."""
        if self._entry is not None:
            base = self._base(self._entry)
            for i in range(base, base + 1 + CELLS):
                self._ints[i] = 0
            self._bump()
            self._entry = None
        self._ints.release()
        self._map.close()

    @staticmethod
    def _base(entry: int) -> int:
        return HEADER.size // 4 + entry * (ENTRY_BYTES // 4)

    def generation(self) -> int:
        return self._ints[2]

    def _bump(self) -> None:
        self._ints[2] = (self._ints[2] + 1) & 0x7FFF_FFFF  # two writers may race: it changes either way

    def _claim(self) -> int:
        """This process's entry: a free one, or one whose process is gone."""
        if self._entry is not None and self._ints[self._base(self._entry)] == os.getpid():
            return self._entry
        fd = os.open(self.path, os.O_RDWR)
        try:
            with _locked(fd):
                for entry in range(ENTRIES):
                    base = self._base(entry)
                    pid = self._ints[base]
                    if pid == 0 or pid == os.getpid() or not _alive(pid):
                        for i in range(base + 1, base + 1 + CELLS):
                            self._ints[i] = 0
                        self._ints[base] = os.getpid()
                        self._entry = entry
                        return entry
        finally:
            os.close(fd)
        raise RuntimeError(f"the online board {self.path} has no free entry ({ENTRIES} processes use it)")

    def add(self, name: str, n: int) -> None:
        """Count `n` (1 or -1) online requests in flight on the upstream `name`, in this process's entry."""
        i = self._base(self._claim()) + 1 + cell(name)
        self._ints[i] = max(0, self._ints[i] + n)
        self._bump()

    def counts(self, *, check_alive: bool = False) -> list[int]:
        """Online requests in flight per cell, summed over the processes (with `check_alive`, entries of processes
        that are gone are cleared first)."""
        totals = [0] * CELLS
        ints = self._ints
        for entry in range(ENTRIES):
            base = self._base(entry)
            pid = ints[base]
            if pid == 0:
                continue
            if check_alive and pid != os.getpid() and not _alive(pid):
                for i in range(base, base + 1 + CELLS):
                    ints[i] = 0
                continue
            row = ints[base + 1 : base + 1 + CELLS]
            for c in range(CELLS):
                if row[c]:
                    totals[c] += row[c]
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


class BoardWatcher:
    """A worker's side: turns the board's online counts into each member's reservation (see the module's doc)."""

    def __init__(self, board: Board, members: Sequence[Member], mode: Mode, hold_s: float = 0.1) -> None:
        self.board, self.members, self.mode, self.hold_s = board, list(members), mode, hold_s
        self._cells = [cell(m.name) for m in self.members]
        self._last_online = [0.0] * len(self.members)  # when each member last had an online request

    def apply(self, counts: list[int], now: float) -> None:
        for i, member in enumerate(self.members):
            online = counts[self._cells[i]]
            if self.mode == "pause":
                if online:
                    self._last_online[i] = now
                paused = online > 0 or now - self._last_online[i] < self.hold_s
                reserve = PAUSE_RESERVE if paused else 0
            else:
                reserve = online
            member.limiter.reserve(reserve)

    async def run(self) -> None:
        """Follow the board until cancelled."""
        gen, checked = -1, 0.0
        pausing = False
        while True:
            now = time.monotonic()
            current = self.board.generation()
            if current != gen or now - checked >= LIVENESS_S or pausing:
                check = now - checked >= LIVENESS_S
                if check:
                    checked = now
                gen = current
                self.apply(self.board.counts(check_alive=check), now)
                pausing = self.mode == "pause" and any(
                    now - t < self.hold_s for t in self._last_online
                )  # the hold runs out without a change on the board
            await asyncio.sleep(POLL_S)
