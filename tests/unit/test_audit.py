"""The canonical rows digest and the chain hash (processing.audit); the retention floor the owner writes."""

from __future__ import annotations

import hashlib
from datetime import date

import numpy as np
import pytest

from meterflow.settings import ProcessingSettings, Settings
from processing.audit import MS_PER_DAY, ZERO_CHAIN, Key, chain_digest, rows_digest, utc_day
from processing.privileges import retention_floor_days

KEYS: list[Key] = [
    ("acme", "m-2", "energy_import_kwh"),
    ("acme", "m-1", "power_kw"),
    ("acme", "m-1", "energy_import_kwh"),
    ("beta", "m-1", "power_kw"),
]
T0 = 1_763_683_200_000  # 2025-11-21T00:00:00Z


def _rows(n: int = 200, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    series = rng.integers(0, len(KEYS), n).astype(np.int32)
    ts = T0 + np.arange(n, dtype=np.int64) * 15_000
    values = rng.normal(100.0, 30.0, n)
    return series, ts, values


def _reference(keys: list[Key], series: np.ndarray, ts: np.ndarray, values: np.ndarray) -> bytes:
    """The canonical form written out row by row, as a third party would."""
    rows = sorted((keys[s], int(t), float(v)) for s, t, v in zip(series, ts, values, strict=True))
    out = b""
    for key in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == key]
        out += ("/".join(key) + "\n").encode() + len(mine).to_bytes(8, "little", signed=True)
        out += b"".join(int(r[1]).to_bytes(8, "little", signed=True) for r in mine)
        out += np.array([r[2] for r in mine], dtype="<f8").tobytes()
    return hashlib.sha256(out).digest()


def test_digest_matches_the_documented_canonical_form() -> None:
    series, ts, values = _rows()
    assert rows_digest(KEYS, series, ts, values) == _reference(KEYS, series, ts, values)


def test_digest_ignores_row_order() -> None:
    series, ts, values = _rows()
    expected = rows_digest(KEYS, series, ts, values)
    rng = np.random.default_rng(7)
    for _ in range(5):
        p = rng.permutation(len(series))
        assert rows_digest(KEYS, series[p], ts[p], values[p]) == expected


def test_digest_ignores_key_table_order_and_unused_or_repeated_keys() -> None:
    series, ts, values = _rows()
    expected = rows_digest(KEYS, series, ts, values)
    # The same rows against a key table in another order, with an unused and a repeated key.
    table: list[Key] = [("zeta", "unused", "x"), *reversed(KEYS), KEYS[1]]
    remap = np.array([len(KEYS) - i for i in range(len(KEYS))], dtype=np.int32)
    moved = remap[series]
    moved[::3] = np.where(series[::3] == 1, len(table) - 1, moved[::3])
    assert rows_digest(table, moved, ts, values) == expected


def test_digest_sees_any_changed_value_timestamp_or_key() -> None:
    series, ts, values = _rows()
    expected = rows_digest(KEYS, series, ts, values)
    for i in (0, 57, len(series) - 1):
        v = values.copy()
        v[i] = np.nextafter(v[i], np.inf)  # one ulp
        assert rows_digest(KEYS, series, ts, v) != expected
        t = ts.copy()
        t[i] += 1
        assert rows_digest(KEYS, series, t, values) != expected
        s = series.copy()
        s[i] = (s[i] + 1) % len(KEYS)
        assert rows_digest(KEYS, s, ts, values) != expected
    renamed = list(KEYS)
    renamed[int(series[0])] = ("acme", "m-9", KEYS[int(series[0])][2])
    assert rows_digest(renamed, series, ts, values) != expected


def test_digest_sees_a_deleted_or_inserted_row() -> None:
    series, ts, values = _rows()
    expected = rows_digest(KEYS, series, ts, values)
    keep = np.ones(len(series), dtype=bool)
    keep[42] = False
    assert rows_digest(KEYS, series[keep], ts[keep], values[keep]) != expected
    assert (
        rows_digest(
            KEYS,
            np.append(series, np.int32(0)),
            np.append(ts, ts[-1] + 1),
            np.append(values, 0.0),
        )
        != expected
    )


def test_negative_zero_and_nan_are_digested_by_their_bits() -> None:
    series = np.zeros(2, dtype=np.int32)
    ts = np.array([T0, T0 + 1], dtype=np.int64)
    zeros = rows_digest(KEYS, series, ts, np.array([0.0, 0.0]))
    assert rows_digest(KEYS, series, ts, np.array([0.0, -0.0])) != zeros
    assert rows_digest(KEYS, series, ts, np.array([0.0, np.nan])) != zeros


def test_empty_digest_and_bad_input() -> None:
    empty = rows_digest(KEYS, np.empty(0, np.int32), np.empty(0, np.int64), np.empty(0, np.float64))
    assert empty == hashlib.sha256().digest()
    with pytest.raises(ValueError, match="lengths"):
        rows_digest(KEYS, np.zeros(2, np.int32), np.zeros(1, np.int64), np.zeros(2))
    with pytest.raises(IndexError):
        rows_digest(KEYS, np.array([len(KEYS)], np.int32), np.zeros(1, np.int64), np.zeros(1))


ROWS_SHA = hashlib.sha256(b"rows").digest()


def _link(
    prev: bytes = ZERO_CHAIN,
    partition: int = 3,
    day: date = date(2025, 11, 21),
    seq: int = 1,
    row_count: int = 10,
    audit_batch: int = 99,
) -> bytes:
    return chain_digest(
        prev,
        ROWS_SHA,
        topic="meterflow.readings.v1",
        partition=partition,
        day=day,
        seq=seq,
        row_count=row_count,
        audit_batch=audit_batch,
    )


def test_chain_binds_predecessor_rows_and_place() -> None:
    first = _link()
    link = b"meterflow.readings.v1\n3\n2025-11-21\n1\n10\n99\n"
    assert first == hashlib.sha256(ZERO_CHAIN + ROWS_SHA + link).digest()
    others = [
        _link(prev=first),
        _link(partition=4),
        _link(day=date(2025, 11, 22)),
        _link(seq=2),
        _link(row_count=11),
        _link(audit_batch=98),
    ]
    assert first not in others
    assert len(set(others)) == len(others)


def test_utc_day_numbers() -> None:
    assert utc_day(T0 // MS_PER_DAY) == date(2025, 11, 21)
    assert utc_day(-1) == date(1969, 12, 31)


@pytest.mark.parametrize(("configured", "floor"), [(None, 1827), (30, 30), (4000, 4000)])
def test_the_retention_floor_is_five_years_unless_the_owner_configures_a_retention(
    configured: int | None, floor: int
) -> None:
    settings = Settings(processing=ProcessingSettings(raw_retention_days=configured))
    assert retention_floor_days(settings) == floor
