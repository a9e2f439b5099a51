"""The per-key token bucket."""

from __future__ import annotations

import pytest

from api.ratelimit import TokenBuckets, retry_after_header

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_the_sustained_rate() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [buckets.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = buckets.take("k")
    assert wait == pytest.approx(0.5)
    assert retry_after_header(wait) == "1"
    clock.now += 0.5
    assert buckets.take("k") == 0.0
    assert buckets.take("other") == 0.0  # keys are limited separately
    clock.now += 100
    assert [buckets.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]  # never more than the burst
    assert buckets.take("k") > 0
