"""The progress bar shows its unit: bytes in MB and MB/s, other units as counts."""

from __future__ import annotations

import io

from batchyard.cli.progress import ProgressBar


def test_bytes_are_shown_in_megabytes() -> None:
    out = io.StringIO()  # not a TTY: plain lines
    bar = ProgressBar(98_000_000, "download", stream=out, unit="bytes")
    bar.update(0)
    bar.update(98_000_000)
    line = out.getvalue().splitlines()[-1]
    assert "98.0/98.0 MB (100.0%)" in line
    assert "MB/s" in line
    assert "lines" not in line


def test_lines_are_counted() -> None:
    out = io.StringIO()
    bar = ProgressBar(40, "batch", stream=out)
    bar.update(0)
    bar.update(40, failed=2, status="completed")
    line = out.getvalue().splitlines()[-1]
    assert "40/40 lines (100.0%)  failed 2" in line
    assert "lines/s" in line and line.endswith("completed")
    assert "MB" not in line
