"""The blob store named by the settings."""

from __future__ import annotations

import importlib.util

from batchyard.blobs.base import BlobStore
from batchyard.blobs.local import LocalBlobStore
from batchyard.config import Settings


def check_storage_url(url: str | None) -> None:
    """Raise ValueError (one line, for the command line) for a --storage-url that cannot be opened here: an
    unknown scheme, or S3 without the [s3] extra's driver."""
    if not url or url.startswith("file://"):
        return
    if url.startswith("s3://"):
        if importlib.util.find_spec("aiobotocore") is None:
            raise ValueError(
                "--storage-url s3://... needs the [s3] extra (aiobotocore): pip install 'batchyard[s3]'"
            )
        return
    raise ValueError(f"unsupported --storage-url {url!r}: use file:///PATH or s3://BUCKET/PREFIX")


def open_blobs(settings: Settings) -> BlobStore:
    """The blob store named by --storage-url (a local directory in the data dir by default)."""
    url = settings.storage_url
    check_storage_url(url)
    if not url:
        return LocalBlobStore(settings.blob_root)
    if url.startswith("file://"):
        return LocalBlobStore(url.removeprefix("file://") or settings.blob_root)
    from batchyard.blobs.s3 import S3BlobStore

    return S3BlobStore.from_url(url)
