"""Streaming validation of batch input files and planning of their shards.

Pure: no I/O, no framework. Feed the file's bytes in chunks of any size (lines may span chunks), then call
``finish()``. Memory stays O(chunk + longest line) plus 25 bytes a request line for duplicate detection.

Line rules (shared with :func:`iter_lines`):

- lines end at ``\\n``; a ``\\r`` before it belongs to the terminator (CRLF files work); the last line
  may lack a newline;
- a line holding only ASCII whitespace (or nothing) is blank: it is skipped, but it still counts in the
  1-based physical line numbers;
- every other line is a request line;
- a UTF-8 byte order mark at the start of the file is skipped (the first shard starts after it);
- a line nested more than ``wire.MAX_DEPTH`` levels deep is refused (``invalid_json_line``): nothing downstream
  re-serializes or walks it.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import orjson

from batchyard.domain.ordering import group_hash
from batchyard.domain.planning import PrefixPlanner, ShardPlan
from batchyard.domain.wire import MAX_DEPTH, depth_exceeds

__all__ = ["BatchValidator", "LineError", "ShardPlan", "ValidationResult", "iter_lines"]


@dataclass(frozen=True, slots=True)
class LineError:
    code: str
    message: str
    line: int | None
    param: str | None


@dataclass(frozen=True, slots=True)
class ValidationResult:
    ok: bool  # no errors
    # at most max_errors entries: file-level errors (line None) first, then line errors in line order
    errors: list[LineError]
    error_count: int  # total number of errors found (may exceed len(errors))
    total_lines: int  # number of request lines (non-blank) scanned
    shards: list[ShardPlan]  # empty when not ok
    model: str | None  # body.model of the first valid line


INVALID_JSON_MESSAGE: Final = "This line is not parseable as valid JSON."
DUPLICATE_CUSTOM_ID_MESSAGE: Final = (
    "The custom_id for this request is a duplicate of another request. "
    "The custom_id parameter must be unique for each individual request in a batch."
)
EMPTY_FILE_MESSAGE: Final = "The batch input file is empty."

# Endpoint -> (body field that must be present, whether it must be a JSON array).
_BODY_FIELDS: Final[dict[str, tuple[str, bool]]] = {
    "/v1/chat/completions": ("messages", True),
    "/v1/embeddings": ("input", False),
    "/v1/completions": ("prompt", False),
    "/v1/responses": ("input", False),
    "/v1/moderations": ("input", False),
}

_MAX_ECHO = 256  # longest user value echoed back in a message

# (code, message, param)
_Problem = tuple[str, str, str | None]

_INVALID_JSON: Final[_Problem] = ("invalid_json_line", INVALID_JSON_MESSAGE, None)
_TOO_DEEP: Final[_Problem] = (
    "invalid_json_line",
    f"This line nests arrays and objects more than {MAX_DEPTH} levels deep, which is not supported.",
    None,
)
_DUPLICATE: Final[_Problem] = ("duplicate_custom_id", DUPLICATE_CUSTOM_ID_MESSAGE, "custom_id")


def _missing(param: str) -> _Problem:
    return ("missing_required_parameter", f"Missing required parameter: '{param}'.", param)


_MISSING_CUSTOM_ID: Final = _missing("custom_id")
_BAD_CUSTOM_ID: Final[_Problem] = (
    "missing_required_parameter",
    "Invalid 'custom_id': expected a non-empty string.",
    "custom_id",
)
_MISSING_METHOD: Final = _missing("method")
_BAD_METHOD: Final[_Problem] = (
    "invalid_value",
    "Invalid value for 'method': only 'POST' is supported.",
    "method",
)
_MISSING_URL: Final = _missing("url")
_MISSING_BODY: Final = _missing("body")
_BAD_BODY: Final[_Problem] = (
    "missing_required_parameter",
    "Invalid 'body': expected a JSON object.",
    "body",
)
_MISSING_MODEL: Final[_Problem] = ("invalid_request", "Model parameter is required.", "body.model")
_BAD_MODEL: Final[_Problem] = ("invalid_request", "Invalid 'body.model': expected a string.", "body.model")
# OpenAI names the API in the message: "Chat Completions: Streaming is not supported in the Batch API."
_API_NAMES: Final = {
    "/v1/chat/completions": "Chat Completions",
    "/v1/completions": "Completions",
    "/v1/responses": "Responses",
    "/v1/embeddings": "Embeddings",
    "/v1/moderations": "Moderations",
}


def _echo(value: str) -> str:
    return value if len(value) <= _MAX_ECHO else value[:_MAX_ECHO] + "..."


_BOM: Final = b"\xef\xbb\xbf"
MAX_LINE_BYTES: Final = 32 * 1024 * 1024  # one request line (a few large images inline still fit)
_WHITESPACE: Final = b" \t\n\r\x0b\x0c"  # what bytes.isspace() accepts


def _is_blank(line: bytes) -> bool:
    # A line whose first byte is not whitespace (a request line: "{") needs no full scan.
    return not line or (line[0] in _WHITESPACE and line.isspace())


def iter_lines(data: bytes, first_line: int) -> Iterator[tuple[int, bytes]]:
    """Split a shard's bytes into ``(line_no, line)``, skipping blank lines, with the validator's rules.

    ``first_line`` is the 1-based number of the first physical line in ``data`` (``ShardPlan.first_line``).
    Each yielded line has its terminator (``\\n`` or ``\\r\\n``) removed; it parses with ``orjson.loads``.
    """
    lines = data.split(b"\n")
    if not lines[-1]:
        lines.pop()  # nothing after the final newline
    line_no = first_line
    for line in lines:
        if not _is_blank(line):
            yield line_no, (line[:-1] if line[-1] == 0x0D else line)
        line_no += 1


class BatchValidator:
    """Validates a batch input file fed in chunks and plans its shards.

    ``is_routable(model)`` says whether a model can be served; it is called once per distinct model. An exception
    it raises propagates out of ``feed``/``finish`` and leaves the validator unusable.
    """

    def __init__(
        self,
        endpoint: str,
        is_routable: Callable[[str], bool],
        *,
        max_lines: int = 50_000,
        max_bytes: int = 200 * 1024 * 1024,
        max_errors: int = 100,
        shard_lines: int = 1000,
        shard_bytes: int = 16 * 1024 * 1024,
        max_line_bytes: int = MAX_LINE_BYTES,
        prefix_planning: bool = False,
    ) -> None:
        if max_lines < 1:
            raise ValueError("max_lines must be at least 1")
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        if max_errors < 0:
            raise ValueError("max_errors must not be negative")
        if shard_lines < 1:
            raise ValueError("shard_lines must be at least 1")
        if shard_bytes < 1:
            raise ValueError("shard_bytes must be at least 1")
        self._endpoint = endpoint
        self._is_routable = is_routable
        self._max_lines = max_lines
        self._max_bytes = max_bytes
        self._max_errors = max_errors
        self._shard_lines = shard_lines
        self._shard_bytes = shard_bytes
        self._max_line_bytes = max_line_bytes
        self._too_long: _Problem = (
            "invalid_request",
            f"This request line is larger than the maximum of {max_line_bytes} bytes.",
            None,
        )
        self._body_field = _BODY_FIELDS.get(endpoint)
        self._invalid_url: _Problem = (
            "invalid_url",
            "The URL provided for this request does not match the batch endpoint.",
            "url",
        )
        self._streaming: _Problem = (
            "streaming_unsupported",
            f"{_API_NAMES.get(endpoint, 'This API')}: Streaming is not supported in the Batch API.",
            "body.stream",
        )

        self._routable: dict[str, bool] = {}
        # custom_ids are not kept: two independent 64-bit hashes of each (128 bits: a false duplicate would need a
        # collision of both), its line and whether the line was otherwise valid, in flat arrays (25 bytes a line);
        # duplicates are found once, at finish, by sorting. A set of the ids themselves costs ~100 bytes a line.
        self._id_h1 = array("q")
        self._id_h2 = array("q")
        self._id_line = array("q")
        self._id_valid = array("B")
        self._pending: list[bytes] = []  # the current, unterminated line, in pieces
        self._bytes = 0  # bytes fed
        self._offset = 0  # byte offset of the next line to scan
        self._line_no = 0  # physical lines scanned
        self._total = 0  # request lines scanned
        self._errors: list[LineError] = []
        self._error_count = 0
        self._model: str | None = None
        self._shards: list[ShardPlan] = []
        self._shard_start = 0
        self._shard_first = 0
        self._shard_count = 0
        self._last_end = 0  # byte offset just past the last request line
        self._too_many_lines = False
        self._too_large = False
        self._stopped = False  # a file-level limit was hit: the rest is only counted in bytes
        self._result: ValidationResult | None = None
        self._head: bytes | None = b""  # the first bytes, until they are known not to be a split BOM
        # lines that share a prompt prefix land in the same shards across the whole file (domain/planning.py)
        self._planner = PrefixPlanner(shard_lines, shard_bytes) if prefix_planning else None

    def feed(self, chunk: bytes) -> None:
        if self._result is not None:
            raise RuntimeError("feed() after finish()")
        if type(chunk) is not bytes:
            chunk = bytes(chunk)  # never keep a reference to a buffer the caller may reuse
        if self._head is not None:
            # A UTF-8 byte order mark (Windows editors write one) is not part of the first line: the first shard
            # starts after it. The first bytes are held until it is known whether they are one.
            head = self._head + chunk
            if len(head) < len(_BOM) and _BOM.startswith(head):
                self._head = head
                return
            self._head = None
            chunk = head
            if chunk.startswith(_BOM):
                self._bytes = self._offset = len(_BOM)
                chunk = chunk[len(_BOM) :]
        self._bytes += len(chunk)
        if self._bytes > self._max_bytes:
            self._too_large = True
            self._stop()
        if self._stopped:
            return
        first = chunk.find(b"\n")
        if first < 0:
            if chunk:
                self._pending.append(chunk)
            return
        pos = 0
        if self._pending:
            self._pending.append(chunk[: first + 1])
            joined = b"".join(self._pending)
            self._pending = []
            self._scan(joined, 0, len(joined))
            pos = first + 1
        stop = chunk.rfind(b"\n") + 1
        self._scan(chunk, pos, stop)
        if stop < len(chunk) and not self._stopped:
            self._pending.append(chunk[stop:])

    def finish(self) -> ValidationResult:
        if self._result is not None:
            return self._result
        if self._head:  # a file of one or two bytes that began like a byte order mark
            head, self._head = self._head, None
            self.feed(head)
        if self._pending and not self._stopped:
            self._pending.append(b"\n")
            last = b"".join(self._pending)
            self._pending = []
            self._scan(last, 0, len(last))
            # The last line has no newline: ranges end at the end of the file, not one byte past it.
            self._last_end = min(self._last_end, self._bytes)
            if self._shards and self._shards[-1].end > self._bytes:
                s = self._shards[-1]
                self._shards[-1] = ShardPlan(s.index, s.start, self._bytes, s.first_line, s.line_count)
            if self._planner is not None:
                self._planner.clamp(self._bytes)
        if self._shard_count and not self._stopped:
            shard = ShardPlan(
                len(self._shards), self._shard_start, self._last_end, self._shard_first, self._shard_count
            )
            self._shards.append(shard)
            self._shard_count = 0

        file_errors: list[LineError] = []
        if self._too_many_lines:
            file_errors.append(
                LineError(
                    "too_many_lines",
                    f"The batch input file contains more than {self._max_lines} requests.",
                    None,
                    None,
                )
            )
        if self._too_large:
            file_errors.append(
                LineError(
                    "file_too_large",
                    f"The batch input file is larger than the maximum of {self._max_bytes} bytes.",
                    None,
                    None,
                )
            )
        if not file_errors and self._total == 0:
            file_errors.append(LineError("empty_file", EMPTY_FILE_MESSAGE, None, None))
        line_errors = self._errors
        dups = self._duplicate_lines()
        if len(dups):
            self._error_count += len(dups)
            dup_errors = [LineError(_DUPLICATE[0], _DUPLICATE[1], int(n), _DUPLICATE[2]) for n in dups]
            line_errors = sorted(line_errors + dup_errors[: self._max_errors], key=lambda e: e.line or 0)
        error_count = self._error_count + len(file_errors)
        errors = (file_errors + line_errors)[: self._max_errors]
        ok = error_count == 0
        self._result = ValidationResult(
            ok=ok,
            errors=errors,
            error_count=error_count,
            total_lines=self._total,
            shards=self._planned() if ok else [],
            model=self._model,
        )
        self._id_h1 = self._id_h2 = self._id_line = array("q")
        self._id_valid = array("B")
        self._routable = {}
        return self._result

    def _planned(self) -> list[ShardPlan]:
        if self._planner is None:
            return self._shards
        shards = self._planner.plan(self._shards)
        self._planner = None  # its arrays are no longer needed
        return shards

    def _duplicate_lines(self) -> Any:
        """Line numbers (sorted) of otherwise valid lines whose custom_id an earlier line already used."""
        if len(self._id_line) < 2:
            return ()
        h1 = np.frombuffer(self._id_h1, dtype=np.int64)
        h2 = np.frombuffer(self._id_h2, dtype=np.int64)
        lines = np.frombuffer(self._id_line, dtype=np.int64)
        order = np.lexsort((lines, h2, h1))  # by id, then line
        s1, s2 = h1[order], h2[order]
        later = order[1:][(s1[1:] == s1[:-1]) & (s2[1:] == s2[:-1])]
        later = later[np.frombuffer(self._id_valid, dtype=np.uint8)[later] == 1]
        return np.sort(lines[later])

    def _stop(self) -> None:
        self._stopped = True
        self._pending = []

    def _scan(self, buf: bytes, pos: int, stop: int) -> None:
        """Scan the complete lines of ``buf[pos:stop]`` (``buf[stop - 1]`` is a newline).

        Lines are found with ``bytes.find`` and parsed from memoryview slices: no copy of the data. The state
        lives in locals for speed.
        """
        if self._stopped or pos >= stop:
            return
        loads = orjson.loads
        decode_error = orjson.JSONDecodeError
        check = self._check
        errors = self._errors
        max_errors = self._max_errors
        max_lines = self._max_lines
        shard_lines = self._shard_lines
        shard_bytes = self._shard_bytes
        shards = self._shards
        too_deep = depth_exceeds
        max_line = self._max_line_bytes
        find = buf.find
        whitespace = _WHITESPACE
        view = memoryview(buf)
        base = self._offset - pos  # file offset of buf[0]
        line_no = self._line_no
        total = self._total
        error_count = self._error_count
        shard_start = self._shard_start
        shard_first = self._shard_first
        shard_count = self._shard_count
        last_end = self._last_end
        planner = self._planner
        problem: _Problem | None
        while pos < stop:
            end = find(b"\n", pos)
            line_no += 1
            start = pos
            pos = end + 1
            if end == start or (buf[start] in whitespace and buf[start:end].isspace()):
                continue
            total += 1
            if total > max_lines:
                self._too_many_lines = True
                self._stop()
                break
            last_end = base + pos
            if shard_count == 0:
                shard_start = base + start
                shard_first = line_no
            shard_count += 1
            if shard_count == shard_lines or last_end - shard_start >= shard_bytes:
                shards.append(ShardPlan(len(shards), shard_start, last_end, shard_first, shard_count))
                shard_count = 0
            if end - start > max_line:
                problem = self._too_long  # never parsed: a worker holds a shard's lines in memory
            else:
                try:
                    obj = loads(view[start:end])
                except decode_error:
                    problem = _INVALID_JSON
                else:
                    # too deep for re-serialization and recursive code downstream, or the first rule it breaks
                    problem = _TOO_DEEP if too_deep(buf, start, end, obj) else check(obj, line_no)
                    if problem is None and planner is not None:
                        key = group_hash(obj["body"])
                        if key is not None:
                            # the line's contiguous shard: the one just closed by it (count back at 0), or the open one
                            shard = len(shards) - (shard_count == 0)
                            planner.add(key, base + start, base + pos, line_no, total - 1, shard)
            if problem is not None:
                error_count += 1
                if len(errors) < max_errors:
                    errors.append(LineError(problem[0], problem[1], line_no, problem[2]))
        view.release()
        self._line_no = line_no
        self._offset = base + pos
        self._total = total
        self._error_count = error_count
        self._shard_start = shard_start
        self._shard_first = shard_first
        self._shard_count = shard_count
        self._last_end = last_end

    def _check(self, obj: Any, line_no: int) -> _Problem | None:
        """The first rule a parsed line breaks, or None (then the first valid model is recorded)."""
        if type(obj) is not dict:
            return _INVALID_JSON
        custom_id = obj.get("custom_id")
        if type(custom_id) is not str or not custom_id:
            return _MISSING_CUSTOM_ID if custom_id is None and "custom_id" not in obj else _BAD_CUSTOM_ID
        # Every line with a usable custom_id claims it, whatever else is wrong with the line: record it now, and
        # mark the line valid at the end of the checks (duplicates are reported at finish).
        self._id_h1.append(hash(custom_id))
        self._id_h2.append(hash(custom_id + "\x1f"))
        self._id_line.append(line_no)
        self._id_valid.append(0)
        if "method" not in obj:
            return _MISSING_METHOD
        if obj["method"] != "POST":
            return _BAD_METHOD
        if "url" not in obj:
            return _MISSING_URL
        if obj["url"] != self._endpoint:
            return self._invalid_url
        if "body" not in obj:
            return _MISSING_BODY
        body = obj["body"]
        if type(body) is not dict:
            return _BAD_BODY
        if "model" not in body:
            return _MISSING_MODEL
        model = body["model"]
        if type(model) is not str:
            return _BAD_MODEL
        routable = self._routable.get(model)
        if routable is None:
            routable = self._routable[model] = bool(self._is_routable(model))
        if not routable:
            return (
                "model_not_found",
                f"The provided model '{_echo(model)}' is not supported by the Batch API.",
                "body.model",
            )
        if body.get("stream") is True:
            return self._streaming
        field = self._body_field
        if field is not None:
            name, must_be_list = field
            value = body.get(name)
            if value is None or (must_be_list and type(value) is not list):
                param = "body." + name
                message = (
                    f"{name.capitalize()} parameter is required."  # OpenAI: "Messages parameter is required."
                    if value is None
                    else f"Invalid '{param}': expected an array."
                )
                return ("invalid_request", message, param)
        self._id_valid[-1] = 1
        if self._model is None:
            self._model = model
        return None
