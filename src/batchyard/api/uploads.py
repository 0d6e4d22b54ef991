"""/v1/uploads: a file sent in parts (create, add parts, complete, cancel), as OpenAI's Uploads API.

An upload is created with the file's final size; parts of at most 64 MiB are streamed into blobs of their own
(`uploads/<upload id>/<part id>`); completing it with the ordered part ids composes those blobs into one file blob
(server-side where the blob store can) and inserts the file, in the same transaction that marks the upload
completed. The upload expires an hour after its creation. The client's filename is kept as data only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from fastapi import APIRouter, Request

from batchyard import ids
from batchyard.api.deps import bounded_str, expires_after, json_body, receiving, shown
from batchyard.api.idempotency import REPLAYED, Idempotency, key_of
from batchyard.api.multipart import PartTooLarge, parse_upload
from batchyard.api.quotas import Quotas
from batchyard.api.responses import JSONResponse
from batchyard.api.services import Services
from batchyard.domain import limits
from batchyard.domain.idempotency import fingerprint
from batchyard.domain.models import FileRecord, UploadPartRecord, UploadRecord
from batchyard.errors import Conflict, InvalidRequest, NotFound

OwnerOf = Callable[[Request], str]

UPLOAD_TTL = 3600  # an upload expires an hour after it is created (OpenAI's rule)
MAX_PART_BYTES = 64 * 1024 * 1024
MAX_PARTS = 10_000


def _not_pending(upload_id: str, doing: str, why: str) -> Conflict:
    return Conflict(
        f"Cannot {doing} upload '{upload_id}': {why}.", param="upload_id", code="invalid_upload_status"
    )


def router(svc: Services, owner_of: OwnerOf) -> APIRouter:
    r = APIRouter()
    settings = svc.settings
    quotas = Quotas(svc.store, settings, svc.rates, svc.holds)
    idem = Idempotency(svc.store)

    async def upload_exists(upload_id: str) -> bool:
        return await svc.store.get_upload(None, upload_id) is not None

    async def pending(request: Request, upload_id: str, doing: str) -> tuple[UploadRecord, float]:
        owner = owner_of(request)
        upload = await svc.store.get_upload(owner, upload_id) if ids.has_shape("upload", upload_id) else None
        if upload is None:
            raise NotFound(
                f"No upload found with id '{shown(upload_id)}'.", param="upload_id", code="not_found"
            )
        now = await svc.store.now()
        status = upload.status_at(now)
        if status != "pending":
            raise _not_pending(upload_id, doing, f"its status is '{status}'")
        return upload, now

    @r.post("/v1/uploads")
    async def create(request: Request) -> JSONResponse:
        owner = owner_of(request)
        key = key_of(request)
        body = await json_body(request)
        filename = limits.clean_filename(
            bounded_str(body, "filename", limits.MAX_FILENAME_CHARS, controls=True)
        )
        purpose = bounded_str(body, "purpose", limits.MAX_PURPOSE_CHARS)
        if purpose not in limits.FILE_PURPOSES:
            raise InvalidRequest(
                f"Invalid value for 'purpose': {purpose!r}.", param="purpose", code="invalid_value"
            )
        mime_type = bounded_str(body, "mime_type", limits.MAX_MIME_TYPE_CHARS)
        size = body.get("bytes")
        if size is None:
            raise InvalidRequest(
                "Missing required parameter: 'bytes'.", param="bytes", code="missing_required_parameter"
            )
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidRequest(
                "Invalid value for 'bytes': expected a non-negative integer.",
                param="bytes",
                code="invalid_type",
            )
        cap = settings.max_batch_file_bytes if purpose == "batch" else settings.max_file_bytes
        if size > cap:
            raise InvalidRequest(
                f"The file is too large: the limit for purpose {purpose!r} is {cap} bytes.",
                param="bytes",
                code="file_too_large",
            )
        file_ttl = expires_after(body.get("expires_after"), "expires_after")
        upload_id = ids.upload_id()
        if key is not None:
            earlier = await idem.claim(owner, key, "uploads", fingerprint(body), upload_id, upload_exists)
            if earlier is not None:
                held = await svc.store.get_upload(owner, earlier)
                assert held is not None  # uploads are never removed
                return JSONResponse(held.to_wire(await svc.store.now()), headers=REPLAYED)
        with quotas.holding(owner) as hold:
            async with idem.guard(owner, key, upload_id):
                await quotas.room_for_upload(hold, size)
                if file_ttl is None and purpose == "batch":
                    file_ttl = limits.BATCH_FILE_DEFAULT_EXPIRY
                now = int(await svc.store.now())
                upload = UploadRecord(
                    id=upload_id,
                    owner=owner,
                    filename=filename,
                    purpose=purpose,
                    bytes=size,
                    mime_type=mime_type,
                    created_at=now,
                    expires_at=now + UPLOAD_TTL,
                    file_expires_after=file_ttl,
                )
                await svc.store.insert_upload(upload)
        return JSONResponse(upload.to_wire(now))

    @r.post("/v1/uploads/{upload_id}/parts")
    async def add_part(request: Request, upload_id: str) -> JSONResponse:
        upload, now = await pending(request, upload_id, "add a part to")
        parts = await svc.store.get_upload_parts(upload.id)
        if len(parts) >= MAX_PARTS:
            raise InvalidRequest(
                f"Upload '{upload.id}' already has {MAX_PARTS} parts, the most it can have.",
                param="data",
                code="too_many_parts",
            )
        # A part never takes the upload past the size it was created for: its stream is capped at what is left.
        room = max(0, upload.bytes - sum(p.bytes for p in parts))
        cap = min(MAX_PART_BYTES, room)
        pid = ids.part_id()
        key = f"uploads/{upload.id}/{pid}"
        async with receiving(
            svc.blobs, key, field="data", cap=MAX_PART_BYTES, too_large_code="part_too_large", what="part"
        ) as sink:
            try:
                await parse_upload(
                    request.headers.get("content-type"),
                    request.stream(),
                    sink.open,
                    file_field="data",
                    max_file_bytes=cap,
                )
            except PartTooLarge:
                if cap == MAX_PART_BYTES:
                    raise
                raise InvalidRequest(
                    f"The part would take upload '{upload.id}' past the {upload.bytes} bytes it was created for "
                    f"({upload.bytes - room} bytes are in its parts already, {room} are left).",
                    param="data",
                    code="upload_size_exceeded",
                ) from None
            if sink.writer is None:
                raise InvalidRequest(
                    "Missing required parameter: 'data'.", param="data", code="missing_required_parameter"
                )
            info = await sink.writer.commit()
        part = UploadPartRecord(pid, upload.id, info.size, info.key, int(now))
        await svc.store.insert_upload_part(part)
        return JSONResponse(part.to_wire())

    @r.post("/v1/uploads/{upload_id}/complete")
    async def complete(request: Request, upload_id: str) -> JSONResponse:
        owner = owner_of(request)
        body = await json_body(request)
        upload, now = await pending(request, upload_id, "complete")
        with quotas.holding(owner) as hold:  # the file, until it is stored
            await quotas.room_for_file(hold, upload.bytes)
            part_ids = body.get("part_ids")
            if part_ids is None:
                raise InvalidRequest(
                    "Missing required parameter: 'part_ids'.",
                    param="part_ids",
                    code="missing_required_parameter",
                )
            if not isinstance(part_ids, list) or not all(isinstance(p, str) for p in part_ids):
                raise InvalidRequest(
                    "'part_ids' must be a list of part ids.", param="part_ids", code="invalid_type"
                )
            if len(set(part_ids)) != len(part_ids) or len(part_ids) > MAX_PARTS:
                raise InvalidRequest(
                    f"'part_ids' must list distinct parts (at most {MAX_PARTS}).",
                    param="part_ids",
                    code="invalid_value",
                )
            md5 = body.get("md5")
            if md5 is not None and not isinstance(md5, str):
                raise InvalidRequest("'md5' must be a string.", param="md5", code="invalid_type")
            parts = {p.id: p for p in await svc.store.get_upload_parts(upload.id)}
            unknown = [p for p in part_ids if p not in parts]
            if unknown:
                raise InvalidRequest(
                    f"Part '{shown(unknown[0])}' does not belong to upload '{upload.id}'.",
                    param="part_ids",
                    code="invalid_value",
                )
            chosen = [parts[p] for p in part_ids]
            total = sum(p.bytes for p in chosen)
            if total != upload.bytes:
                raise InvalidRequest(
                    f"The parts hold {total} bytes, but the upload was created for {upload.bytes} bytes.",
                    param="part_ids",
                    code="invalid_value",
                )
            sources = [p.blob_key for p in chosen]
            if md5:
                digest = hashlib.md5(usedforsecurity=False)
                for key in sources:
                    async for chunk in svc.blobs.stream(key):
                        digest.update(chunk)
                if digest.hexdigest() != md5.lower():
                    raise InvalidRequest(
                        "The md5 checksum does not match the uploaded bytes.",
                        param="md5",
                        code="invalid_value",
                    )
            fid = ids.file_id()
            file_key = f"files/{fid}"
            if sources:
                info = await svc.blobs.compose(file_key, sources)
            else:  # an empty file: no part at all
                writer = await svc.blobs.open_writer(file_key)
                info = await writer.commit()
            created = int(now)
            file = FileRecord(
                id=fid,
                owner=owner,
                bytes=info.size,
                created_at=created,
                expires_at=None if upload.file_expires_after is None else created + upload.file_expires_after,
                filename=upload.filename,
                purpose=upload.purpose,
                blob_key=info.key,
                sha256=info.sha256,
            )
            if not await svc.store.finish_upload(owner, upload.id, "completed", file):
                await svc.blobs.delete(file_key)  # another request completed or cancelled it meanwhile
                raise _not_pending(upload.id, "complete", "it is no longer pending")
            await svc.blobs.delete_quietly(p.blob_key for p in parts.values())  # composed: no longer needed
        upload.status, upload.file_id = "completed", fid
        return JSONResponse(upload.to_wire(now, file))

    @r.post("/v1/uploads/{upload_id}/cancel")
    async def cancel(request: Request, upload_id: str) -> JSONResponse:
        owner = owner_of(request)
        upload, now = await pending(request, upload_id, "cancel")
        if not await svc.store.finish_upload(owner, upload.id, "cancelled", None):
            raise _not_pending(upload.id, "cancel", "it is no longer pending")
        await svc.blobs.delete_quietly(p.blob_key for p in await svc.store.get_upload_parts(upload.id))
        upload.status = "cancelled"
        return JSONResponse(upload.to_wire(now))

    return r
