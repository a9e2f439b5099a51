"""PostgreSQL binary COPY streams built from numpy columns by numba kernels (pure, no I/O).

Writing rows one by one through psycopg's ``write_row`` cost more client CPU than the server spent
storing them. The layout (https://www.postgresql.org/docs/15/sql-copy.html, "Binary Format"): an
11-byte signature, a 32-bit flags field and a 32-bit header-extension length; per tuple a 16-bit field
count, then per field a 32-bit length (-1 for NULL) and the value in network byte order; a 16-bit -1
trailer. timestamptz travels as int8 microseconds since 2000-01-01 UTC, float8 as its IEEE bits.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from processing.kernels import F64, I32, I64

SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
TRAILER = b"\xff\xff"
PG_EPOCH_US = 946_684_800_000_000

U8 = np.ndarray[tuple[int], np.dtype[np.uint8]]

# Readings: series_id int4, ts timestamptz, value float8, gateway_id text, received_at timestamptz,
# audit_batch int8.
READING_FIELDS = 6
# Aggregates: agg_key_id int4, bucket timestamptz, total float8, n int4, max_value float8 (NULL when
# NaN), n_measured, n_estimated, n_substituted, n_flagged, n_uncalibrated, late_corrections int4.
AGG_FIELDS = 11
AGG_COUNTS = 7  # n and the six counters after max_value, in that order


@njit(cache=True, inline="always")
def _put_i16(out: U8, pos: int, v: int) -> int:
    out[pos] = (v >> 8) & 0xFF
    out[pos + 1] = v & 0xFF
    return pos + 2


@njit(cache=True, inline="always")
def _put_i32(out: U8, pos: int, v: int) -> int:
    for k in range(4):
        out[pos + k] = (v >> (24 - 8 * k)) & 0xFF
    return pos + 4


@njit(cache=True, inline="always")
def _put_i64(out: U8, pos: int, v: int) -> int:
    for k in range(8):
        out[pos + k] = (v >> (56 - 8 * k)) & 0xFF
    return pos + 8


@njit(cache=True)
def _encode_readings(
    series_id: I32, ts_us: I64, value_bits: I64, gateway: I32, gw_bytes: U8, gw_offsets: I64,
    received_us: I64, audit_batch: I64,
) -> U8:  # fmt: skip
    n = series_id.size
    size = 11 + 8 + 2
    for i in range(n):
        g = gateway[i]
        size += 2 + (4 + 4) + 3 * (4 + 8) + (4 + gw_offsets[g + 1] - gw_offsets[g]) + (4 + 8)
    out = np.empty(size, np.uint8)
    pos = 19  # the signature is copied in by the wrapper
    for i in range(n):
        pos = _put_i16(out, pos, READING_FIELDS)
        pos = _put_i32(out, pos, 4)
        pos = _put_i32(out, pos, series_id[i])
        pos = _put_i32(out, pos, 8)
        pos = _put_i64(out, pos, ts_us[i])
        pos = _put_i32(out, pos, 8)
        pos = _put_i64(out, pos, value_bits[i])
        g = gateway[i]
        start, end = gw_offsets[g], gw_offsets[g + 1]
        pos = _put_i32(out, pos, end - start)
        for b in range(start, end):
            out[pos] = gw_bytes[b]
            pos += 1
        pos = _put_i32(out, pos, 8)
        pos = _put_i64(out, pos, received_us[i])
        pos = _put_i32(out, pos, 8)
        pos = _put_i64(out, pos, audit_batch[i])
    _put_i16(out, pos, -1)
    return out


@njit(cache=True)
def _encode_aggregates(
    key_id: I32, bucket_us: I64, total_bits: I64, max_bits: I64, max_null: np.ndarray, counts: I64
) -> U8:
    n = key_id.size
    nulls = 0
    for i in range(n):
        nulls += max_null[i]
    size = 19 + 2 + n * (2 + (4 + 4) + 2 * (4 + 8) + (4 + 8) + AGG_COUNTS * (4 + 4)) - nulls * 8
    out = np.empty(size, np.uint8)
    pos = 19
    for i in range(n):
        pos = _put_i16(out, pos, AGG_FIELDS)
        pos = _put_i32(out, pos, 4)
        pos = _put_i32(out, pos, key_id[i])
        pos = _put_i32(out, pos, 8)
        pos = _put_i64(out, pos, bucket_us[i])
        pos = _put_i32(out, pos, 8)
        pos = _put_i64(out, pos, total_bits[i])
        pos = _put_i32(out, pos, 4)
        pos = _put_i32(out, pos, counts[0, i])
        if max_null[i]:
            pos = _put_i32(out, pos, -1)
        else:
            pos = _put_i32(out, pos, 8)
            pos = _put_i64(out, pos, max_bits[i])
        for c in range(1, AGG_COUNTS):
            pos = _put_i32(out, pos, 4)
            pos = _put_i32(out, pos, counts[c, i])
    _put_i16(out, pos, -1)
    return out


def _with_signature(out: U8) -> bytes:
    out[:19] = np.frombuffer(SIGNATURE, np.uint8)
    return out.tobytes()


def ms_to_pg_us(ms: I64) -> I64:
    return ms * 1000 - PG_EPOCH_US


class TextTable:
    """Distinct strings of a text column, concatenated, so a kernel can copy them by index."""

    def __init__(self, values: list[str]) -> None:
        encoded = [v.encode() for v in values]
        self.offsets: I64 = np.zeros(len(encoded) + 1, np.int64)
        self.offsets[1:] = np.cumsum([len(e) for e in encoded])
        self.data: U8 = np.frombuffer(b"".join(encoded), np.uint8).copy()


def encode_readings(
    series_id: I32, ts_ms: I64, value: F64, gateway: I32, gateways: TextTable, received_ms: I64,
    audit_batch: I64,
) -> bytes:  # fmt: skip
    """A complete binary COPY stream of reading rows; `gateway` indexes `gateways`."""
    out = _encode_readings(
        series_id.astype(np.int32), ms_to_pg_us(ts_ms), np.ascontiguousarray(value, np.float64).view(np.int64),
        gateway.astype(np.int32), gateways.data, gateways.offsets, ms_to_pg_us(received_ms),
        audit_batch.astype(np.int64),
    )  # fmt: skip
    return _with_signature(out)


def encode_aggregates(key_id: I32, bucket_ms: I64, total: F64, max_value: F64, counts: I64) -> bytes:
    """A complete binary COPY stream of aggregate rows. `counts` is (7, n): n, n_measured, n_estimated,
    n_substituted, n_flagged, n_uncalibrated, late_corrections. A NaN maximum is NULL."""
    max_value = np.ascontiguousarray(max_value, np.float64)
    max_null = np.isnan(max_value).astype(np.uint8)
    out = _encode_aggregates(
        key_id.astype(np.int32), ms_to_pg_us(bucket_ms), np.ascontiguousarray(total, np.float64).view(np.int64),
        np.where(max_null, 0.0, max_value).view(np.int64), max_null, np.ascontiguousarray(counts, np.int64),
    )  # fmt: skip
    return _with_signature(out)


def warm_up() -> None:
    """Compile (or load from cache) both encoders before the first poll."""
    one_i32, one_i64, one_f64 = np.zeros(1, np.int32), np.zeros(1, np.int64), np.zeros(1)
    encode_readings(one_i32, one_i64, one_f64, one_i32, TextTable(["g"]), one_i64, one_i64)
    encode_aggregates(one_i32, one_i64, one_f64, one_f64, np.zeros((AGG_COUNTS, 1), np.int64))
