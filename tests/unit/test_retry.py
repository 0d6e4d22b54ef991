"""Retry decisions for upstream calls: which statuses, how long Retry-After says, backoff with jitter."""

from __future__ import annotations

import email.utils
import random

import pytest

from batchyard.domain.retry import MAX_RETRY_AFTER, backoff_delay, is_retryable_status, parse_retry_after

NOW = 1_700_000_000.0


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504, 529, 599])
def test_retryable_statuses(status: int) -> None:
    assert is_retryable_status(status)


@pytest.mark.parametrize("status", [200, 201, 204, 301, 400, 401, 403, 404, 405, 413, 422, 499])
def test_not_retryable_statuses(status: int) -> None:
    assert not is_retryable_status(status)


# -- parse_retry_after ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [None, {}, {"content-type": "application/json"}])
def test_no_retry_after(headers: dict[str, str] | None) -> None:
    assert parse_retry_after(headers, NOW) is None


@pytest.mark.parametrize(("value", "seconds"), [("1500", 1.5), ("0", 0.0), ("250.5", 0.2505), ("-20", 0.0)])
def test_retry_after_ms(value: str, seconds: float) -> None:
    assert parse_retry_after({"retry-after-ms": value}, NOW) == pytest.approx(seconds)


def test_retry_after_ms_wins_over_retry_after() -> None:
    assert parse_retry_after({"retry-after-ms": "100", "retry-after": "30"}, NOW) == pytest.approx(0.1)


def test_invalid_retry_after_ms_falls_back_to_retry_after() -> None:
    assert parse_retry_after({"retry-after-ms": "soon", "retry-after": "3"}, NOW) == 3.0


def test_invalid_retry_after_ms_alone_is_none() -> None:
    assert parse_retry_after({"retry-after-ms": "soon"}, NOW) is None


@pytest.mark.parametrize(("value", "seconds"), [("3", 3.0), ("0", 0.0), ("1.25", 1.25), ("-5", 0.0)])
def test_retry_after_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after({"retry-after": value}, NOW) == seconds


def test_retry_after_http_date_in_the_future() -> None:
    date = email.utils.formatdate(NOW + 42, usegmt=True)
    assert parse_retry_after({"retry-after": date}, NOW) == pytest.approx(42.0)


def test_retry_after_http_date_in_the_past_is_zero() -> None:
    date = email.utils.formatdate(NOW - 3600, usegmt=True)
    assert parse_retry_after({"retry-after": date}, NOW) == 0.0


def test_retry_after_http_date_with_offset() -> None:
    # 1_700_000_000 is Tue, 14 Nov 2023 22:13:20 GMT; the same instant written at +0100, plus 10 s.
    assert parse_retry_after({"retry-after": "Tue, 14 Nov 2023 23:13:30 +0100"}, NOW) == pytest.approx(10.0)


@pytest.mark.parametrize("value", ["", "soon", "Someday, 99 Foo 2023"])
def test_retry_after_garbage_is_none(value: str) -> None:
    assert parse_retry_after({"retry-after": value}, NOW) is None


# -- backoff_delay --------------------------------------------------------------------------------------------


class FixedRandom(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def test_zero_retry_after_backs_off_from_a_short_base() -> None:
    assert backoff_delay(0, 0.0, rng=FixedRandom(0.0)) == pytest.approx(0.05)
    assert backoff_delay(2, 0.0, rng=FixedRandom(0.0)) == pytest.approx(0.2)
    assert backoff_delay(20, 0.0, rng=FixedRandom(0.0)) == 8.0  # still capped


def test_retry_after_is_used_as_is() -> None:
    assert backoff_delay(0, 2.5) == 2.5
    assert backoff_delay(0, 0.01) == 0.01
    assert backoff_delay(3, MAX_RETRY_AFTER) == MAX_RETRY_AFTER


def test_retry_after_over_the_cap_falls_back_to_backoff() -> None:
    assert backoff_delay(0, MAX_RETRY_AFTER + 1, rng=FixedRandom(0.0)) == 0.5
    assert backoff_delay(10, 3600.0, rng=FixedRandom(0.0)) == 8.0


@pytest.mark.parametrize(
    ("retries", "delay"), [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0), (20, 8.0)]
)
def test_exponential_backoff_without_jitter(retries: int, delay: float) -> None:
    assert backoff_delay(retries, None, rng=FixedRandom(0.0)) == delay


def test_jitter_takes_off_up_to_a_quarter() -> None:
    assert backoff_delay(2, None, rng=FixedRandom(0.5)) == pytest.approx(2.0 * 0.875)
    assert backoff_delay(2, None, rng=FixedRandom(0.999999)) == pytest.approx(1.5, rel=1e-5)


def test_jittered_delays_stay_within_bounds_and_vary() -> None:
    rng = random.Random(1234)
    delays = [backoff_delay(1, None, rng=rng) for _ in range(200)]
    assert all(0.75 < d <= 1.0 for d in delays)
    assert len(set(delays)) > 100


def test_base_and_cap_are_parameters() -> None:
    assert backoff_delay(3, None, base=1.0, cap=100.0, rng=FixedRandom(0.0)) == 8.0
    assert backoff_delay(3, None, base=1.0, cap=5.0, rng=FixedRandom(0.0)) == 5.0


def test_default_rng_is_bounded() -> None:
    for _ in range(50):
        assert 6.0 < backoff_delay(10, None) <= 8.0


def test_backoff_after_very_many_tries_stays_at_the_cap() -> None:
    # A loop backing off through a day-long outage counts tens of thousands of failures (2.0**20000 overflows).
    assert backoff_delay(20_000, None, cap=5.0, rng=random.Random(1)) <= 5.0
