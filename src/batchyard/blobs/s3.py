"""BlobStore on S3-compatible object storage (AWS S3, MinIO, SeaweedFS, Ceph, R2...), through aiobotocore.

A writer is a multipart upload: it buffers one part (8 MiB by default, never less than S3's 5 MiB floor), uploads
it, and completes the upload on `commit`, so nothing is visible under the key before then; `abort` (and a size cap
overrun, or any failure) aborts the multipart upload. A blob that ends below one part is sent as one PUT at commit.
`compose` copies server-side (UploadPartCopy) when S3 allows it — every source but the last at least 5 MiB — and
streams through a writer otherwise. Either way the sha256 is computed from the bytes: a server-side compose reads
the sources once to hash them, in parallel with the copy, but uploads nothing.

Every client error is turned into a BlobError in one place, `_mapped`: BlobNotFound for a missing key or upload,
BlobStorageFull for a server that says it is full (507, MinIO's XMinioStorageFull), BlobUnavailable when the server
cannot be reached or answers 5xx/SlowDown (connection refused, connect/read timeouts, a connection closed mid-body),
BlobError for anything else. Every call goes through it, including each read of a streamed body.

Timeouts and retries are bounded so that an outage fails a call in seconds, not minutes, and the worker's own
backoff (it pauses the shard on a BlobError) takes over: connect 5 s (a reachable S3 connects in milliseconds),
read 60 s (the longest silence a healthy server leaves: large UploadPartCopy/CompleteMultipartUpload calls), and 3
attempts (botocore's standard mode: 2 retries with jittered backoff of at most 1 s then 2 s). Unreachable: about
3 x 5 s + 3 s at worst (refused at once: ~3 s); a server that accepts and never answers: 3 x 60 s at worst.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from batchyard.blobs.base import BlobInfo, BlobStore, BlobWriter, SizeExceeded, check_key
from batchyard.errors import BlobError, BlobNotFound, BlobStorageFull, BlobUnavailable

__all__ = ["CHECKSUM_ALGORITHMS", "S3BlobStore", "SizeExceeded", "parse_checksums"]

MIN_PART = 5 * 1024 * 1024  # S3's floor for every part of a multipart upload but the last
MAX_PART = 5 * 1024**3
MAX_PARTS = 10_000
DEFAULT_PART = 8 * 1024 * 1024
CHECKSUM_ALGORITHMS = frozenset({"CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256"})
_NEEDS_CRT = frozenset({"CRC32C", "CRC64NVME"})  # botocore computes these only with awscrt (botocore[crt])
_NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchUpload"})
_FULL = frozenset({"XMinioStorageFull", "InsufficientStorage", "507"})
_UNAVAILABLE = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "Throttling",
        "XMinioServerNotInitialized",
    }
)
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0
MAX_ATTEMPTS = 3
LIST_PAGE = 1000  # keys per ListObjectsV2 page (S3's maximum)
_CONCURRENCY = 8
_T = TypeVar("_T")


def parse_checksums(value: str | None) -> bool | str:
    """BATCHYARD_S3_CHECKSUMS: unset/0/false/off → no checksums, 1/true/on → CRC32, or an algorithm name."""
    text = (value or "").strip()
    if text.lower() in ("", "0", "false", "no", "off", "none"):
        return False
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    return text.upper()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@contextmanager
def _mapped(key: str) -> Iterator[None]:
    """Turn a client failure into a BlobError (see the module docstring): the one place foreign exceptions are
    wrapped."""
    try:
        yield
    except ClientError as e:
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _NOT_FOUND:
            raise BlobNotFound(key) from e
        message = f"s3 {key}: {code or status}: {err.get('Message') or e}"
        if code in _FULL or status == 507:
            raise BlobStorageFull(message) from e
        if code in _UNAVAILABLE or (isinstance(status, int) and status >= 500):
            raise BlobUnavailable(message) from e
        raise BlobError(message) from e
    except (
        BotoConnectionError,
        HTTPClientError,
        aiohttp.ClientConnectionError,
        aiohttp.ClientPayloadError,
    ) as e:
        raise BlobUnavailable(f"s3 {key}: {e}") from e
    except OSError as e:  # sockets, and TimeoutError
        raise BlobUnavailable(f"s3 {key}: {e!r}") from e
    except (BotoCoreError, aiohttp.ClientError) as e:
        raise BlobError(f"s3 {key}: {e}") from e


async def _read_full(body: Any, size: int) -> bytes:
    """Up to `size` bytes of a response body: exactly `size` unless it ends first."""
    buf = bytearray()
    while len(buf) < size:
        piece = await body.read(size - len(buf))
        if not piece:
            break
        buf += piece
    return bytes(buf)


async def _bounded(coros: Sequence[Awaitable[_T]], limit: int = _CONCURRENCY) -> list[_T]:
    """Await coroutines with at most `limit` in flight; results in order; the first failure cancels the rest."""
    sem = asyncio.Semaphore(limit)

    async def one(c: Awaitable[_T]) -> _T:
        async with sem:
            return await c

    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(one(c)) for c in coros]
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None  # callers catch BlobNotFound, not a group of them
    return [t.result() for t in tasks]


def _completed_part(number: int, result: Mapping[str, Any]) -> dict[str, Any]:
    """The CompleteMultipartUpload entry for an UploadPart / UploadPartCopy result (ETag, and checksum if any)."""
    part = {"PartNumber": number, "ETag": result["ETag"]}
    part.update({k: v for k, v in result.items() if k.startswith("Checksum") and k != "ChecksumType"})
    return part


def copy_plan(sizes: Sequence[int]) -> list[tuple[int, tuple[int, int] | None]] | None:
    """Parts of a server-side compose: (source index, byte range or None for all of it), or None if S3 forbids it.

    Empty sources are skipped; every part but the last must be at least MIN_PART; a source over MAX_PART is cut
    into equal ranges (each then over 1 GiB).
    """
    kept = [(i, n) for i, n in enumerate(sizes) if n > 0]
    if not kept or any(n < MIN_PART for _, n in kept[:-1]):
        return None
    plan: list[tuple[int, tuple[int, int] | None]] = []
    for i, n in kept:
        if n <= MAX_PART:
            plan.append((i, None))
            continue
        pieces = -(-n // MAX_PART)
        step = -(-n // pieces)
        plan.extend((i, (start, min(start + step, n))) for start in range(0, n, step))
    return plan if len(plan) <= MAX_PARTS else None


class _S3Writer(BlobWriter):
    def __init__(self, store: S3BlobStore, key: str, max_bytes: int | None) -> None:
        super().__init__(key, max_bytes)
        self._store = store
        self._obj = store.object_key(key)
        self._buf: list[bytes] = []
        self._buffered = 0
        self._sha = hashlib.sha256()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    def _part_threshold(self) -> int:
        # Parts double in size every 2,000 parts, so 10,000 parts hold ~31x 2,000 base parts (~480 GiB at 8 MiB).
        return self._store.part_size << (len(self._parts) // 2000)

    async def write(self, data: bytes) -> None:
        if (error := self._admit(len(data))) is not None:
            await self._abort_noting(error)
            raise error
        self._size += len(data)
        self._sha.update(data)
        self._buf.append(data)
        self._buffered += len(data)
        if self._buffered >= self._part_threshold():
            await self._or_abort(self._upload_part())

    async def _or_abort(self, op: Awaitable[_T]) -> _T:
        try:
            return await op
        except BaseException as e:
            await self._abort_noting(e)
            raise

    async def _abort_noting(self, error: BaseException) -> None:
        """Abort after `error`; if that fails too, say so on `error` (which is what the caller will see)."""
        try:
            await self.abort()
        except BlobError as abort_error:
            error.add_note(f"aborting the upload of {self._key} also failed: {abort_error}")

    def _take(self) -> bytes:
        body = b"".join(self._buf)
        self._buf.clear()
        self._buffered = 0
        return body

    async def _upload_part(self) -> None:
        s3, bucket, extra = await self._store.client(), self._store.bucket, self._store.checksum_args()
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise BlobError(f"{self._key}: more than {MAX_PARTS} parts")
        with _mapped(self._key):
            if self._upload_id is None:
                created = await s3.create_multipart_upload(Bucket=bucket, Key=self._obj, **extra)
                self._upload_id = str(created["UploadId"])
            result = await s3.upload_part(
                Bucket=bucket,
                Key=self._obj,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=self._take(),
                **extra,
            )
        self._parts.append(_completed_part(number, result))

    async def _finish(self) -> None:
        s3, bucket = await self._store.client(), self._store.bucket
        if self._upload_id is None:
            with _mapped(self._key):
                await s3.put_object(
                    Bucket=bucket, Key=self._obj, Body=self._take(), **self._store.checksum_args()
                )
            return
        if self._buf:
            await self._upload_part()
        with _mapped(self._key):
            await s3.complete_multipart_upload(
                Bucket=bucket, Key=self._obj, UploadId=self._upload_id, MultipartUpload={"Parts": self._parts}
            )

    async def commit(self) -> BlobInfo:
        self._check_open()
        try:
            await self._or_abort(self._finish())
        except BlobNotFound as e:  # NoSuchUpload: the upload was aborted under us (or a retried complete)
            raise BlobError(f"s3 {self._key}: the multipart upload is gone: {e}") from e
        self._state = "committed"
        return BlobInfo(self._key, self._size, self._sha.hexdigest())

    async def abort(self) -> None:
        if self._state != "open":
            return  # committed (abort must not delete it) or already aborted
        self._state = "aborted"
        self._buf.clear()
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is None:
            return
        s3 = await self._store.client()
        try:
            with _mapped(self._key):
                await s3.abort_multipart_upload(Bucket=self._store.bucket, Key=self._obj, UploadId=upload_id)
        except BlobNotFound:
            pass  # NoSuchUpload: nothing left to abort


@dataclass
class _LoopClient:
    """The client of one event loop (aiohttp sessions belong to the loop that made them)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    client: Any = None
    stack: AsyncExitStack | None = None


