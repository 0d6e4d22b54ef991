"""What the P6 stand-in's phases share: its processes (each in its own process group), the overall time budget,
the phase errors, waiting for a server."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

CB_OPTIONS = ("cb_block_size", "cb_num_blocks", "cb_max_batch_tokens", "cb_max_memory_percent")


def cb_flags(a: argparse.Namespace) -> list[str]:
    """The continuous batching settings given, as flags: `transformers serve` and tf_side.py take the same."""
    out = []
    for opt in CB_OPTIONS:
        if getattr(a, opt) is not None:
            out += ["--" + opt.replace("_", "-"), str(getattr(a, opt))]
    return out


class PhaseError(RuntimeError):
    pass


class Procs:
    """Every process the bench starts, each in its own process group, stopped together at the end."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log, "ab") as fh:
            fh.write(("$ " + " ".join(cmd) + "\n").encode())
            fh.flush()
            p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.running.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # stragglers left in its group
            os.killpg(p.pid, signal.SIGKILL)
        if p in self.running:
            self.running.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self.running)):
            self.stop(p, grace=5.0)


class Budget:
    def __init__(self, total: float) -> None:
        self.total = total
        self.t0 = time.monotonic()

    def left(self) -> float:
        return self.total - (time.monotonic() - self.t0)

    def limit(self, phase_s: float, name: str) -> float:
        left = self.left()
        if left < 5:
            raise PhaseError(f"{name}: skipped, the overall budget is spent")
        return min(phase_s, left)


def brief(e: Exception) -> str:
    """An error's first line and the last line of the log it carries: what the summary keeps."""
    lines = [x for x in str(e).splitlines() if x.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1].strip()[:300]}"


def tail(path: Path, n: int = 2500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def run_phase(procs: Procs, name: str, cmd: list[str], log: Path, limit: float) -> float:
    """Run `cmd` to its end within `limit` seconds; its wall time."""
    t0 = time.perf_counter()
    p = procs.start(cmd, log)
    try:
        rc = p.wait(limit)
    except subprocess.TimeoutExpired:
        procs.stop(p)
        raise PhaseError(f"{name}: still running after {limit:.0f}s (limit); log:\n{tail(log)}") from None
    procs.stop(p)
    if rc != 0:
        raise PhaseError(f"{name}: exit status {rc}; log:\n{tail(log)}")
    return time.perf_counter() - t0


def wait_http(url: str, limit: float, proc: subprocess.Popen[bytes], log: Path, name: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if proc.poll() is not None:
            raise PhaseError(f"{name}: exited with {proc.returncode} before answering; log:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.25)
    raise PhaseError(f"{name}: {url} not answering 200 after {limit:.0f}s; log:\n{tail(log)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
