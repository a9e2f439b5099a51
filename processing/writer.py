"""One poll of decoded readings -> one database transaction.

In order: de-duplicate within the poll; readings newer than anything stored for their series are copied
straight into ``readings``, older ones are inserted unless already stored (those are the duplicates);
registers become intervals (kernels) and intervals become bucket deltas; a late register read corrects
the stretch between its stored neighbours (bounded recomputation: only that stretch); instantaneous
readings add to sums, counts and maxima; deltas roll up to sites, enterprises and VPPs by the membership
valid at each bucket; then the audit entry and the Kafka offsets. Per-series state changes only after
the commit, so a failed transaction leaves nothing half-applied.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from meterflow.settings import Settings
from processing import kernels, pgcopy, rollup, store
from processing.columns import Columns
from processing.kernels import F64, I8, I32, I64, NO_TS, RegisterState
from processing.keys import KeyIds
from processing.registry import RegistryView, SeriesKey
from processing.series import KIND_INSTANTANEOUS, KIND_REGISTER, SeriesTable

log = logging.getLogger(__name__)

WIDTHS: tuple[tuple[str, int], ...] = (("agg_1m", 60_000), ("agg_15m", 900_000), ("agg_1h", 3_600_000))


class AuditAppender(Protocol):
    async def append(
        self,
        cur: store.Cur,
        *,
        partition: int,
        audit_batch: int,
        keys: Sequence[SeriesKey],
        series: I32,
        ts_ms: I64,
        values: F64,
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class Conflict:
    """A duplicate of a (series, ts) with another value than the one kept (stored, or first in the poll)."""

    record: int  # index into the poll's records
    key: SeriesKey
    ts_ms: int
    kept: float
    value: float


@dataclass(slots=True)
class BatchOutcome:
    readings: int = 0
    inserted: int = 0
    duplicates: int = 0  # conflicting ones included
    late: int = 0
    flags: Counter[str] = field(default_factory=Counter)
    aggregate_rows: int = 0
    conflicts: list[Conflict] = field(default_factory=list)


Parts = dict[str, list[rollup.Part]]  # per aggregate table


class BatchWriter:
    def __init__(
        self,
        settings: Settings,
        series: SeriesTable,
        registry: RegistryView,
        audit: AuditAppender | None,
        key_ids: KeyIds,
        *,
        group: str,
        topic: str,
    ) -> None:
        self.settings = settings
        self.series = series
        self.registry = registry
        self.audit = audit
        self.key_ids = key_ids
        self.group = group
        self.topic = topic
        p = settings.processing
        self.max_gap_ms = int(p.max_interp_gap_s * 1000)
        self.margin = p.plausibility_margin
        self.entities = rollup.EntityIndex()
        # In-order register reads of a poll, bucketed at every width by one fused kernel call.
        self.bucketer = kernels.RegisterBucketer(tuple(width for _, width in WIDTHS), self.max_gap_ms)

    async def load_unknown_series(self, conn: store.Conn, series: I32) -> None:
        t = self.series
        unknown = np.unique(series[~t.known[series]])
        if unknown.size == 0:
            return
        keys = [t.keys[i] for i in unknown.tolist()]
        await self.registry.ensure(conn, {(k[0], k[1]) for k in keys})
        unresolved = unknown[t.db_id[unknown] < 0]
        if unresolved.size:
            new_keys = [t.keys[i] for i in unresolved.tolist()]
            ids = await self.key_ids.series_ids(new_keys)
            t.db_id[unresolved] = ids
            t.by_db_id.update(zip(ids, unresolved.tolist(), strict=True))
            t.agg_id[unresolved] = await self.key_ids.agg_ids([("device", *k) for k in new_keys])
        states = await store.load_series_state(conn, t.db_id[unknown].tolist())
        for i, key, (newest, anchor_ts, anchor_value) in zip(unknown.tolist(), keys, states, strict=True):
            t.last_ts[i] = NO_TS if newest is None else newest
            if anchor_ts is not None and anchor_value is not None and t.kind[i] == KIND_REGISTER:
                install = self.registry.install_read_at(key, anchor_ts)
                t.state.anchor_ts[i] = anchor_ts
                t.state.anchor_val[i] = anchor_value if install is None else install
            t.known[i] = True

    async def write(self, conn: store.Conn, cols: Columns, next_offsets: Mapping[int, int]) -> BatchOutcome:
        t = self.series
        out = BatchOutcome(readings=int(cols.series.size))
        await self.load_unknown_series(conn, cols.series)
        t.refresh_params(self.registry, margin=self.margin)
        self._apply_new_exchanges()

        order = np.lexsort((cols.ts, cols.series))
        s, ts, value, rec = cols.series[order], cols.ts[order], cols.value[order], cols.record[order]
        first = np.ones(s.size, np.bool_)
        first[1:] = (s[1:] != s[:-1]) | (ts[1:] != ts[:-1])
        out.duplicates += int(s.size - first.sum())
        if not first.all():
            # The stable sort keeps arrival order among equal keys: the first to arrive is kept.
            kept = np.maximum.accumulate(np.where(first, np.arange(s.size), 0))
            for i in np.flatnonzero(value != value[kept]).tolist():
                out.conflicts.append(
                    Conflict(int(rec[i]), t.keys[s[i]], int(ts[i]), float(value[kept[i]]), float(value[i]))
                )
        s, ts, value, rec = s[first], ts[first], value[first], rec[first]
        fresh = ts > t.last_ts[s]

        part = cols.record_partition[rec]
        async with conn.transaction(), conn.cursor() as cur:
            # One audit batch per partition: each partition's chain verifies its own rows.
            partitions = np.unique(part).tolist()
            audit_batches = dict(
                zip(partitions, await store.next_audit_batches(cur, len(partitions)), strict=True)
            )
            audit_ids = np.zeros(s.size, np.int64)
            for p, batch_id in audit_batches.items():
                audit_ids[part == p] = batch_id
            gateways = pgcopy.TextTable(cols.record_gateway)
            state = t.state.copy()
            deltas: Parts = {table: [] for table, _ in WIDTHS}
            flag_rows: list[tuple[str, str, str, int, str]] = []
            is_register = t.kind[s] == KIND_REGISTER
            is_instantaneous = t.kind[s] == KIND_INSTANTANEOUS
            # A register read older than the newest stored one may change how stored reads after it
            # were judged (a flagged drop may have been a meter exchange), so only fresh reads are
            # booked in order; the others take the replay path below.
            in_order, inst_fresh = fresh & is_register, fresh & is_instantaneous

            def book_fresh() -> None:
                self._registers(s[in_order], ts[in_order], value[in_order], state, deltas, flag_rows, out)
                if inst_fresh.any():
                    n = int(inst_fresh.sum())
                    self._instantaneous(
                        s[inst_fresh], ts[inst_fresh], value[inst_fresh], np.zeros(n, np.bool_), deltas,
                        flag_rows, out,
                    )  # fmt: skip

            # The server stores the fresh readings while a worker thread books them: both cores busy.
            # Both finish before a failure propagates: a retried poll must not find the thread still
            # inside the bucketer, whose buffers the retry would share.
            outcomes = await asyncio.gather(
                self._copy_fresh(cur, self._stream(cols, gateways, s, ts, value, rec, fresh, audit_ids)),
                asyncio.to_thread(book_fresh),
                return_exceptions=True,
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            late = np.zeros(s.size, np.bool_)
            if not fresh.all():
                inserted_old, conflicts = await store.insert_unless_stored(
                    cur, self._stream(cols, gateways, s, ts, value, rec, ~fresh, audit_ids)
                )
                if conflicts:
                    self._stored_conflicts(conflicts, s, ts, value, rec, ~fresh, out)
                if inserted_old:
                    stored_s = np.array([t.by_db_id[series_id] for series_id, _ in inserted_old], np.int64)
                    stored_ts = np.array([ts_ms for _, ts_ms in inserted_old], np.int64)
                    maybe = ~fresh
                    late[maybe] = np.isin(_pairs(s[maybe], ts[maybe]), _pairs(stored_s, stored_ts))
            inserted = fresh | late
            out.late = int(late.sum())
            out.inserted = int(inserted.sum())
            out.duplicates += int((~inserted).sum())

            behind = late & is_register
            unflag: set[tuple[str, str, str, int]] = set()
            if behind.any():
                newest = np.maximum(t.last_ts, 0)
                np.maximum.at(newest, s[inserted], ts[inserted])
                await self._late_registers(
                    cur, s[behind], ts[behind], newest, state, deltas, flag_rows, unflag, out
                )
            inst_late = late & is_instantaneous
            if inst_late.any():
                n = int(inst_late.sum())
                self._instantaneous(
                    s[inst_late],
                    ts[inst_late],
                    value[inst_late],
                    np.ones(n, np.bool_),
                    deltas,
                    flag_rows,
                    out,
                )

            await store.insert_flags(cur, [f for f in flag_rows if f[:4] not in unflag])
            await store.clear_flags(cur, sorted(unflag))
            for table, _ in WIDTHS:
                out.aggregate_rows += await self._upsert(cur, table, deltas[table])
            if self.audit is not None:
                for p in np.unique(part[inserted]).tolist():
                    sel = inserted & (part == p)
                    await self.audit.append(
                        cur, partition=int(p), audit_batch=audit_batches[p], keys=t.keys,
                        series=s[sel], ts_ms=ts[sel], values=value[sel],
                    )  # fmt: skip
            await store.save_offsets(cur, group=self.group, topic=self.topic, next_offsets=next_offsets)

        t.state = state
        if out.inserted:
            np.maximum.at(t.last_ts, s[inserted], ts[inserted])
        return out

    def _stored_conflicts(
        self, conflicts: list[tuple[int, int, float]], s: I32, ts: I64, value: F64, rec: I32,
        maybe: np.ndarray, out: BatchOutcome,
    ) -> None:  # fmt: skip
        """Name the poll's readings that duplicate a stored one with another value."""
        named = _pairs(
            np.array([self.series.by_db_id[c[0]] for c in conflicts], np.int64),
            np.array([c[1] for c in conflicts], np.int64),
        )
        rows = np.flatnonzero(maybe)
        rows = rows[np.isin(_pairs(s[rows], ts[rows]), named)]
        position = {(int(s[i]), int(ts[i])): i for i in rows.tolist()}
        for series_id, ts_ms, stored in conflicts:
            i = position[(self.series.by_db_id[series_id], ts_ms)]
            out.conflicts.append(
                Conflict(int(rec[i]), self.series.keys[s[i]], ts_ms, stored, float(value[i]))
            )

    def _apply_new_exchanges(self) -> None:
        t = self.series
        for key, ts_ms, install in self.registry.new_exchanges:
            i = t.index.get(key)
            # A series the next poll's decoding just added has no state yet (nor arrays).
            if i is not None and i < t.known.size and t.known[i] and t.state.anchor_ts[i] == ts_ms:
                t.state.anchor_val[i] = install
        self.registry.new_exchanges.clear()

    @staticmethod
    async def _copy_fresh(cur: store.Cur, stream: bytes) -> None:
        if len(stream) > len(pgcopy.SIGNATURE) + len(pgcopy.TRAILER):
            await store.copy_readings(cur, stream)

    def _stream(
        self, cols: Columns, gateways: pgcopy.TextTable, s: I32, ts: I64, value: F64, rec: I32,
        mask: np.ndarray, audit_ids: I64,
    ) -> bytes:  # fmt: skip
        return pgcopy.encode_readings(
            self.series.db_id[s[mask]], ts[mask], value[mask], rec[mask], gateways,
            cols.record_received_ms[rec[mask]], audit_ids[mask],
        )  # fmt: skip

    def _schedules(self, s: I32, ts: I64) -> tuple[F64 | None, F64 | None]:
        """Install reads of registered meter exchanges and multipliers, per read (None when no series in
        the poll has any)."""
        install: F64 | None = None
        multiplier: F64 | None = None
        for si in np.unique(s).tolist():
            key = self.series.keys[si]
            if key not in self.registry.exchanges and (key[0], key[1]) not in self.registry.multipliers:
                continue
            rows = np.flatnonzero(s == si)
            series_install, series_multiplier = self.registry.schedules(key, ts[rows])
            if series_install is not None:
                if install is None:
                    install = np.full(s.size, np.nan)
                install[rows] = series_install
            if series_multiplier is not None:
                if multiplier is None:
                    multiplier = np.ones(s.size)
                multiplier[rows] = series_multiplier
        return install, multiplier

    def _book_intervals(
        self,
        intervals: kernels.Intervals,
        deltas: Parts,
        *,
        series_map: I32 | None = None,
        sign: int = 1,
        late: bool = False,
        flag_series: I32 | None = None,
        flag_ts: I64 | None = None,
    ) -> None:
        series = intervals.series if series_map is None else series_map[intervals.series]
        for table, width in WIDTHS:
            c = kernels.prorate(intervals, width, self.max_gap_ms)
            fs = flag_series if flag_series is not None else np.empty(0, np.int32)
            ft = flag_ts if flag_ts is not None else np.empty(0, np.int64)
            b = kernels.reduce_by_key(
                np.concatenate([series[c.interval], fs]).astype(np.int32),
                np.concatenate([c.bucket_ms, ft - ft % width]),
                np.concatenate([c.qty, np.zeros(fs.size)]),
                np.concatenate([c.quality, np.full(fs.size, kernels.NO_QUALITY, np.int8)]),
                np.concatenate([np.zeros(c.qty.size, np.int8), np.ones(fs.size, np.int8)]),
                width,
            )
            deltas[table].append(rollup.Part(b, sign, late, rollup=True))

    def _registers(
        self,
        s: I32,
        ts: I64,
        value: F64,
        state: RegisterState,
        deltas: Parts,
        flag_rows: list[tuple[str, str, str, int, str]],
        out: BatchOutcome,
    ) -> None:
        if s.size == 0:
            return
        install, multiplier = self._schedules(s, ts)
        # Views of the bucketer's buffers, valid until its next call: this poll's `_upsert` merges (copies)
        # them before the next poll books anything.
        result = self.bucketer(
            s, ts, value, state, self.series.params, install_after=install, multiplier=multiplier
        )
        self._flags(s, ts, result.read_flag, flag_rows, out)
        for (table, _), buckets in zip(WIDTHS, result.buckets, strict=True):
            deltas[table].append(rollup.Part(buckets, 1, False, rollup=True))

    def _flags(
        self,
        s: I32,
        ts: I64,
        read_flag: I8,
        flag_rows: list[tuple[str, str, str, int, str]],
        out: BatchOutcome,
    ) -> None:
        for i in np.flatnonzero(_flagged(read_flag)).tolist():
            name = kernels.READ_FLAG_NAMES[int(read_flag[i])]
            flag_rows.append((*self.series.keys[s[i]], int(ts[i]), name))
            out.flags[name] += 1
        for code in (kernels.READ_ROLLOVER, kernels.READ_REBASELINE):
            hits = int((read_flag == code).sum())
            if hits:
                out.flags[kernels.READ_FLAG_NAMES[code]] += hits

    async def _late_registers(
        self,
        cur: store.Cur,
        s: I32,
        ts: I64,
        newest: I64,
        state: RegisterState,
        deltas: Parts,
        flag_rows: list[tuple[str, str, str, int, str]],
        unflag: set[tuple[str, str, str, int]],
        out: BatchOutcome,
    ) -> None:
        """A late read changes only the stretch from the anchor before it to the series' newest read:
        book that stretch again with the read, and subtract it as it was booked without (the kernels
        are deterministic, so that is exactly what was added before). The register then continues from
        where the replay with the read ends."""
        for si in np.unique(s).tolist():
            key = self.series.keys[si]
            late_ts = ts[s == si]
            window = await store.register_window(
                cur, int(self.series.db_id[si]), int(late_ts.min()), int(newest[si])
            )
            is_late = np.isin(np.array([r[0] for r in window], np.int64), late_ts)
            before = self._replay(
                si, [r for r, late in zip(window, is_late.tolist(), strict=True) if not late]
            )
            after = self._replay(si, window)
            end = after[2]
            state.anchor_ts[si], state.anchor_val[si] = end.anchor_ts[0], end.anchor_val[0]
            state.pending_ts[si], state.pending_val[si] = end.pending_ts[0], end.pending_val[0]
            for r_ts, intervals, _, sign in ((*before, -1), (*after, 1)):
                flagged = _flagged(intervals.read_flag)
                self._book_intervals(
                    intervals, deltas, series_map=np.array([si], np.int32), sign=sign, late=True,
                    flag_series=np.full(int(flagged.sum()), si, np.int32), flag_ts=r_ts[flagged],
                )  # fmt: skip
            was = {int(t_ms) for t_ms, f in zip(before[0], before[1].read_flag, strict=True) if _is_flag(f)}
            now = {
                int(t_ms): int(f) for t_ms, f in zip(after[0], after[1].read_flag, strict=True) if _is_flag(f)
            }
            for t_ms in was - now.keys():
                unflag.add((*key, t_ms))
            for t_ms, f in now.items():
                if t_ms not in was:
                    name = kernels.READ_FLAG_NAMES[f]
                    flag_rows.append((*key, t_ms, name))
                    out.flags[name] += 1

    def _replay(
        self, si: int, reads: list[tuple[int, float]]
    ) -> tuple[I64, kernels.Intervals, RegisterState]:
        """Run one register's reads through the kernel from a fresh anchor at the first of them."""
        key = self.series.keys[si]
        r_ts = np.array([r[0] for r in reads], np.int64)
        params = kernels.RegisterParams(
            self.series.params.register_max[si : si + 1],
            self.series.params.resolution[si : si + 1],
            self.series.params.max_rate_per_ms[si : si + 1],
        )
        install, multiplier = self.registry.schedules(key, r_ts)
        local = RegisterState.empty(1)
        intervals = kernels.registers_to_intervals(
            np.zeros(r_ts.size, np.int32), r_ts, np.array([r[1] for r in reads], np.float64),
            local, params, install_after=install, multiplier=multiplier,
        )  # fmt: skip
        return r_ts, intervals, local

    def _instantaneous(
        self,
        s: I32,
        ts: I64,
        value: F64,
        late: np.ndarray,
        deltas: Parts,
        flag_rows: list[tuple[str, str, str, int, str]],
        out: BatchOutcome,
    ) -> None:
        limit = self.series.abs_limit
        spikes = kernels.spikes(value, limit[s])
        for i in np.flatnonzero(spikes).tolist():
            flag_rows.append((*self.series.keys[s[i]], int(ts[i]), "spike"))
        if spikes.any():
            out.flags["spike"] += int(spikes.sum())
        # From 15 minutes up: a 1-minute average of readings that come every minute or less often is
        # the reading itself, which the raw table already answers.
        for table, width in WIDTHS[1:]:
            for part in (late, ~late):
                if part.any():
                    b = kernels.instantaneous_buckets(s[part], ts[part], value[part], limit, width)
                    deltas[table].append(rollup.Part(b, 1, part is late, rollup=False))

    async def _upsert(self, cur: store.Cur, table: str, parts: list[rollup.Part]) -> int:
        device = rollup.merge_parts(parts)
        if device is None:
            return 0
        t = self.series
        rollup.mark_uncalibrated(device, t, self.registry)
        # A bucket that starts after the newest stored reading of its series has no row yet (stored
        # reads only reach buckets that start at or before them), so it goes straight in; the rest, and
        # every late correction, add to what is there.
        new_row = (device.late == 0) & (device.bucket_ms > t.last_ts[device.key])
        ids = t.agg_id[device.key]
        if new_row.any():
            await store.copy_aggregates(cur, table, rollup.encode(device, ids, np.flatnonzero(new_row)))
        upserts = [rollup.encode(device, ids, np.flatnonzero(~new_row))] if not new_row.all() else []
        rows = device.key.size
        sel = np.flatnonzero(device.rollup)
        targets = rollup.rollup_targets(
            t, self.registry, self.entities, device.key[sel], device.bucket_ms[sel]
        )
        rolled = rollup.roll_up(device, [(sel[r], e) for r, e in targets])
        if rolled is not None:
            entity_ids = np.array(
                await self.key_ids.agg_ids([self.entities.keys[k] for k in rolled.key.tolist()]), np.int32
            )
            upserts.append(rollup.encode(rolled, entity_ids, np.arange(rolled.key.size)))
            rows += rolled.key.size
        if upserts:
            await store.upsert_aggregates(cur, table, upserts)
        return rows


def _pairs(series: np.ndarray, ts_ms: I64) -> np.ndarray:
    """(series, ts) pairs as one comparable value each, for set operations in numpy."""
    both = np.ascontiguousarray(np.stack([series.astype(np.int64), ts_ms], axis=1))
    return both.view(np.dtype((np.void, 16))).ravel()


_FLAGGED_READS = (kernels.READ_NEGATIVE, kernels.READ_IMPLAUSIBLE)


def _is_flag(code: int) -> bool:
    return code in _FLAGGED_READS


def _flagged(read_flag: I8) -> np.ndarray:
    """Reads VEE rejected (kept raw, never booked)."""
    return np.isin(read_flag, _FLAGGED_READS)
