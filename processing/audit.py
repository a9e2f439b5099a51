"""The audit chain: every written batch's SHA-256 digest, chained per Kafka partition and UTC day.

The processor COPYs a batch's raw readings into ``readings`` with one ``audit_batch`` number per Kafka
partition and calls :meth:`AuditLog.append` in the same transaction. For each UTC day the rows touch,
that appends one ``audit_chain`` entry::

    rows_sha256  = rows_digest(rows of this batch, partition and day)
    chain_sha256 = SHA-256(prev chain_sha256 || rows_sha256 || link text)

``prev`` is the entry with the previous ``seq`` in the same (topic, partition, day) chain, or 32 zero
bytes for ``seq`` 1. The link text binds an entry to its place in its chain, so neither can be moved::

    f"{topic}\\n{partition}\\n{day:%Y-%m-%d}\\n{seq}\\n{row_count}\\n{audit_batch}\\n"  (UTF-8)

:func:`verify` recomputes every non-retired entry from the rows that carry its ``audit_batch`` on its
day, and every link. A retired entry (retention dropped its day) whose rows are still stored is a
failure, not a skip: retiring is how a day would otherwise be hidden from verification. ``readings`` has no partition column, so an ``audit_batch`` number must belong to
one partition's entry per day: :meth:`AuditLog.append` refuses to reuse one.

Chains are per day so that retention, which drops whole days, retires whole chains and never cuts one.
The digest covers tenant, device, metric, timestamp and value; ``gateway_id`` and the receive times
are transport metadata and are not covered.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any

import numpy as np
import psycopg
from numpy.typing import NDArray
from psycopg import sql

log = logging.getLogger(__name__)

Key = tuple[str, str, str]

MS_PER_DAY = 86_400_000
ZERO_CHAIN = bytes(32)
_EPOCH = date(1970, 1, 1)


def rows_digest(
    keys: Sequence[Key],
    series: NDArray[np.int32],
    ts_ms: NDArray[np.int64],
    values: NDArray[np.float64],
) -> bytes:
    """SHA-256 of rows in canonical form, whatever order they come in.

    Row ``i`` is ``keys[series[i]]`` (tenant, device, metric) at ``ts_ms[i]`` with ``values[i]``. Keys are
    taken in ascending (tenant, device, metric) order by code point, rows of a key by timestamp (then
    value, so that even duplicate timestamps are canonical). Per key the digest reads the UTF-8 of
    ``tenant/device/metric\\n``, the row count as int64 little-endian, the timestamps (ms since the
    epoch) as int64 LE and the values as float64 LE. ``keys`` may hold keys no row uses; those count
    for nothing, and equal keys at two indices are one key.
    """
    n = len(series)
    if len(ts_ms) != n or len(values) != n:
        raise ValueError(f"column lengths differ: series {n}, ts_ms {len(ts_ms)}, values {len(values)}")
    digest = hashlib.sha256()
    if n == 0:
        return digest.digest()
    used, row_used = np.unique(series, return_inverse=True)
    if used[0] < 0 or used[-1] >= len(keys):
        raise IndexError(f"series index out of range 0..{len(keys) - 1}")
    used_keys = [keys[i] for i in used.tolist()]
    # Only the keys present are sorted in Python: a batch touches far fewer keys than it has rows.
    ranks = np.empty(len(used_keys), dtype=np.int64)
    distinct: list[Key] = []
    for j in sorted(range(len(used_keys)), key=used_keys.__getitem__):
        if not distinct or distinct[-1] != used_keys[j]:
            distinct.append(used_keys[j])
        ranks[j] = len(distinct) - 1
    row_rank = ranks[row_used]
    order = np.lexsort((values, ts_ms, row_rank))
    rank_sorted = row_rank[order]
    ts_sorted = np.ascontiguousarray(ts_ms[order], dtype="<i8")
    values_sorted = np.ascontiguousarray(values[order], dtype="<f8")
    starts = np.flatnonzero(np.diff(rank_sorted, prepend=-1))
    ends = np.append(starts[1:], n)
    for start, end, rank in zip(starts.tolist(), ends.tolist(), rank_sorted[starts].tolist(), strict=True):
        tenant, device, metric = distinct[rank]
        digest.update(f"{tenant}/{device}/{metric}\n".encode())
        digest.update((end - start).to_bytes(8, "little", signed=True))
        digest.update(ts_sorted[start:end].tobytes())
        digest.update(values_sorted[start:end].tobytes())
    return digest.digest()


def chain_digest(
    prev_chain: bytes,
    rows_sha256: bytes,
    *,
    topic: str,
    partition: int,
    day: date,
    seq: int,
    row_count: int,
    audit_batch: int,
) -> bytes:
    """The entry's chain hash: SHA-256 of the previous one, its rows' digest and its place."""
    link = f"{topic}\n{partition}\n{day.isoformat()}\n{seq}\n{row_count}\n{audit_batch}\n"
    return hashlib.sha256(prev_chain + rows_sha256 + link.encode()).digest()


def utc_day(day_number: int) -> date:
    return _EPOCH + timedelta(days=day_number)


def day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


class AuditError(RuntimeError):
    """The entry cannot be appended; the caller's transaction must roll back, then call forget()."""


