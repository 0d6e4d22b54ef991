"""Streaming multipart/form-data parser for ``POST /v1/files``.

The uploaded file is never held in memory as a whole nor spooled to a temporary
file: its bytes are handed to a caller-provided :class:`FileSink` as they arrive
from the request body, in batches of a few hundred KiB.  Plain text fields are
small (capped by ``max_field_bytes``) and are collected into a dict.

The byte-level parsing is done by python-multipart's low-level
:class:`python_multipart.multipart.MultipartParser`, which is driven through its
synchronous callbacks.  The callbacks never await: they only record slices and
state; all I/O (opening the sink, writing to it) happens in :func:`parse_upload`
after each ``parser.write(chunk)`` call has returned.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote_to_bytes

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

__all__ = [
    "FileSink",
    "MultipartError",
    "ParsedForm",
    "PartTooLarge",
    "parse_upload",
]

#: Pending file bytes are handed to the sink once at least this much has accumulated
#: (and always at the end of the file part).
FLUSH_BYTES = 256 * 1024
#: Upper bound on the size of a single ``FileSink.write`` call (a body delivered in
#: one huge chunk is split up rather than copied into one huge ``bytes``).
MAX_WRITE_BYTES = 1024 * 1024
#: Longest filename returned; longer client filenames are truncated.
MAX_FILENAME_CHARS = 1024
#: Cap on the total size of one part's header block (name + value bytes).  Recent
#: python-multipart releases enforce their own, tighter, per-line limits; this one
#: bounds our own buffering regardless of the installed version.
MAX_PART_HEADER_BYTES = 16 * 1024
#: Cap on the number of headers of one part (same rationale as above).
MAX_PART_HEADERS = 16
#: Longest accepted boundary (RFC 2046 allows 70; be a little lenient).
MAX_BOUNDARY_CHARS = 200

_EXPECTED_CT = "Expected multipart/form-data with a boundary in the Content-Type header"


class MultipartError(Exception):
    """The request body is not a well-formed multipart/form-data upload.

    Attributes:
        message: human-readable description, safe to return to the client.
        param: the offending form field, when one can be named, else ``None``.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class PartTooLarge(Exception):
    """The file part exceeded ``max_file_bytes``.

    Raised as soon as the cap is crossed; the rest of the body is not read.  The
    sink may hold partial data (at most the cap), which the caller must discard.

    Attributes:
        limit: the cap, in bytes.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(f"File exceeds the maximum allowed size of {limit} bytes")
        self.limit = limit


class FileSink(Protocol):
    """Destination of the uploaded file's bytes."""

    async def write(self, data: bytes) -> None: ...


@dataclass
class ParsedForm:
    """Result of :func:`parse_upload`."""

    #: Plain text fields (``purpose``, ``expires_after[anchor]``, ...), decoded as UTF-8.
    fields: dict[str, str] = field(default_factory=dict)
    #: Client-supplied filename of the file part, verbatim (untrusted data: it may contain
    #: path separators, ``..``, anything), truncated to 1024 characters.  ``None`` when the
    #: body had no file part; the sink was then never opened.
    filename: str | None = None
    #: Number of bytes written to the sink.
    file_bytes: int = 0
    #: The file part's own Content-Type header, if it had one.
    file_content_type: str | None = None


# --------------------------------------------------------------------------- header parsing


