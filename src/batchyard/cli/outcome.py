"""What a finished batch means to a script: the exit codes of `batchyard run`, `submit --wait`, `batches get --wait`
and `batches download`, and the summary of the error lines (top codes, one example each, a hint where we know one).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

OK = 0  # completed, no line failed
ERROR = 1  # a connection or API error, a failed validation of `run`'s input
USAGE = 2  # click's own code for usage errors
NOT_COMPLETED = 3  # the batch ended failed, expired or cancelled
SOME_FAILED = 4  # completed, but some lines failed

EXIT_CODES_HELP = """Exit codes:
  0  completed, no line failed
  1  connection or API error (OpenAI's message and code on stderr)
  2  usage error
  3  the batch ended failed, expired or cancelled
  4  completed, but some lines failed"""

# Hints for `run`, whose upstreams are the command's own options.
RUN_HINTS = {
    "401": "the upstream refused the key: pass it with --upstream-api-key (BATCHYARD_UPSTREAM_API_KEY)",
    "403": "the upstream refused the key: pass it with --upstream-api-key (BATCHYARD_UPSTREAM_API_KEY)",
    "404": "does the --upstream URL end in /v1? (e.g. http://127.0.0.1:8001/v1)",
    "model_not_found": "no upstream serves this model: check the --upstream MODEL=URL routes",
    "request_timeout": "the upstream did not answer in time: raise --attempt-timeout",
    "408": "the upstream did not answer in time: raise --attempt-timeout",
    "upstream_connect": "is the upstream running at the --upstream URL?",
}


def exit_code(status: str, failed: int) -> int:
    """The exit code of a batch that ended with `status` and `failed` error lines."""
    if status != "completed":
        return NOT_COMPLETED
    return SOME_FAILED if failed else OK


@dataclass
class ErrorTally:
    """Error lines counted by code: the HTTP status and the body's error code, or the line's own error code."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    examples: dict[tuple[str, str], str] = field(default_factory=dict)

    def add_line(self, raw: bytes) -> None:
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if isinstance(line, dict):
            key, message = _classify(line)
            self.counts[key] += 1
            self.examples.setdefault(key, message[:300])

    def add_lines(self, lines: Iterable[bytes]) -> ErrorTally:
        for raw in lines:
            if raw.strip():
                self.add_line(raw)
        return self

    def top(self, n: int = 5) -> list[tuple[int, str, str, str]]:
        """(count, status, code, example message) of the `n` most frequent codes."""
        return [(c, k[0], k[1], self.examples[k]) for k, c in self.counts.most_common(n)]

    def report(self, hints: dict[str, str] | None = None, n: int = 5) -> list[str]:
        """Lines for a person: the top codes with their count, one example and a hint."""
        out: list[str] = []
        for count, status, code, example in self.top(n):
            label = f"{status} {code}" if status and code else status or code
            out.append(f"  {count:>7} × {label}: {example}")
            hint = (hints or {}).get(code) or (hints or {}).get(status)
            if hint:
                out.append(f"            hint: {hint}")
        more = len(self.counts) - n
        if more > 0:
            out.append(f"  ... and {more} other codes")
        return out


def _classify(line: dict[str, object]) -> tuple[tuple[str, str], str]:
    response = line.get("response")
    error = line.get("error")
    if isinstance(response, dict):
        status = str(response.get("status_code", ""))
        body = response.get("body")
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            code = err.get("code") or err.get("type") or ""
            return (status, str(code)), str(err.get("message") or "")
        return (status, ""), str(body)[:300]
    if isinstance(error, dict):
        return ("", str(error.get("code") or "")), str(error.get("message") or "")
    return ("", "unknown"), ""
