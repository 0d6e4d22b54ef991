"""A dependency-free progress bar for the terminal (stderr); plain periodic lines when stderr is not a TTY.

Counts are in `unit`: "bytes" are shown in MB (and MB/s), any other unit as a plain count ("lines/s").
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    def __init__(
        self, total: int, label: str = "", stream: TextIO | None = None, width: int = 30, unit: str = "lines"
    ) -> None:
        self.total = max(total, 0)
        self.unit = unit
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.start = time.monotonic()
        self._last_plain = 0.0
        self._tty = self.stream.isatty()
        self._first: int | None = None

    def update(self, done: int, failed: int = 0, status: str = "") -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        frac = min(1.0, done / self.total) if self.total else 0.0
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        if self._first is None:
            self._first = done  # resumed runs: the rate counts this run's lines only
        rate = (done - self._first) / elapsed
        text = (
            f"{self.label} [{bar}] {self._amount(done)}/{self._amount(self.total)} {self._unit} "
            f"({frac * 100:5.1f}%)  failed {failed}  {self._amount(rate, 7)} {self._unit}/s  {status}"
        )
        if self._tty:
            self.stream.write("\r" + text.ljust(110)[:160])
            self.stream.flush()
        elif time.monotonic() - self._last_plain >= 2.0 or done >= self.total:
            self._last_plain = time.monotonic()
            self.stream.write(text.rstrip() + "\n")
            self.stream.flush()

    @property
    def _unit(self) -> str:
        return "MB" if self.unit == "bytes" else self.unit

    def _amount(self, n: float, width: int = 0) -> str:
        if self.unit == "bytes":
            return f"{n / 1e6:{width}.1f}"
        return f"{n:{width}.1f}" if isinstance(n, float) else f"{n:{width}d}"

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()
