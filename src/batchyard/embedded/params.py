"""The sampling parameters of a chat or text completion, checked as OpenAI checks them, before the engine sees them.

llama.cpp reads what it can and words its own refusals (`max_tokens` 1e30 came back as "Value must be between -1 <=
value <= 2147483647, but got -2147483648", `top_logprobs` 100 was served): the embedded engine answers instead with
OpenAI's bounds, wording, `param` and `code`, e.g. `Invalid 'max_tokens': integer below minimum value. Expected a
value >= 1, but got -5 instead.` (`integer_below_min_value`) and `Invalid type for 'temperature': expected a
decimal, but got a string instead.` (`invalid_type`). A null is a parameter left out, as OpenAI takes it.
"""

from __future__ import annotations

from typing import Any

from batchyard.domain.limits import json_type
from batchyard.errors import InvalidRequest

TOKENS = 2**31 - 1  # the most a token count may be: llama.cpp reads it as a 32-bit integer
Bounds = tuple[tuple[str, bool, float, float | None], ...]  # (name, integer?, minimum, maximum or None)
# OpenAI's documented ranges (token counts: also the engine's)
_SAMPLING: Bounds = (
    ("temperature", False, 0, 2),
    ("top_p", False, 0, 1),
    ("presence_penalty", False, -2, 2),
    ("frequency_penalty", False, -2, 2),
    ("seed", True, -(2**63), 2**63 - 1),
)
_CHAT: Bounds = (
    ("max_tokens", True, 1, TOKENS),
    ("max_completion_tokens", True, 1, TOKENS),
    ("top_logprobs", True, 0, 20),
    *_SAMPLING,
)
_COMPLETIONS: Bounds = (  # a completion may ask for no token at all
    ("max_tokens", True, 0, TOKENS),
    ("logprobs", True, 0, 5),
    ("best_of", True, 0, 20),
    *_SAMPLING,
)
MAX_STOP = 4


def check_chat(body: dict[str, Any]) -> None:
    _check(body, _CHAT)
    _check_stop(body.get("stop"))
    if "logprobs" in body and body["logprobs"] is not None and not isinstance(body["logprobs"], bool):
        raise _type_error("logprobs", "a boolean", body["logprobs"])


def check_completion(body: dict[str, Any]) -> None:
    _check(body, _COMPLETIONS)
    _check_stop(body.get("stop"))


def choice_count(body: dict[str, Any], most: int) -> int:
    """`n`, from 1 to `most` (OpenAI's own maximum is 128)."""
    _check(body, (("n", True, 1, most),))
    n = body.get("n")
    return 1 if n is None else int(n)


def _check(body: dict[str, Any], table: Bounds) -> None:
    for name, integer, low, high in table:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(name, "an integer" if integer else "a decimal", value)
        if integer and isinstance(value, float) and not value.is_integer():
            raise _type_error(name, "an integer", value)
        kind = "integer" if integer else "decimal"
        if value < low:
            raise _range_error(name, kind, "below minimum", f">= {_num(low)}", value)
        if high is not None and value > high:
            raise _range_error(name, kind, "above maximum", f"<= {_num(high)}", value)
        if integer and isinstance(value, float):
            body[name] = int(value)  # 16.0: the engine is given 16


def _check_stop(stop: Any) -> None:
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list):
        raise _type_error("stop", "a string or an array of strings", stop)
    if len(stop) > MAX_STOP:
        raise InvalidRequest(
            f"Invalid 'stop': array too long. Expected an array with maximum length {MAX_STOP}, but got an array "
            f"with length {len(stop)} instead.",
            param="stop",
            code="array_above_max_length",
        )
    for i, item in enumerate(stop):
        if not isinstance(item, str):
            raise _type_error(f"stop[{i}]", "a string", item, param="stop")


def _type_error(name: str, expected: str, value: Any, param: str | None = None) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid type for '{name}': expected {expected}, but got {json_type(value)} instead.",
        param=param or name,
        code="invalid_type",
    )


def _range_error(name: str, kind: str, where: str, bound: str, value: float) -> InvalidRequest:
    side = "below_min" if where.startswith("below") else "above_max"
    return InvalidRequest(
        f"Invalid '{name}': {kind} {where} value. Expected a value {bound}, but got {_num(value)} instead.",
        param=name,
        code=f"{kind}_{side}_value",
    )


def _num(value: float) -> str:
    """A bound or a value as OpenAI writes it: 2, not 2.0; 0.5 as it is."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)
