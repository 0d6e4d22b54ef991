"""batchyard's exception hierarchy.

    BatchyardError
    ├── APIError               an OpenAI-shaped error answered to a client (status, message, type, param, code)
    │   ├── InvalidRequest     400 invalid_request_error
    │   ├── Unauthorized       401
    │   ├── PermissionDenied   403 (the admin API without an admin key)
    │   ├── NotFound           404
    │   ├── Conflict           409
    │   ├── PayloadTooLarge    413
    │   ├── TooManyRequests    429 insufficient_quota (a per-key cap: stored bytes, files, uploads, batches)
    │   ├── RateLimited        429 rate_limit_exceeded, with Retry-After (creates per minute)
    │   ├── BadGateway         502 (an online request's upstream gave no usable answer)
    │   ├── GatewayTimeout     504 (an online request's upstream did not answer in time)
    │   ├── StorageUnavailable 503 (a store or blob store failed while answering a request)
    │   └── InsufficientStorage 507 (the blob storage is full)
    ├── StoreError             a metadata store failure (driver errors are wrapped once, at the store's edge)
    └── BlobError              a blob store failure (missing key, I/O error)
        ├── BlobNotFound       no blob under that key
        ├── BlobStorageFull    the storage is full (ENOSPC, EDQUOT, or the S3 equivalent)
        └── BlobUnavailable    the storage cannot be reached (connection refused, timeouts, S3 5xx / SlowDown)

Domain code raises these; only the API layer turns them into HTTP responses.
"""

from __future__ import annotations


class BatchyardError(Exception):
    """Base of every error batchyard raises on purpose."""


class APIError(BatchyardError):
    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class Unauthorized(APIError):
    status_code = 401
    error_type = "invalid_request_error"


class PermissionDenied(APIError):
    status_code = 403
    error_type = "invalid_request_error"


class NotFound(APIError):
    status_code = 404
    error_type = "invalid_request_error"


class Conflict(APIError):
    status_code = 409
    error_type = "invalid_request_error"


class PayloadTooLarge(APIError):
    status_code = 413
    error_type = "invalid_request_error"


class TooManyRequests(APIError):
    """A per-key cap is reached. OpenAI answers quota exhaustion with 429 and type/code `insufficient_quota`
    (rate limits use type `requests`/`tokens` and code `rate_limit_exceeded`); a cap on what a key holds is a quota.
    """

    status_code = 429
    error_type = "insufficient_quota"


class RateLimited(APIError):
    """Too many requests in a window: OpenAI's 429 with type `requests` and code `rate_limit_exceeded`; retried
    after `retry_after` seconds (the Retry-After header)."""

    status_code = 429
    error_type = "requests"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, code="rate_limit_exceeded")
        self.retry_after = retry_after


class BadGateway(APIError):
    status_code = 502
    error_type = "server_error"


class GatewayTimeout(APIError):
    status_code = 504
    error_type = "server_error"


class StorageUnavailable(APIError):
    status_code = 503
    error_type = "server_error"


class InsufficientStorage(APIError):
    status_code = 507
    error_type = "server_error"


class StoreError(BatchyardError):
    """The metadata store failed."""


class BlobError(BatchyardError):
    """The blob store failed."""


class BlobNotFound(BlobError):
    """No blob under that key."""


class BlobStorageFull(BlobError):
    """The blob storage is full; `errno` is the OS error number when there is one (ENOSPC, EDQUOT)."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class BlobUnavailable(BlobError):
    """The blob storage cannot be reached or answers a server error (connection refused, timeouts, S3 5xx)."""