class S3BlobStore(BlobStore):
    """Blobs under `s3://bucket/prefix/`.

    One store may serve several event loops (the API's and the worker thread's): each loop gets its own client,
    made on first use there. `aclose()` (or `async with`) closes the calling loop's client; call it on each loop
    before that loop ends.

    `checksums`: False (default) sends no checksum headers, which every S3-compatible server accepts; True sends
    CRC32 like boto3's default; a name from CHECKSUM_ALGORITHMS picks the algorithm. `allow_http` permits an
    http:// endpoint. `part_size` is the upload buffer (one part in memory per writer); `max_attempts` is how many
    times botocore tries a call (the first included) on throttling, 5xx and connection errors.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        checksums: bool | str = False,
        allow_http: bool = False,
        part_size: int = DEFAULT_PART,
        max_attempts: int = MAX_ATTEMPTS,
    ) -> None:
        if not bucket or set(bucket) & set("/:@?# "):
            raise ValueError(f"invalid bucket name {bucket!r}")
        if endpoint is not None and endpoint.lower().startswith("http://") and not allow_http:
            raise ValueError(f"endpoint {endpoint} is plain http: pass allow_http=True (AWS_ALLOW_HTTP=true)")
        if not MIN_PART <= part_size <= MAX_PART:
            raise ValueError(f"part_size must be between {MIN_PART} and {MAX_PART} bytes")
        algorithm = "CRC32" if checksums is True else (checksums.upper() if checksums else None)
        if algorithm is not None and algorithm not in CHECKSUM_ALGORITHMS:
            raise ValueError(
                f"unknown checksum algorithm {checksums!r}; one of {sorted(CHECKSUM_ALGORITHMS)}"
            )
        if algorithm in _NEEDS_CRT and importlib.util.find_spec("awscrt") is None:
            raise ValueError(f"checksum algorithm {algorithm} needs botocore[crt] installed")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = endpoint
        self.region = region
        self.checksum_algorithm = algorithm
        self.part_size = part_size
        self.max_attempts = max_attempts
        self._credentials = (access_key, secret_key, session_token)
        self._clients: dict[asyncio.AbstractEventLoop, _LoopClient] = {}
        self._clients_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, env: Mapping[str, str] | None = None) -> S3BlobStore:
        """`s3://bucket/optional/prefix`, configured from the standard AWS variables in `env` (os.environ).

        AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, AWS_REGION or AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID,
        AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ALLOW_HTTP, and BATCHYARD_S3_CHECKSUMS (see parse_checksums).
        """
        env = os.environ if env is None else env
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.hostname or parts.query or parts.fragment or "@" in parts.netloc:
            raise ValueError(f"not an s3://bucket/prefix URL: {url!r}")
        return cls(
            parts.netloc,
            parts.path.strip("/"),
            endpoint=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            access_key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            checksums=parse_checksums(env.get("BATCHYARD_S3_CHECKSUMS")),
            allow_http=_truthy(env.get("AWS_ALLOW_HTTP")),
        )

    def object_key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def checksum_args(self) -> dict[str, str]:
        return {"ChecksumAlgorithm": self.checksum_algorithm} if self.checksum_algorithm else {}

    def _slot(self) -> _LoopClient:
        loop = asyncio.get_running_loop()
        with self._clients_lock:
            slot = self._clients.get(loop)
            if slot is None:
                for dead in [lp for lp in self._clients if lp.is_closed()]:
                    del self._clients[dead]
                slot = self._clients[loop] = _LoopClient()
            return slot

    async def client(self) -> Any:
        """The aiobotocore S3 client of the running event loop, created on first use."""
        slot = self._slot()
        if slot.client is None:
            async with slot.lock:
                if slot.client is None:
                    slot.stack = AsyncExitStack()
                    slot.client = await self._open_client(slot.stack)
        return slot.client

    async def _open_client(self, stack: AsyncExitStack) -> Any:
        mode = "when_supported" if self.checksum_algorithm else "when_required"
        config = Config(
            s3={"addressing_style": "path" if self.endpoint else "auto"},
            request_checksum_calculation=mode,
            response_checksum_validation=mode,
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},  # the first call included
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
        )
        access_key, secret_key, token = self._credentials
        with _mapped(f"s3://{self.bucket}"):
            client = await stack.enter_async_context(
                get_session().create_client(
                    "s3",
                    endpoint_url=self.endpoint,
                    region_name=self.region,
                    aws_access_key_id=access_key,
                    aws_secret_access_key=secret_key,
                    aws_session_token=token,
                    config=config,
                )
            )
        return client

    async def aclose(self) -> None:
        """Close the running loop's client (a later call makes a new one)."""
        loop = asyncio.get_running_loop()
        with self._clients_lock:
            slot = self._clients.pop(loop, None)
        if slot is not None and slot.stack is not None:
            await slot.stack.aclose()

    async def __aenter__(self) -> S3BlobStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open_writer(self, key: str, *, max_bytes: int | None = None) -> BlobWriter:
        check_key(key)
        return _S3Writer(self, key, max_bytes)

    async def _head(self, key: str) -> tuple[int, str]:
        s3, obj = await self.client(), self.object_key(key)
        with _mapped(key):
            head = await s3.head_object(Bucket=self.bucket, Key=obj)
        return int(head["ContentLength"]), str(head["ETag"])

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        s3, obj = await self.client(), self.object_key(key)
        if start < 0 or end <= start:
            await self._head(key)  # still BlobNotFound for a missing blob
            return b""
        with _mapped(key):
            try:
                resp = await s3.get_object(Bucket=self.bucket, Key=obj, Range=f"bytes={start}-{end - 1}")
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") == "InvalidRange":
                    return b""  # start at or past the end, like reading past EOF
                raise
            body = resp["Body"]
            try:
                return bytes(await body.read())
            finally:
                body.close()  # plain close(): aiobotocore 2.x's `async with` yields the raw aiohttp response

    async def stream(self, key: str, *, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        async for chunk in self._stream(key, chunk_size=chunk_size):
            yield chunk

    async def _stream(
        self, key: str, *, chunk_size: int = 1 << 20, etag: str | None = None
    ) -> AsyncIterator[bytes]:
        s3, obj = await self.client(), self.object_key(key)
        match = {"IfMatch": etag} if etag else {}
        with _mapped(key):
            resp = await s3.get_object(Bucket=self.bucket, Key=obj, **match)
        body = resp["Body"]
        try:
            while True:
                with _mapped(key):
                    chunk = await _read_full(body, chunk_size)
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()

    async def compose(self, key: str, sources: Sequence[str]) -> BlobInfo:
        self.object_key(key)
        heads = await _bounded([self._head(src) for src in sources])
        plan = copy_plan([size for size, _ in heads])
        if plan is None:
            return await self.compose_streamed(key, sources)
        # The digest (read through the sources, pinned to their ETags) and the server-side copy run side by side.
        # If reading fails, the copy is not cancelled but awaited: cancelling it while CompleteMultipartUpload is
        # on the wire could leave the composed object behind; once it has ended, a completed copy is deleted.
        etags = [etag for _, etag in heads]
        hashing: asyncio.Task[str] = asyncio.ensure_future(self._sha256(sources, etags))
        copying: asyncio.Task[None] = asyncio.ensure_future(self._copy_parts(key, sources, heads, plan))
        try:
            await asyncio.wait((hashing, copying), return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            hashing.cancel()
            await asyncio.gather(hashing, copying, return_exceptions=True)
            raise
        if copying.done() and copying.exception() is not None:
            hashing.cancel()
            await asyncio.gather(hashing, return_exceptions=True)
            raise copying.exception()  # type: ignore[misc]
        if hashing.exception() is not None:
            copied = await asyncio.gather(copying, return_exceptions=True)
            if not isinstance(copied[0], BaseException):
                await self.delete(key)
            raise hashing.exception()  # type: ignore[misc]
        await copying
        return BlobInfo(key, sum(size for size, _ in heads), hashing.result())

    async def _sha256(self, sources: Sequence[str], etags: Sequence[str]) -> str:
        sha = hashlib.sha256()
        for src, etag in zip(sources, etags, strict=True):
            async for chunk in self._stream(src, etag=etag):
                sha.update(chunk)
        return sha.hexdigest()

    async def _copy_parts(
        self,
        key: str,
        sources: Sequence[str],
        heads: Sequence[tuple[int, str]],
        plan: Sequence[tuple[int, tuple[int, int] | None]],
    ) -> None:
        """UploadPartCopy each planned range into one multipart upload (the source's ETag must still match)."""
        s3, obj, extra = await self.client(), self.object_key(key), self.checksum_args()
        with _mapped(key):
            created = await s3.create_multipart_upload(Bucket=self.bucket, Key=obj, **extra)
        upload_id = str(created["UploadId"])

        async def copy(number: int, index: int, span: tuple[int, int] | None) -> dict[str, Any]:
            ranged = {"CopySourceRange": f"bytes={span[0]}-{span[1] - 1}"} if span else {}
            with _mapped(sources[index]):
                result = await s3.upload_part_copy(
                    Bucket=self.bucket,
                    Key=obj,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource={"Bucket": self.bucket, "Key": self.object_key(sources[index])},
                    CopySourceIfMatch=heads[index][1],
                    **ranged,
                )
            return _completed_part(number, result["CopyPartResult"])

        try:
            parts = await _bounded([copy(n, i, span) for n, (i, span) in enumerate(plan, 1)])
            with _mapped(key):
                await s3.complete_multipart_upload(
                    Bucket=self.bucket, Key=obj, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
        except BaseException as e:
            try:
                with _mapped(key):
                    await s3.abort_multipart_upload(Bucket=self.bucket, Key=obj, UploadId=upload_id)
            except BlobError as abort_error:
                e.add_note(f"aborting the compose of {key} also failed: {abort_error}")
            raise

    async def delete(self, key: str) -> None:
        s3, obj = await self.client(), self.object_key(key)
        with _mapped(key):
            await s3.delete_object(Bucket=self.bucket, Key=obj)

    async def exists(self, key: str) -> bool:
        try:
            await self._head(key)
        except BlobNotFound:
            return False
        return True

    # -- blob lifecycle (sweeper) ---------------------------------------------------------------------------
    async def list_keys(self, prefix: str) -> AsyncIterator[tuple[str, float]]:
        """ListObjectsV2 under the store's prefix + `prefix`, a page (1,000 keys) at a time."""
        s3, where = await self.client(), self.prefix + prefix
        token: dict[str, str] = {}
        while True:
            with _mapped(where):
                page = await s3.list_objects_v2(Bucket=self.bucket, Prefix=where, MaxKeys=LIST_PAGE, **token)
            for obj in page.get("Contents", []) or []:
                yield str(obj["Key"]).removeprefix(self.prefix), obj["LastModified"].timestamp()
            if not page.get("IsTruncated") or not page.get("NextContinuationToken"):
                return
            token = {"ContinuationToken": str(page["NextContinuationToken"])}

    async def _pending_uploads(self) -> AsyncIterator[tuple[str, str, float]]:
        """(object key, upload id, initiated) of every multipart upload begun under the prefix and not ended."""
        s3 = await self.client()
        markers: dict[str, str] = {}
        while True:
            with _mapped(self.prefix):
                page = await s3.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix, **markers)
            for up in page.get("Uploads", []) or []:
                yield str(up["Key"]), str(up["UploadId"]), up["Initiated"].timestamp()
            if not page.get("IsTruncated"):
                return
            markers = {
                "KeyMarker": str(page["NextKeyMarker"]),
                "UploadIdMarker": str(page["NextUploadIdMarker"]),
            }

    async def _last_part_at(self, obj: str, upload_id: str) -> float | None:
        s3 = await self.client()
        with _mapped(obj):
            parts = await s3.list_parts(Bucket=self.bucket, Key=obj, UploadId=upload_id, MaxParts=1000)
        times = [p["LastModified"].timestamp() for p in parts.get("Parts", []) or []]
        return max(times, default=None)

    async def remove_abandoned_writes(self, before: float) -> int:
        """Abort multipart uploads begun before `before` whose last part (if any) is older too: a writer that is
        still uploading a long blob sends a part every few MiB, so it is never taken for an abandoned one."""
        s3, removed = await self.client(), 0
        stale = [(obj, uid) async for obj, uid, began in self._pending_uploads() if began < before]
        for obj, upload_id in stale:
            last = await self._last_part_at(obj, upload_id)
            if last is not None and last >= before:
                continue
            try:
                with _mapped(obj):
                    await s3.abort_multipart_upload(Bucket=self.bucket, Key=obj, UploadId=upload_id)
            except BlobNotFound:
                continue  # completed or aborted meanwhile
            removed += 1
        return removed
