"""Per-gateway budgets of dead-letter bytes: one misbehaving gateway cannot fill the dead-letter topic.

Pure: no I/O; the caller passes the clock. Each gateway has a token bucket holding up to a minute's
budget and refilled evenly. A dead letter is written while its gateway's bucket is not empty and its size
is then taken out, so the bucket may go into debt by one record: a gateway writes at most its budget
per minute plus one record. While the bucket is empty the gateway's dead letters are only counted, and
the caller announces that once a minute per gateway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

ANNOUNCE_EVERY_S: Final = 60.0
# Gateways tracked; beyond it every bucket starts over full (a fleet is far smaller, and the broker's
# ACL lets only registered gateways publish).
MAX_GATEWAYS: Final = 100_000

GatewayKey = tuple[str | None, str | None]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float
    announced_at: float | None = None


class DeadLetterBudget:
    def __init__(self, bytes_per_min: int, *, max_gateways: int = MAX_GATEWAYS) -> None:
        self._capacity = float(bytes_per_min)
        self._rate = bytes_per_min / 60.0
        self._max_gateways = max_gateways
        self._buckets: dict[GatewayKey, _Bucket] = {}

    def _bucket(self, key: GatewayKey, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_gateways:
                self._buckets.clear()
            bucket = self._buckets[key] = _Bucket(self._capacity, now)
        else:
            bucket.tokens = min(self._capacity, bucket.tokens + (now - bucket.at) * self._rate)
            bucket.at = now
        return bucket

    def has_room(self, key: GatewayKey, now: float) -> bool:
        return self._bucket(key, now).tokens > 0

    def spend(self, key: GatewayKey, size: int, now: float) -> None:
        self._bucket(key, now).tokens -= size

    def announce(self, key: GatewayKey, now: float) -> bool:
        """Whether the gateway's exhausted budget should be announced now (once per minute)."""
        bucket = self._bucket(key, now)
        if bucket.announced_at is not None and now - bucket.announced_at < ANNOUNCE_EVERY_S:
            return False
        bucket.announced_at = now
        return True
