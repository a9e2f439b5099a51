"""Integer ids of series (tenant, device, metric) and aggregate keys (scope, tenant, entity, metric).

Ids come from ``series`` and ``agg_keys`` (migration 0007) and are created on a connection of their own
in autocommit mode: an id is never deleted or reused, so it may outlive a poll whose transaction rolls
back, and resolving it outside that transaction keeps two processors that meet the same new site from
waiting on each other's open transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import psycopg

from processing.registry import SeriesKey

log = logging.getLogger(__name__)

AggKey = tuple[str, str, str, str]

_SERIES = (
    "series",
    "series_id",
    ("tenant_id", "device_id", "metric"),
)
_AGG = (
    "agg_keys",
    "agg_key_id",
    ("scope", "tenant_id", "entity_id", "metric"),
)


class KeyIds:
    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self._conn: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        self._series: dict[SeriesKey, int] = {}
        self._agg: dict[AggKey, int] = {}

    async def open(self) -> None:
        self._conn = await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def series_ids(self, keys: Sequence[SeriesKey]) -> list[int]:
        return await self._resolve(self._series, _SERIES, keys)

    async def agg_ids(self, keys: Sequence[AggKey]) -> list[int]:
        return await self._resolve(self._agg, _AGG, keys)

    async def _resolve(
        self,
        cache: dict[Any, int],
        shape: tuple[str, str, tuple[str, ...]],
        keys: Sequence[tuple[str, ...]],
    ) -> list[int]:
        missing = sorted({k for k in keys if k not in cache})
        if missing:
            if self._conn is None:
                raise RuntimeError("KeyIds.open() was not awaited")
            table, id_column, columns = shape
            names = ", ".join(columns)
            arrays = ", ".join("%s::text[]" for _ in columns)
            params = [[k[c] for k in missing] for c in range(len(columns))]
            # Sorted inserts: two processors creating overlapping keys lock them in the same order.
            await self._conn.execute(
                f"INSERT INTO {table} ({names}) SELECT * FROM unnest({arrays}) "
                f"ON CONFLICT ({names}) DO NOTHING",
                params,
            )
            cur = await self._conn.execute(
                f"SELECT {id_column}, {names} FROM {table} JOIN unnest({arrays}) AS k({names}) USING ({names})",
                params,
            )
            for row in await cur.fetchall():
                cache[tuple(str(v) for v in row[1:])] = int(row[0])
            log.debug("resolved %d new %s ids", len(missing), table)
        return [cache[k] for k in keys]
