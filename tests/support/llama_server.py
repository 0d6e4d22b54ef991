"""llama.cpp's own HTTP server (`xllamacpp.Server`, the binding the embedded engine uses) in a child process on
loopback: the real engine for the tests and benches that need one (SmolLM2-135M from its PyPI wheel, on the CPU)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support.processes import free_port

SLOTS = 4
_SCRIPT = """
import sys, time, xllamacpp
model, port, cache, slots, threads = sys.argv[1:6]
p = xllamacpp.CommonParams()
p.model.path = model
p.n_parallel = int(slots)
p.n_ctx = int(slots) * 2048
if cache == "off":
    p.cache_ram_mib = 0
if threads != "auto":
    p.cpuparams.n_threads = int(threads)
    p.cpuparams_batch.n_threads = int(threads)
p.hostnames = ["127.0.0.1"]
p.port = int(port)
p.verbosity = 0
server = xllamacpp.Server(p)
print("ready", flush=True)
time.sleep(1e9)
"""


class LlamaServer:
    """`cache`: its RAM prompt cache "on" (llama.cpp's default) or "off" (`cache_ram_mib` 0); `threads` None:
    llama.cpp's own default."""

    def __init__(
        self, model: Path, cache: str = "on", *, slots: int = SLOTS, threads: int | None = 2
    ) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _SCRIPT,
                str(model),
                str(self.port),
                cache,
                str(slots),
                str(threads or "auto"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the engine did not start")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.root}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the engine is not healthy")

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    def busy_slots(self) -> int:
        """Slots working on a request now (`GET /slots`, `is_processing`)."""
        return sum(1 for s in httpx.get(f"{self.root}/slots", timeout=10).json() if s.get("is_processing"))

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
