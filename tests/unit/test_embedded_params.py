"""The embedded engine's sampling parameters are refused with OpenAI's wording, param and code."""

from __future__ import annotations

from typing import Any

import pytest

from batchyard.embedded import params
from batchyard.errors import InvalidRequest


def refusal(check: Any, body: dict[str, Any]) -> tuple[str, str | None, str | None]:
    with pytest.raises(InvalidRequest) as e:
        check(body)
    return str(e.value.message), e.value.param, e.value.code


@pytest.mark.parametrize(
    ("body", "message", "param", "code"),
    [
        (
            {"max_tokens": -5},
            "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got -5 instead.",
            "max_tokens",
            "integer_below_min_value",
        ),
        (
            {"max_tokens": 1e30},
            "Invalid 'max_tokens': integer above maximum value. Expected a value <= 2147483647, but got 1e+30 "
            "instead.",
            "max_tokens",
            "integer_above_max_value",
        ),
        (
            {"max_tokens": 2.5},
            "Invalid type for 'max_tokens': expected an integer, but got a number instead.",
            "max_tokens",
            "invalid_type",
        ),
        (
            {"max_completion_tokens": "8"},
            "Invalid type for 'max_completion_tokens': expected an integer, but got a string instead.",
            "max_completion_tokens",
            "invalid_type",
        ),
        (
            {"temperature": 5},
            "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 5 instead.",
            "temperature",
            "decimal_above_max_value",
        ),
        (
            {"top_p": -0.5},
            "Invalid 'top_p': decimal below minimum value. Expected a value >= 0, but got -0.5 instead.",
            "top_p",
            "decimal_below_min_value",
        ),
        (
            {"temperature": True},
            "Invalid type for 'temperature': expected a decimal, but got a boolean instead.",
            "temperature",
            "invalid_type",
        ),
        (
            {"top_logprobs": 100, "logprobs": True},
            "Invalid 'top_logprobs': integer above maximum value. Expected a value <= 20, but got 100 instead.",
            "top_logprobs",
            "integer_above_max_value",
        ),
        (
            {"logprobs": 3},
            "Invalid type for 'logprobs': expected a boolean, but got an integer instead.",
            "logprobs",
            "invalid_type",
        ),
        (
            {"presence_penalty": [1]},
            "Invalid type for 'presence_penalty': expected a decimal, but got an array instead.",
            "presence_penalty",
            "invalid_type",
        ),
        (
            {"seed": 2**70},
            f"Invalid 'seed': integer above maximum value. Expected a value <= {2**63 - 1}, but got {2**70} "
            "instead.",
            "seed",
            "integer_above_max_value",
        ),
        (
            {"stop": ["a", "b", "c", "d", "e"]},
            "Invalid 'stop': array too long. Expected an array with maximum length 4, but got an array with length "
            "5 instead.",
            "stop",
            "array_above_max_length",
        ),
        (
            {"stop": ["a", 1]},
            "Invalid type for 'stop[1]': expected a string, but got an integer instead.",
            "stop",
            "invalid_type",
        ),
        (
            {"stop": {"x": 1}},
            "Invalid type for 'stop': expected a string or an array of strings, but got an object instead.",
            "stop",
            "invalid_type",
        ),
    ],
)
def test_chat_parameters_out_of_openais_bounds_are_refused_in_its_words(
    body: dict[str, Any], message: str, param: str, code: str
) -> None:
    assert refusal(params.check_chat, body) == (message, param, code)


def test_completions_have_their_own_bounds() -> None:
    assert refusal(params.check_completion, {"logprobs": 6})[2] == "integer_above_max_value"
    assert refusal(params.check_completion, {"max_tokens": -1})[2] == "integer_below_min_value"
    params.check_completion({"max_tokens": 0, "logprobs": 5, "stop": "\n"})  # within them
    with pytest.raises(InvalidRequest):
        params.check_chat({"max_tokens": 0})  # chat needs at least one token


def test_values_within_bounds_and_nulls_pass_and_an_integral_decimal_becomes_an_integer() -> None:
    body: dict[str, Any] = {
        "max_tokens": 16.0,
        "temperature": 0,
        "top_p": 1,
        "presence_penalty": -2,
        "frequency_penalty": 2.0,
        "seed": -(2**63),
        "top_logprobs": 0,
        "logprobs": True,
        "stop": ["a", "b", "c", "d"],
        "max_completion_tokens": None,
    }
    params.check_chat(body)
    assert body["max_tokens"] == 16 and isinstance(body["max_tokens"], int)


def test_n_is_counted_within_its_bounds() -> None:
    assert params.choice_count({}, 128) == 1
    assert params.choice_count({"n": None}, 128) == 1
    assert params.choice_count({"n": 3.0}, 128) == 3
    assert refusal(lambda b: params.choice_count(b, 128), {"n": 129}) == (
        "Invalid 'n': integer above maximum value. Expected a value <= 128, but got 129 instead.",
        "n",
        "integer_above_max_value",
    )
    assert refusal(lambda b: params.choice_count(b, 128), {"n": 0})[2] == "integer_below_min_value"