def _decode_header_text(raw: bytes) -> str:
    """Header values are UTF-8 in practice (browsers, httpx); fall back to latin-1."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _split_params(value: str) -> tuple[str, list[tuple[str, str]]]:
    """Split ``type; k1=v1; k2="v 2"`` into ``("type", [("k1", "v1"), ("k2", "v 2")])``.

    Parameter names are lower-cased.  Quoted strings may contain ``;``; inside them only
    ``\\\\`` and ``\\"`` are unescaped (a lone backslash, as in a Windows path sent by a
    browser, is kept literally) -- the same convention python-multipart and Starlette use.
    """
    n = len(value)
    i = value.find(";")
    if i == -1:
        return value.strip(" \t").lower(), []
    disp_type = value[:i].strip(" \t").lower()
    params: list[tuple[str, str]] = []
    i += 1
    while i < n:
        # Parameter name, up to '=' or ';'.
        j = i
        while j < n and value[j] not in "=;":
            j += 1
        name = value[i:j].strip(" \t").lower()
        if j >= n or value[j] == ";":
            # A bare token without '=': ignore it.
            i = j + 1
            continue
        j += 1  # skip '='
        while j < n and value[j] in " \t":
            j += 1
        if j < n and value[j] == '"':
            out: list[str] = []
            j += 1
            while j < n:
                c = value[j]
                if c == "\\" and j + 1 < n and value[j + 1] in '"\\':
                    out.append(value[j + 1])
                    j += 2
                    continue
                if c == '"':
                    j += 1
                    break
                out.append(c)
                j += 1
            val = "".join(out)
            # Skip anything up to the next ';'.
            k = value.find(";", j)
            j = n if k == -1 else k
        else:
            k = value.find(";", j)
            end = n if k == -1 else k
            val = value[j:end].strip(" \t")
            j = end
        if name:
            params.append((name, val))
        i = j + 1
    return disp_type, params


def _decode_ext_value(value: str) -> str | None:
    """Decode an RFC 5987 ``ext-value`` (``charset'lang'pct-encoded``); ``None`` if invalid."""
    parts = value.split("'", 2)
    if len(parts) != 3:
        return None
    charset = parts[0].strip().lower()
    if charset not in ("utf-8", "iso-8859-1", "latin-1", "latin1"):
        return None
    try:
        return unquote_to_bytes(parts[2]).decode("utf-8" if charset == "utf-8" else "latin-1")
    except UnicodeDecodeError:
        return None


# --------------------------------------------------------------------------- parser state


class _UploadParser:
    """Callback target for :class:`MultipartParser`; holds all per-request state."""

    def __init__(
        self, *, file_field: str, max_file_bytes: int, max_field_bytes: int, max_fields: int
    ) -> None:
        self.file_field = file_field
        self.max_file_bytes = max_file_bytes
        self.max_field_bytes = max_field_bytes
        self.max_fields = max_fields

        self.form = ParsedForm()
        self.ended = False
        self.part_count = 0
        self.seen_names: set[str] = set()

        # Current part.
        self._headers: dict[bytes, bytes] = {}
        self._header_count = 0
        self._header_bytes = 0
        self._hname = bytearray()
        self._hvalue = bytearray()
        self._part_name: str | None = None
        self._part_is_file = False
        self._field_buf = bytearray()

        # File part.
        self.file_seen = False
        self.file_done = False
        self.need_open = False
        self.received = 0
        self.pending: list[memoryview] = []
        self.pending_bytes = 0

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    # -- headers

    def on_part_begin(self) -> None:
        self.part_count += 1
        if self.part_count > self.max_fields:
            raise MultipartError(f"Too many form parts (at most {self.max_fields} are allowed)")
        self._headers = {}
        self._header_count = 0
        self._header_bytes = 0
        self._hname.clear()
        self._hvalue.clear()
        self._part_name = None
        self._part_is_file = False
        self._field_buf.clear()

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise MultipartError("Multipart part headers are too large")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header_bytes(end - start)
        self._hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header_bytes(end - start)
        self._hvalue += data[start:end]

    def on_header_end(self) -> None:
        self._header_count += 1
        if self._header_count > MAX_PART_HEADERS:
            raise MultipartError("Too many headers in a multipart part")
        name = bytes(self._hname).strip().lower()
        if name:
            self._headers[name] = bytes(self._hvalue).strip(b" \t")
        self._hname.clear()
        self._hvalue.clear()

    def on_headers_finished(self) -> None:
        raw_cd = self._headers.get(b"content-disposition")
        if raw_cd is None:
            raise MultipartError("Multipart part is missing its Content-Disposition header")
        disp_type, params = _split_params(_decode_header_text(raw_cd))
        if disp_type != "form-data":
            raise MultipartError("Multipart part has a Content-Disposition other than form-data")
        pdict: dict[str, str] = {}
        for key, val in params:
            pdict.setdefault(key, val)  # first occurrence wins
        name = pdict.get("name")
        if not name:
            raise MultipartError("Multipart part is missing the name parameter of its Content-Disposition")
        is_file = "filename" in pdict or "filename*" in pdict

        if name == self.file_field and is_file:
            if self.file_seen:
                raise MultipartError(f"Only one '{name}' part is allowed", name)
            if name in self.seen_names:
                raise MultipartError(f"Duplicate form field '{name}'", name)
            filename: str | None = None
            if "filename*" in pdict:
                filename = _decode_ext_value(pdict["filename*"].strip('"'))
                if filename is None and "filename" not in pdict:
                    raise MultipartError("Invalid filename* parameter", name)
            if filename is None:
                filename = pdict["filename"]
            self.form.filename = filename[:MAX_FILENAME_CHARS]
            ctype = self._headers.get(b"content-type")
            self.form.file_content_type = _decode_header_text(ctype) if ctype is not None else None
            self.file_seen = True
            self.need_open = True
            self._part_is_file = True
        elif is_file:
            raise MultipartError(f"Unexpected file part '{name}'", name)
        elif name in self.seen_names:
            raise MultipartError(f"Duplicate form field '{name}'", name)
        self.seen_names.add(name)
        self._part_name = name
        self._headers = {}

    # -- data

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        if self._part_is_file:
            self.received += n
            if self.received > self.max_file_bytes:
                raise PartTooLarge(self.max_file_bytes)
            # ``data`` is the (immutable) chunk or the parser's boundary constant, so a view
            # stays valid until it is flushed; the only copy is the join in ``flush``.
            self.pending.append(memoryview(data)[start:end])
            self.pending_bytes += n
        else:
            if len(self._field_buf) + n > self.max_field_bytes:
                raise MultipartError(
                    f"Form field '{self._part_name}' exceeds {self.max_field_bytes} bytes", self._part_name
                )
            self._field_buf += data[start:end]

    def on_part_end(self) -> None:
        name = self._part_name
        if name is None:  # pragma: no cover - headers_finished always runs first
            raise MultipartError("Malformed multipart part")
        if self._part_is_file:
            self.file_done = True
        else:
            try:
                self.form.fields[name] = self._field_buf.decode("utf-8")
            except UnicodeDecodeError:
                raise MultipartError(f"Form field '{name}' is not valid UTF-8", name) from None
        self._field_buf.clear()
        self._part_name = None
        self._part_is_file = False

    def on_end(self) -> None:
        self.ended = True

    # -- output

    async def flush(self, sink: FileSink) -> None:
        """Write all pending file bytes, in writes of at most ``MAX_WRITE_BYTES``."""
        views = self.pending
        self.pending = []
        self.pending_bytes = 0
        batch: list[memoryview] = []
        batch_bytes = 0
        for view in views:
            while view:
                piece = view[: MAX_WRITE_BYTES - batch_bytes]
                view = view[len(piece) :]
                batch.append(piece)
                batch_bytes += len(piece)
                if batch_bytes >= MAX_WRITE_BYTES:
                    await sink.write(b"".join(batch))
                    self.form.file_bytes += batch_bytes
                    batch = []
                    batch_bytes = 0
        if batch:
            await sink.write(b"".join(batch))
            self.form.file_bytes += batch_bytes


def _boundary_from(content_type: str | None) -> bytes:
    if not content_type:
        raise MultipartError(_EXPECTED_CT)
    try:
        ctype, options = parse_options_header(content_type)
    except (UnicodeError, ValueError):
        raise MultipartError(_EXPECTED_CT) from None
    if ctype != b"multipart/form-data":
        raise MultipartError(_EXPECTED_CT)
    boundary = options.get(b"boundary", b"")
    if not boundary or len(boundary) > MAX_BOUNDARY_CHARS or not boundary.isascii():
        raise MultipartError(_EXPECTED_CT)
    return boundary


async def parse_upload(
    content_type: str | None,
    stream: AsyncIterator[bytes],
    open_sink: Callable[[], Awaitable[FileSink]],
    *,
    file_field: str = "file",
    max_file_bytes: int,
    max_field_bytes: int = 64 * 1024,
    max_fields: int = 32,
    on_file: Callable[[dict[str, str]], Awaitable[int | None]] | None = None,
) -> ParsedForm:
    """Parse a multipart/form-data upload body incrementally.

    Args:
        content_type: the request's Content-Type header.
        stream: the request body, e.g. Starlette's ``request.stream()``.
        open_sink: called once, when the headers of the ``file_field`` part are complete;
            the part's bytes are then written to the returned sink as they arrive.  Not
            called when the body has no file part.
        file_field: name of the file part.
        max_file_bytes: cap on the file part's size; crossing it raises :class:`PartTooLarge`
            immediately (the rest of the stream is not read).
        max_field_bytes: cap on each text field's size.
        max_fields: cap on the number of parts (file part included).
        on_file: called when the headers of the ``file_field`` part are complete, before ``open_sink``, with the
            text fields seen so far (those sent before the file, as the openai SDK sends them); it may raise to
            refuse the upload before any of the file is stored, or return a smaller cap for the file part.

    Returns:
        The parsed form.  ``filename`` is ``None`` when there was no file part.

    Raises:
        MultipartError: malformed, truncated or over-limit (other than the file) body.
        PartTooLarge: the file part exceeded ``max_file_bytes``.
    """
    boundary = _boundary_from(content_type)
    state = _UploadParser(
        file_field=file_field,
        max_file_bytes=max_file_bytes,
        max_field_bytes=max_field_bytes,
        max_fields=max_fields,
    )
    try:
        parser = MultipartParser(boundary, state.callbacks())
    except FormParserError:
        raise MultipartError(_EXPECTED_CT) from None

    sink: FileSink | None = None
    async for chunk in stream:
        if not chunk:
            continue
        try:
            parser.write(chunk)
        except FormParserError as exc:
            raise MultipartError(f"Malformed multipart body: {exc}") from None
        if state.need_open:
            state.need_open = False
            if on_file is not None:
                cap = await on_file(dict(state.form.fields))
                if cap is not None and cap < state.max_file_bytes:
                    state.max_file_bytes = cap
                    if state.received > cap:
                        raise PartTooLarge(cap)
            sink = await open_sink()
        if sink is not None and state.pending and (state.pending_bytes >= FLUSH_BYTES or state.file_done):
            await state.flush(sink)
        if state.ended:
            # Anything after the closing boundary is an epilogue; don't bother reading it.
            break

    if not state.ended:
        raise MultipartError("Multipart body ended before the closing boundary")
    parser.finalize()
    return state.form
