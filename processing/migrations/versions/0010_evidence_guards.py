"""Evidence guards: key tables are append-only, retention has an owner-set floor and retires only what it dropped.

``reading_values`` holds a ``series_id`` and ``agg_*_values`` an ``agg_key_id``; ``series`` and
``agg_keys`` say what those ids mean. Rewriting a key row (another tenant, import swapped for export)
would rewrite every reading under it without touching the value tables, so the key tables get the
same append-only trigger as raw readings (their ids are never reused, 0007). New keys are still
inserted.

``retention_floor`` holds, in one row only the owner may change, how many days of raw readings are
kept whatever the services ask: 1827 (five years and their leap days, the carbon-records minimum)
until ``meterflow db migrate`` writes the configured ``processing.raw_retention_days`` there.
``drop_raw_chunks`` refuses any cutoff inside it.

Audit entries are retired by ``retire_dropped_audit_days``, with the owner's rights, and only those of
days wholly before the oldest chunk left of ``reading_values``: the services' role no longer updates
``audit_chain`` at all, so it cannot retire a day whose rows are still there to hide them from
``meterflow audit verify``.

Both functions run with the owner's rights (``drop_chunks`` needs the table owner), so their
``search_path`` puts ``pg_temp`` last: a temporary function or table of the caller cannot stand in for
``drop_chunks`` or ``audit_chain``.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

KEY_TABLES = ("series", "agg_keys")
# Five years of days, leap days included.
DEFAULT_FLOOR_DAYS = 1827


def upgrade() -> None:
    op.execute("""
        CREATE FUNCTION keys_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = 'Its ids give stored readings and aggregates their meaning.',
                      HINT = 'A new (tenant, device, metric) gets a new id.';
        END $$""")
    for table in KEY_TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION keys_refuse_change()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION keys_refuse_change()"
        )
    op.execute("""
        CREATE TABLE retention_floor (
            singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
            raw_days   integer NOT NULL CHECK (raw_days >= 1),
            updated_at timestamptz NOT NULL DEFAULT now()
        )""")
    op.execute(f"INSERT INTO retention_floor (raw_days) VALUES ({DEFAULT_FLOOR_DAYS})")
    op.execute("""
        CREATE OR REPLACE FUNCTION drop_raw_chunks(older_than timestamptz) RETURNS SETOF text
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
        DECLARE floor_days integer;
        BEGIN
            SELECT raw_days INTO STRICT floor_days FROM public.retention_floor;
            IF older_than > now() - make_interval(days => floor_days) THEN
                RAISE EXCEPTION 'retention keeps at least % days of raw readings: % refused',
                        floor_days, older_than
                    USING ERRCODE = 'insufficient_privilege',
                          HINT = 'The floor is retention_floor.raw_days, written by meterflow db migrate.';
            END IF;
            RETURN QUERY
                SELECT c::text FROM public.drop_chunks('public.reading_values', older_than => older_than) AS c;
        END $$""")
    op.execute("""
        CREATE FUNCTION retire_dropped_audit_days() RETURNS integer
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
        DECLARE retired_count integer;
        BEGIN
            -- One statement, one snapshot: an entry committed with its rows (and chunk) meanwhile is
            -- either seen with its chunk or not at all.
            WITH oldest AS (
                SELECT min(range_start) AS start FROM timescaledb_information.chunks
                WHERE hypertable_schema = 'public' AND hypertable_name = 'reading_values'
            )
            UPDATE public.audit_chain a SET retired = true FROM oldest
            WHERE NOT a.retired
              AND (oldest.start IS NULL OR ((a.day + 1)::timestamp AT TIME ZONE 'UTC') <= oldest.start);
            GET DIAGNOSTICS retired_count = ROW_COUNT;
            RETURN retired_count;
        END $$""")
    op.execute("REVOKE ALL ON FUNCTION retire_dropped_audit_days() FROM PUBLIC")
    op.execute("REVOKE ALL ON FUNCTION drop_raw_chunks(timestamptz) FROM PUBLIC")


def downgrade() -> None:
    op.execute("DROP FUNCTION retire_dropped_audit_days()")
    # The guard 0009 had (recreated by every migrate before 0010): only the last day is kept.
    op.execute("""
        CREATE OR REPLACE FUNCTION drop_raw_chunks(older_than timestamptz) RETURNS SETOF text
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
        BEGIN
            IF older_than > now() - interval '1 day' THEN
                RAISE EXCEPTION 'retention keeps at least the last day: % refused', older_than
                    USING ERRCODE = 'insufficient_privilege';
            END IF;
            RETURN QUERY SELECT c::text FROM drop_chunks('public.reading_values', older_than => older_than) AS c;
        END $$""")
    op.execute("DROP TABLE retention_floor")
    for table in KEY_TABLES:
        op.execute(f"DROP TRIGGER {table}_no_truncate ON {table}")
        op.execute(f"DROP TRIGGER {table}_append_only ON {table}")
    op.execute("DROP FUNCTION keys_refuse_change()")
