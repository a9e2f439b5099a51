"""Retention of raw readings, and retirement of the audit entries whose rows it removed.

With ``processing.raw_retention_days`` unset nothing is ever dropped (carbon records must be kept for
at least five years). Otherwise readings older than that many days, counted back from now to a UTC
midnight, leave in whole chunks: through TimescaleDB's retention policy where the edition has it
(``schema_features.retention_policy``), else by ``drop_chunks`` run here. The Apache-2 edition Debian
ships has only the latter.

The services' role owns no table: chunks leave through ``drop_raw_chunks`` and audit entries are
retired through ``retire_dropped_audit_days``, both run with the owner's rights (migration 0010).
The first refuses a cutoff inside ``retention_floor`` (the configured retention, else five years, set
by the owner at migration), whatever the caller's settings say. The second marks ``retired`` the
entries of days wholly before the oldest chunk left, in the same transaction, so
``meterflow audit verify`` skips them instead of reporting their rows deleted; a chunk interval longer
than a day (whose chunk straddling the cutoff survives) never retires a day that still has rows, and
the services cannot retire a day they did not drop. With the policy API the background job drops
chunks on its own schedule; their entries are retired by the next call here, and until then verify
reports those days' rows deleted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import psycopg
from prometheus_client import Counter

from meterflow.settings import Settings

log = logging.getLogger(__name__)

REFUSED = Counter(
    "meterflow_retention_refused_total",
    "Retention rounds the database refused: a cutoff inside retention_floor, set by the owner",
)

_POLICY_MATCHES = """
SELECT (config->>'drop_after')::interval = make_interval(days => %s)
FROM timescaledb_information.jobs
WHERE proc_name = 'policy_retention' AND hypertable_schema = current_schema()
  AND hypertable_name = 'reading_values'
"""


@dataclass(frozen=True, slots=True)
class RetentionResult:
    # keep: no retention configured; drop_chunks: run here; policy: TimescaleDB's policy registered.
    mode: Literal["keep", "drop_chunks", "policy"]
    cutoff: datetime | None
    dropped_chunks: tuple[str, ...]
    retired_entries: int

    def as_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "cutoff": self.cutoff.isoformat() if self.cutoff else None,
            "dropped_chunks": list(self.dropped_chunks),
            "retired_entries": self.retired_entries,
        }


def retention_cutoff(days: int, now: datetime) -> datetime:
    """The UTC midnight ``days`` days before ``now``: chunks (UTC-day aligned) end on one."""
    moment = now.astimezone(UTC) - timedelta(days=days)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


async def apply_retention(
    conn: psycopg.AsyncConnection[Any], settings: Settings, *, now: datetime | None = None
) -> RetentionResult:
    """Drop (or have TimescaleDB drop) raw readings past retention; retire their audit entries.

    One transaction on ``conn``, which must be idle.
    """
    days = settings.processing.raw_retention_days
    async with conn.transaction(), conn.cursor() as cur:
        await cur.execute("SELECT enabled FROM schema_features WHERE feature = 'retention_policy'")
        row = await cur.fetchone()
        policy_api = bool(row and row[0])
        if days is None:
            if policy_api:
                await cur.execute("SELECT remove_retention_policy('reading_values', if_exists => true)")
            return RetentionResult("keep", None, (), 0)
        cutoff = retention_cutoff(days, now or datetime.now(UTC))
        dropped: tuple[str, ...] = ()
        if policy_api:
            await cur.execute(_POLICY_MATCHES, (days,))
            current = await cur.fetchone()
            if not (current and current[0]):
                await cur.execute("SELECT remove_retention_policy('reading_values', if_exists => true)")
                await cur.execute(
                    "SELECT add_retention_policy('reading_values', drop_after => make_interval(days => %s))",
                    (days,),
                )
        else:
            try:
                await cur.execute("SELECT drop_raw_chunks(%s)", (cutoff,))
            except psycopg.errors.InsufficientPrivilege:
                REFUSED.inc()
                raise
            dropped = tuple(str(name) for (name,) in await cur.fetchall())
        await cur.execute("SELECT retire_dropped_audit_days()")
        row = await cur.fetchone()
        retired = int(row[0]) if row else 0
    result = RetentionResult("policy" if policy_api else "drop_chunks", cutoff, dropped, retired)
    if dropped or retired:
        log.info(
            "retention before %s: %d chunks dropped, %d audit entries retired",
            cutoff.isoformat(),
            len(dropped),
            retired,
        )
    return result
