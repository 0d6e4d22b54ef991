"""The attacks of bench/http_edge.py against other ASGI servers, each serving a minimal /health app with its own
limit settings: how hypercorn and granian would have done as batchyard's HTTP edge.

    pip install hypercorn granian   # not batchyard dependencies: only this benchmark needs them
    python bench/http_edge_servers.py [--servers hypercorn,granian] [--only big-header,many-headers,...]

Each server runs in its own process on a free loopback port; the same probes as bench/http_edge.py print RSS
growth, the attack's outcome and fresh-connection /health latency (compare with `python bench/http_edge.py`).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_edge import big_header, flood, idle, many_headers, report, slowloris

APP = """
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif m["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"status":"ok"}'})
"""

# Each server with the limits it offers that come closest to batchyard's edge (64 KiB head, 10 s head timeout,
# 5 s keep-alive, a connection bound of 1000).
COMMANDS = {
    "hypercorn": lambda port: [
        sys.executable, "-m", "hypercorn", "edge_app:app", "--bind", f"127.0.0.1:{port}",
        "--keep-alive", "5", "--read-timeout", "10", "--backlog", "1000",
    ],
    "granian": lambda port: [
        sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port),
        "--http", "1", "--workers", "1", "--http1-buffer-size", "65536",
        "--http1-header-read-timeout", "10000", "--backpressure", "1000", "edge_app:app",
    ],
}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def server_pid(proc: subprocess.Popen[bytes]) -> int:
    """The process that holds the connections (granian serves from a child of its main process)."""
    time.sleep(1.0)
    kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return int(kids[0]) if kids else proc.pid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--servers", default="hypercorn,granian")
    ap.add_argument("--only", default="")
    ap.add_argument("--big-mib", type=int, default=128)
    ap.add_argument("--flood", type=int, default=2000)
    args = ap.parse_args()
    attacks = {
        "big-header": lambda p: big_header(p, args.big_mib),
        "many-headers": many_headers,
        "slowloris": slowloris,
        "idle": idle,
        "flood": lambda p: flood(p, args.flood),
    }
    chosen = args.only.split(",") if args.only else list(attacks)
    with tempfile.TemporaryDirectory() as work:
        Path(work, "edge_app.py").write_text(APP)
        for name in args.servers.split(","):
            port = free_port()
            env = {**os.environ, "PYTHONPATH": work}
            proc = subprocess.Popen(
                COMMANDS[name](port), cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                wait_ready(port, proc)
                pid = server_pid(proc)
                print(f"-- {name}")
                for attack in chosen:
                    report(attack, pid, port, lambda a=attack, p=port: attacks[a](p))
            finally:
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    main()
