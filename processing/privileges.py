"""What the services' database role may do: DML on the schema the owner role migrated, nothing more.

Two roles share the database (docs/processing.md#roles). The owner role (``db.owner_user``) owns every
table, runs the migrations and grants; the services' role (``db.user``) owns nothing. A table's owner
may drop or disable its triggers, so only a role that owns nothing is held by the append-only trigger
on raw readings (migration 0004). Evidence is append-only for the services by privilege as well: no
UPDATE, DELETE or TRUNCATE on raw readings or audit entries, except flipping an audit entry's
``retired`` flag, which retention does. Retention drops old chunks through ``drop_raw_chunks``, a
function that runs with the owner's rights (TimescaleDB's ``drop_chunks`` needs the table's owner) and
refuses to drop the last day.

Applied after every migration, as the owner, so tables added by later revisions get the same rules.
"""

from __future__ import annotations

import logging

import psycopg
from psycopg import sql

from meterflow.settings import Settings

log = logging.getLogger(__name__)

# Raw readings and the audit chain over them: the services may only append.
APPEND_ONLY_TABLES = ("reading_values", "audit_chain")

_DROP_RAW_CHUNKS = """
CREATE OR REPLACE FUNCTION drop_raw_chunks(older_than timestamptz) RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    IF older_than > now() - interval '1 day' THEN
        RAISE EXCEPTION 'retention keeps at least the last day: % refused', older_than
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN QUERY SELECT c::text FROM drop_chunks('public.reading_values', older_than => older_than) AS c;
END $$
"""


def grant_service_privileges(settings: Settings) -> None:
    """Grant the services' role what it uses and nothing that rewrites evidence; idempotent."""
    db = settings.db
    app = sql.Identifier(db.user)
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
        if "audit_chain" in existing:
            conn.execute(sql.SQL("GRANT UPDATE (retired) ON audit_chain TO {}").format(app))
        if "reading_values" in existing:
            conn.execute(_DROP_RAW_CHUNKS)
            conn.execute("REVOKE ALL ON FUNCTION drop_raw_chunks(timestamptz) FROM PUBLIC")
            conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION drop_raw_chunks(timestamptz) TO {}").format(app))
    log.info("privileges of %s granted (append-only: %s)", db.user, ", ".join(APPEND_ONLY_TABLES))
