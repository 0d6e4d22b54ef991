"""Batch API limits: completion windows and metadata."""

from __future__ import annotations

import pytest

from batchyard.domain.limits import (
    MAX_WINDOW_SECONDS,
    METADATA_MAX_KEY,
    METADATA_MAX_PAIRS,
    METADATA_MAX_VALUE,
    metadata_problem,
    parse_completion_window,
)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("24h", 86_400),
        ("90s", 90),
        ("30m", 1_800),
        ("2h", 7_200),
        ("3d", 259_200),
        ("1s", 1),
        ("7d", 604_800),
        ("168h", 604_800),
        ("10080m", 604_800),
        ("604800s", 604_800),
    ],
)
def test_valid_windows(value: str, seconds: int) -> None:
    assert parse_completion_window(value) == seconds


def test_seven_days_is_the_maximum() -> None:
    assert MAX_WINDOW_SECONDS == 7 * 86_400
    assert parse_completion_window("8d") is None
    assert parse_completion_window("169h") is None
    assert parse_completion_window("604801s") is None
    assert parse_completion_window("9999999d") is None


@pytest.mark.parametrize(
    "value",
    [
        "",
        "24",
        "h",
        "0h",
        "0s",
        "024h",
        "-1h",
        "+1h",
        "1.5h",
        "24H",
        "24 h",
        " 24h",
        "24h ",
        "1w",
        "24hh",
        "1e3s",
        "２４h",
    ],
)
def test_invalid_windows(value: str) -> None:
    assert parse_completion_window(value) is None


def test_trailing_newline_is_invalid() -> None:
    assert parse_completion_window("24h\n") is None


# -- metadata -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        {},
        {"project": "x"},
        {f"k{i}": "v" for i in range(METADATA_MAX_PAIRS)},
        {"k" * METADATA_MAX_KEY: "v" * METADATA_MAX_VALUE},
        {"empty": ""},
    ],
)
def test_valid_metadata(metadata: object) -> None:
    assert metadata_problem(metadata) is None


@pytest.mark.parametrize(
    ("metadata", "kind"),
    [([], "an array"), ("text", "a string"), (3, "an integer"), ([("a", "b")], "an array")],
)
def test_metadata_must_be_an_object(metadata: object, kind: str) -> None:
    assert metadata_problem(metadata) == (
        f"Invalid type for 'metadata': expected an object, but got {kind} instead.",
        "metadata",
        "invalid_type",
    )


def test_too_many_pairs() -> None:
    md = {f"k{i}": "v" for i in range(METADATA_MAX_PAIRS + 1)}
    assert metadata_problem(md) == (
        "Invalid 'metadata': too many properties. Expected an object with at most 16 properties, but got an object "
        "with 17 properties instead.",
        "metadata",
        "object_above_max_properties",
    )


def test_key_too_long() -> None:
    problem = metadata_problem({"k" * (METADATA_MAX_KEY + 1): "v"})
    assert problem == (
        "Invalid 'metadata': keys must be strings of at most 64 characters.",
        "metadata",
        "invalid_value",
    )


def test_key_not_a_string() -> None:
    problem = metadata_problem({1: "v"})
    assert problem == (
        "Invalid 'metadata': keys must be strings of at most 64 characters.",
        "metadata",
        "invalid_value",
    )


def test_value_too_long() -> None:
    problem = metadata_problem({"k": "v" * (METADATA_MAX_VALUE + 1)})
    assert problem == (
        "Invalid 'metadata.k': string too long. Expected a string with maximum length 512, but got a string with "
        "length 513 instead.",
        "metadata.k",
        "string_above_max_length",
    )


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (1, "an integer"),
        (None, "null"),
        (True, "a boolean"),
        (["a"], "an array"),
        ({"a": "b"}, "an object"),
        (1.5, "a number"),
    ],
)
def test_value_not_a_string(value: object, kind: str) -> None:
    # OpenAI's words (Llama Stack's suite records them): metadata={"tags": ["tag1", "tag2"]} answers
    # "Invalid type for 'metadata.tags': expected a string, but got an array instead." (param metadata.tags)
    assert metadata_problem({"k": value}) == (
        f"Invalid type for 'metadata.k': expected a string, but got {kind} instead.",
        "metadata.k",
        "invalid_type",
    )
