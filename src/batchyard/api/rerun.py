"""The input file of a retry batch (`POST /v1/batches/{id}/retry`): the original input lines whose custom_id failed,
picked by `domain/rerun.py`, written server-side as a new `batch` file (streamed; only the picked ids are held)."""

from __future__ import annotations

from batchyard import ids
from batchyard.api.results import split_lines
from batchyard.blobs.base import BlobStore
from batchyard.domain import limits
from batchyard.domain.models import BatchRecord, FileRecord
from batchyard.domain.rerun import BOM, custom_id_of, picked


async def failed_ids(blobs: BlobStore, error_file: FileRecord, codes: frozenset[str] | None) -> set[str]:
    chosen: set[str] = set()
    async for raw in split_lines(blobs.stream(error_file.blob_key)):
        cid = picked(raw, codes)
        if cid is not None:
            chosen.add(cid)
    return chosen


async def write_input(
    blobs: BlobStore, batch: BatchRecord, input_file: FileRecord, wanted: set[str], created_at: int
) -> FileRecord | None:
    """The new input file (None when none of `wanted` is in the input any more)."""
    fid = ids.file_id()
    writer = await blobs.open_writer(f"files/{fid}")
    try:
        n = 0
        async for raw in split_lines(blobs.stream(input_file.blob_key)):
            if custom_id_of(raw) in wanted:
                await writer.write(raw.removeprefix(BOM))
                n += 1
        if n == 0:
            await writer.abort()
            return None
        info = await writer.commit()
    except BaseException:
        await writer.abort()
        raise
    return FileRecord(
        id=fid,
        owner=batch.owner,
        bytes=info.size,
        created_at=created_at,
        expires_at=created_at + limits.BATCH_FILE_DEFAULT_EXPIRY,
        filename=f"{batch.id}_retry.jsonl",
        purpose="batch",
        blob_key=info.key,
        sha256=info.sha256,
    )
