"""The blob store named by the settings."""

from __future__ import annotations

from batchyard.blobs.base import BlobStore
from batchyard.blobs.local import LocalBlobStore
from batchyard.config import Settings


def open_blobs(settings: Settings) -> BlobStore:
    """The blob store named by --storage-url (a local directory in the data dir by default)."""
    url = settings.storage_url
    if not url:
        return LocalBlobStore(settings.blob_root)
    if url.startswith("file://"):
        return LocalBlobStore(url.removeprefix("file://") or settings.blob_root)
    if url.startswith("s3://"):
        from batchyard.blobs.s3 import S3BlobStore

        return S3BlobStore.from_url(url)
    raise ValueError(f"unsupported --storage-url {url!r}: use file:///PATH or s3://BUCKET/PREFIX")