_HEAD = """
SELECT seq, chain_sha256 FROM audit_chain
WHERE topic = %s AND kafka_partition = %s AND day = %s
ORDER BY seq DESC LIMIT 1
"""

# The guards make a stale cached head (a rolled-back transaction, or another processor that held the
# partition meanwhile) fail loudly instead of forking the chain; the primary key catches the rest.
_APPEND = """
INSERT INTO audit_chain
    (topic, kafka_partition, day, seq, audit_batch, row_count, rows_sha256, chain_sha256)
SELECT %(topic)s, %(partition)s, %(day)s, %(seq)s, %(batch)s, %(count)s, %(rows)s, %(chain)s
WHERE NOT EXISTS (SELECT 1 FROM audit_chain WHERE audit_batch = %(batch)s AND day = %(day)s)
  AND (%(seq)s::integer = 1 OR EXISTS (
        SELECT 1 FROM audit_chain
        WHERE topic = %(topic)s AND kafka_partition = %(partition)s AND day = %(day)s
          AND seq = %(seq)s::integer - 1 AND chain_sha256 = %(prev)s))
"""

_BATCH_USED = "SELECT 1 FROM audit_chain WHERE audit_batch = %s AND day = %s"


class AuditLog:
    """Appends batches to the audit chains of one Kafka topic, caching each chain's head."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._heads: dict[tuple[int, date], tuple[int, bytes]] = {}

    def forget(self, partitions: Iterable[int] | None = None) -> None:
        """Drop cached heads: of the partitions given (lost in a rebalance), or all (after a rollback)."""
        if partitions is None:
            self._heads.clear()
            return
        gone = set(partitions)
        for head in [h for h in self._heads if h[0] in gone]:
            del self._heads[head]

    async def append(
        self,
        cur: psycopg.AsyncCursor[Any],
        *,
        partition: int,
        audit_batch: int,
        keys: Sequence[Key],
        series: NDArray[np.int32],
        ts_ms: NDArray[np.int64],
        values: NDArray[np.float64],
    ) -> None:
        """Append one entry per UTC day of these rows, inside the caller's transaction.

        The rows must be exactly those this transaction inserted into ``readings`` with ``audit_batch``
        for this partition (not duplicates that ``ON CONFLICT DO NOTHING`` skipped), and
        ``audit_batch`` must not be used for another partition. The cache is updated at once; if the
        transaction then rolls back, call :meth:`forget` before appending again.
        """
        if len(series) == 0:
            return
        days, row_day = np.unique(np.floor_divide(ts_ms, MS_PER_DAY), return_inverse=True)
        for j, day_number in enumerate(days.tolist()):
            if len(days) == 1:
                day_series, day_ts, day_values = series, ts_ms, values
            else:
                mask = row_day == j
                day_series, day_ts, day_values = series[mask], ts_ms[mask], values[mask]
            await self._append_day(
                cur,
                partition=partition,
                day=utc_day(day_number),
                audit_batch=audit_batch,
                rows_sha256=rows_digest(keys, day_series, day_ts, day_values),
                row_count=len(day_series),
            )

    async def _append_day(
        self,
        cur: psycopg.AsyncCursor[Any],
        *,
        partition: int,
        day: date,
        audit_batch: int,
        rows_sha256: bytes,
        row_count: int,
    ) -> None:
        head = self._heads.get((partition, day))
        if head is None:
            await cur.execute(_HEAD, (self.topic, partition, day))
            row = await cur.fetchone()
            head = (0, ZERO_CHAIN) if row is None else (int(row[0]), bytes(row[1]))
        seq = head[0] + 1
        chain = chain_digest(
            head[1],
            rows_sha256,
            topic=self.topic,
            partition=partition,
            day=day,
            seq=seq,
            row_count=row_count,
            audit_batch=audit_batch,
        )
        await cur.execute(
            _APPEND,
            {
                "topic": self.topic,
                "partition": partition,
                "day": day,
                "seq": seq,
                "batch": audit_batch,
                "count": row_count,
                "rows": rows_sha256,
                "chain": chain,
                "prev": head[1],
            },
        )
        if cur.rowcount != 1:
            where = f"audit entry {self.topic}/{partition}/{day} seq {seq}"
            await cur.execute(_BATCH_USED, (audit_batch, day))
            if await cur.fetchone() is not None:
                raise AuditError(f"{where}: audit_batch {audit_batch} already has an entry on that day")
            raise AuditError(f"{where}: the cached chain head (seq {head[0]}) is stale")
        self._heads[(partition, day)] = (seq, chain)


# --- verification ------------------------------------------------------------------------------------


class Problem(StrEnum):
    ROWS_CHANGED = "rows_changed"  # same number of rows, different content
    ROWS_DELETED = "rows_deleted"  # fewer rows than recorded
    ROWS_ADDED = "rows_added"  # more rows than recorded
    CHAIN_BROKEN = "chain_link_broken"  # chain_sha256 does not follow from its predecessor
    BATCH_REUSED = "batch_reused"  # another entry claims the same audit_batch and day
    RETIRED_ROWS_PRESENT = "retired_rows_present"  # retired, yet rows of its batch and day are stored


@dataclass(frozen=True, slots=True)
class BrokenEntry:
    topic: str
    partition: int
    day: date
    seq: int
    audit_batch: int
    row_count: int  # recorded
    rows_found: int
    problems: tuple[Problem, ...]


@dataclass(slots=True)
class VerifyReport:
    entries_checked: int = 0
    rows_checked: int = 0
    retired_skipped: int = 0
    broken: list[BrokenEntry] = field(default_factory=list)
    # Rows no audited batch wrote (audit_batch IS NULL), per UTC day: hand inserts, or written before
    # the audit chain existed.
    unaudited_rows: dict[date, int] = field(default_factory=dict)
    # Rows whose audit_batch has no entry on their day: forged batch numbers, or a timestamp moved.
    unchained_rows: dict[date, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.broken and not self.unchained_rows and not self.unaudited_rows

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "entries_checked": self.entries_checked,
            "rows_checked": self.rows_checked,
            "retired_skipped": self.retired_skipped,
            "broken": [
                {
                    "topic": b.topic,
                    "partition": b.partition,
                    "day": b.day.isoformat(),
                    "seq": b.seq,
                    "audit_batch": b.audit_batch,
                    "row_count": b.row_count,
                    "rows_found": b.rows_found,
                    "problems": [p.value for p in b.problems],
                }
                for b in self.broken
            ],
            "unaudited_rows": {d.isoformat(): n for d, n in sorted(self.unaudited_rows.items())},
            "unchained_rows": {d.isoformat(): n for d, n in sorted(self.unchained_rows.items())},
        }


@dataclass(frozen=True, slots=True)
class _Entry:
    topic: str
    partition: int
    day: date
    seq: int
    audit_batch: int
    row_count: int
    rows_sha256: bytes
    chain_sha256: bytes
    retired: bool


def _broken_entry(entry: _Entry, rows_found: int, problems: tuple[Problem, ...]) -> BrokenEntry:
    return BrokenEntry(
        entry.topic,
        entry.partition,
        entry.day,
        entry.seq,
        entry.audit_batch,
        entry.row_count,
        rows_found,
        problems,
    )


_ENTRIES = """
SELECT topic, kafka_partition, day, seq, audit_batch, row_count, rows_sha256, chain_sha256, retired
FROM audit_chain
WHERE (%(topic)s::text IS NULL OR topic = %(topic)s)
  AND (%(partition)s::integer IS NULL OR kafka_partition = %(partition)s)
  AND (%(day)s::date IS NULL OR day = %(day)s)
