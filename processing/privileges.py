"""What the services' database role may do: DML on the schema the owner role migrated, nothing more.

Two roles share the database (docs/processing.md#roles). The owner role (``db.owner_user``) owns every
table, runs the migrations and grants; the services' role (``db.user``) owns nothing. A table's owner
may drop or disable its triggers, so only a role that owns nothing is held by the append-only triggers
on raw readings (migration 0004) and on the key tables that give them meaning (0010). Evidence is
append-only for the services by privilege as well: no UPDATE, DELETE or TRUNCATE on raw readings,
their keys or audit entries, and only SELECT on ``retention_floor``. Retention drops old chunks and
retires their audit entries through two functions that run with the owner's rights (migration 0010):
``drop_raw_chunks``, which keeps at least ``retention_floor.raw_days``, and
``retire_dropped_audit_days``, which retires only days no chunk is left of.

Applied after every migration, as the owner, so tables added by later revisions get the same rules;
the floor is written here too, from ``processing.raw_retention_days``.
"""

from __future__ import annotations

import logging

import psycopg
from psycopg import sql

from meterflow.settings import Settings

log = logging.getLogger(__name__)

# Raw readings, the keys that say whose and what they are, and the audit chain: the services only append.
APPEND_ONLY_TABLES = ("reading_values", "series", "agg_keys", "audit_chain")
# Written by the owner only: the services read it.
OWNER_WRITTEN_TABLES = ("retention_floor",)
# With no retention configured: five years of days, leap days included (carbon records).
DEFAULT_FLOOR_DAYS = 1827
# Functions with the owner's rights (migration 0010) the services may call.
OWNER_FUNCTIONS = ("drop_raw_chunks(timestamptz)", "retire_dropped_audit_days()")


def retention_floor_days(settings: Settings) -> int:
    """Days of raw readings no call of the services may drop: the configured retention, else five years."""
    days = settings.processing.raw_retention_days
    return DEFAULT_FLOOR_DAYS if days is None else days


def grant_service_privileges(settings: Settings) -> None:
    """Grant the services' role what it uses and nothing that rewrites evidence; idempotent."""
    db = settings.db
    app = sql.Identifier(db.user)
    floor = retention_floor_days(settings)
    with psycopg.connect(db.owner_conninfo(), autocommit=True) as conn, conn.transaction():
        conn.execute(
            sql.SQL(
                "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {}"
            ).format(app)
        )
        conn.execute(
            sql.SQL(
                "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {}"
            ).format(app)
        )
        conn.execute(
            sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {}").format(app)
        )
        conn.execute(
            sql.SQL("GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {}").format(app)
        )
        # A GRANT on a hypertable reaches its chunks (TimescaleDB propagates it); one on the schema's
        # tables may not, so each hypertable is named as well.
        hypertables = [
            r[0]
            for r in conn.execute(
                "SELECT hypertable_name FROM timescaledb_information.hypertables WHERE hypertable_schema = 'public'"
            )
        ]
        for name in hypertables:
            conn.execute(
                sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(sql.Identifier(name), app)
            )
        existing = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        for name in APPEND_ONLY_TABLES:
            if name in existing:
                conn.execute(
                    sql.SQL("REVOKE UPDATE, DELETE, TRUNCATE ON {} FROM {}").format(sql.Identifier(name), app)
                )
        for name in OWNER_WRITTEN_TABLES:
            if name in existing:
                conn.execute(
                    sql.SQL("REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {} FROM {}").format(
                        sql.Identifier(name), app
                    )
                )
        if "retention_floor" in existing:
            conn.execute(
                "UPDATE retention_floor SET raw_days = %s, updated_at = now() WHERE raw_days <> %s",
                (floor, floor),
            )
        for function in OWNER_FUNCTIONS:
            if conn.execute("SELECT to_regprocedure(%s)", (function,)).fetchone() != (None,):
                conn.execute(sql.SQL("REVOKE ALL ON FUNCTION {} FROM PUBLIC").format(sql.SQL(function)))
                conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {} TO {}").format(sql.SQL(function), app))
    log.info(
        "privileges of %s granted (append-only: %s; raw readings kept at least %d days)",
        db.user,
        ", ".join(APPEND_ONLY_TABLES),
        floor,
    )