ORDER BY topic, kafka_partition, day, seq
"""

# ts as microseconds, so that a timestamp moved by less than a millisecond is still seen.
_ROWS = """
COPY (
    SELECT audit_batch, tenant_id, device_id, metric, (extract(epoch FROM ts) * 1000000)::int8, value
    FROM readings
    WHERE audit_batch = ANY({batches}) AND ts >= {start} AND ts < {end}
    ORDER BY audit_batch
) TO STDOUT (FORMAT BINARY)
"""
_ROW_TYPES = ["int8", "text", "text", "text", "int8", "float8"]

# Rows per day and kind: unaudited (no batch), unchained (no entry of their batch and day: live is
# NULL), chained only by retired entries (live false, per batch), or chained (live true).
_STRAY = """
SELECT r.day, r.audit_batch IS NULL, a.live, CASE WHEN NOT a.live THEN r.audit_batch END, count(*)
FROM (SELECT audit_batch, (ts AT TIME ZONE 'UTC')::date AS day FROM reading_values {where}) r
LEFT JOIN (SELECT audit_batch, day, bool_or(NOT retired) AS live FROM audit_chain GROUP BY audit_batch, day) a
       ON a.audit_batch = r.audit_batch AND a.day = r.day
GROUP BY 1, 2, 3, 4
"""


@dataclass(slots=True)
class _Found:
    count: int
    digest: bytes
    sub_millisecond: bool


async def verify(
    conn: psycopg.AsyncConnection[Any],
    *,
    topic: str | None = None,
    day: date | None = None,
    partition: int | None = None,
) -> VerifyReport:
    """Recompute the audit entries in scope and their chain links; count rows outside any entry.

    Runs in one read-only repeatable-read transaction, so batches committed meanwhile are either wholly
    seen or not at all; ``conn`` must be idle. Unaudited and unchained rows are counted on ``day``, or on
    the days of the entries in scope when only ``topic`` or ``partition`` is given, or on every day.
    """
    report = VerifyReport()
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        cur = await conn.execute(_ENTRIES, {"topic": topic, "partition": partition, "day": day})
        entries = [
            _Entry(str(t), int(p), d, int(s), int(b), int(n), bytes(rs), bytes(cs), bool(r))
            for t, p, d, s, b, n, rs, cs, r in await cur.fetchall()
        ]
        problems: dict[_Entry, list[Problem]] = defaultdict(list)
        for entry in _broken_links(entries):
            problems[entry].append(Problem.CHAIN_BROKEN)
        live = [e for e in entries if not e.retired]
        report.retired_skipped = len(entries) - len(live)
        report.entries_checked = len(live)
        by_day: dict[date, dict[int, _Entry]] = defaultdict(dict)
        for entry in live:
            if entry.audit_batch in by_day[entry.day]:
                problems[entry].append(Problem.BATCH_REUSED)
            else:
                by_day[entry.day][entry.audit_batch] = entry
        found_counts: dict[_Entry, int] = {}
        for entry_day, batches in sorted(by_day.items()):
            found = await _recompute_day(conn, entry_day, list(batches))
            for batch, entry in batches.items():
                got = found.get(batch, _Found(0, b"", False))
                found_counts[entry] = got.count
                report.rows_checked += got.count
                if got.count < entry.row_count:
                    problems[entry].append(Problem.ROWS_DELETED)
                elif got.count > entry.row_count:
                    problems[entry].append(Problem.ROWS_ADDED)
                elif got.digest != entry.rows_sha256 or got.sub_millisecond:
                    problems[entry].append(Problem.ROWS_CHANGED)
        for entry in live:
            if problems.get(entry):
                report.broken.append(_broken_entry(entry, found_counts.get(entry, 0), tuple(problems[entry])))
        if day is not None:
            stray_days: list[date] | None = [day]
        elif topic is not None or partition is not None:
            stray_days = sorted({e.day for e in entries})
        else:
            stray_days = None
        retired_rows = await _count_stray_rows(conn, stray_days, report)
        for entry in entries:
            found_retired = retired_rows.get((entry.day, entry.audit_batch), 0) if entry.retired else 0
            if found_retired:
                report.broken.append(_broken_entry(entry, found_retired, (Problem.RETIRED_ROWS_PRESENT,)))
    for b in report.broken:
        log.warning(
            "audit entry %s/%s/%s seq %d (batch %d) broken: %s",
            b.topic,
            b.partition,
            b.day,
            b.seq,
            b.audit_batch,
            ", ".join(b.problems),
        )
    return report


def _broken_links(entries: Sequence[_Entry]) -> list[_Entry]:
    """Entries (retired ones included, as predecessors) whose chain hash does not follow."""
    chains: dict[tuple[str, int, date], dict[int, _Entry]] = defaultdict(dict)
    for entry in entries:
        chains[(entry.topic, entry.partition, entry.day)][entry.seq] = entry
    broken = []
    for chain in chains.values():
        for seq, entry in chain.items():
            if entry.retired:
                continue
            prev = ZERO_CHAIN if seq == 1 else chain[seq - 1].chain_sha256 if seq - 1 in chain else None
            expected = None
            if prev is not None:
                expected = chain_digest(
                    prev,
                    entry.rows_sha256,
                    topic=entry.topic,
                    partition=entry.partition,
                    day=entry.day,
                    seq=seq,
                    row_count=entry.row_count,
                    audit_batch=entry.audit_batch,
                )
            if expected != entry.chain_sha256:
                broken.append(entry)
    return broken


async def _recompute_day(
    conn: psycopg.AsyncConnection[Any], day: date, batches: list[int]
) -> dict[int, _Found]:
    """Each batch's rows on this day, digested as the processor digested them."""
    query = sql.SQL(_ROWS).format(
        batches=sql.Literal(batches),
        start=sql.Literal(day_start(day)),
        end=sql.Literal(day_start(day) + timedelta(days=1)),
    )
    found: dict[int, _Found] = {}
    current: int | None = None
    key_index: dict[Key, int] = {}
    series: list[int] = []
    ts_us: list[int] = []
    values: list[float] = []

    def close_batch() -> None:
        if current is None:
            return
        ts = np.array(ts_us, dtype=np.int64)
        found[current] = _Found(
            count=len(series),
            digest=rows_digest(
                list(key_index),
                np.array(series, dtype=np.int32),
                ts // 1000,
                np.array(values, dtype=np.float64),
            ),
            sub_millisecond=bool(np.any(ts % 1000)),
        )

    async with conn.cursor() as cur, cur.copy(query) as copy:
        copy.set_types(_ROW_TYPES)
        async for batch, tenant, device, metric, us, value in copy.rows():
            if batch != current:
                close_batch()
                current, key_index, series, ts_us, values = batch, {}, [], [], []
            series.append(key_index.setdefault((tenant, device, metric), len(key_index)))
            ts_us.append(us)
            values.append(value)
    close_batch()
    return found


async def _count_stray_rows(
    conn: psycopg.AsyncConnection[Any], days: list[date] | None, report: VerifyReport
) -> dict[tuple[date, int], int]:
    """Count unaudited and unchained rows into ``report``; return the rows only retired entries chain."""
    wheres: list[sql.Composable]
    if days is None:
        wheres = [sql.SQL("")]
    else:
        wheres = [
            sql.SQL("WHERE ts >= {} AND ts < {}").format(
                sql.Literal(day_start(d)), sql.Literal(day_start(d) + timedelta(days=1))
            )
            for d in days
        ]
    retired_rows: dict[tuple[date, int], int] = {}
    for where in wheres:
        cur = await conn.execute(sql.SQL(_STRAY).format(where=where))
        for stray_day, unaudited, live, retired_batch, count in await cur.fetchall():
            if unaudited:
                report.unaudited_rows[stray_day] = int(count)
            elif live is None:
                report.unchained_rows[stray_day] = int(count)
            elif not live:
                retired_rows[(stray_day, int(retired_batch))] = int(count)
    return retired_rows
