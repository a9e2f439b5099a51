"""Raw readings are append-only: UPDATE, DELETE and TRUNCATE on ``readings`` are refused.

The audit chain (0003) proves after the fact that rows were changed; this trigger stops the ordinary
ways of changing them in the first place, so a bug or a hand-typed statement cannot rewrite evidence.
Old readings leave only through retention: TimescaleDB's ``drop_chunks`` drops whole chunk tables and
fires no row or TRUNCATE trigger, and meterflow retires the affected audit entries in the same
transaction.

TimescaleDB clones row triggers onto every chunk, so statements aimed at a chunk table directly are
refused too. It refuses ``ALTER TABLE … DISABLE TRIGGER`` on hypertables and chunks, and the
``meterflow`` role may not set ``session_replication_role``; the only way around the trigger is to
drop it (the table owner may), which is DDL and shows in the server log.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE FUNCTION readings_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'readings is append-only: % refused', TG_OP
                USING ERRCODE = 'insufficient_privilege',
                      DETAIL = 'Raw readings are audit evidence, chained in audit_chain.',
                      HINT = 'Flag a wrong reading in reading_flags instead; old readings leave '
                             'only through retention (meterflow retention apply).';
        END $$""")
    op.execute("""
        CREATE TRIGGER readings_append_only BEFORE UPDATE OR DELETE ON readings
        FOR EACH ROW EXECUTE FUNCTION readings_refuse_change()""")
    op.execute("""
        CREATE TRIGGER readings_no_truncate BEFORE TRUNCATE ON readings
        FOR EACH STATEMENT EXECUTE FUNCTION readings_refuse_change()""")


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS readings_no_truncate ON readings")
    op.execute("DROP TRIGGER IF EXISTS readings_append_only ON readings")
    op.execute("DROP FUNCTION IF EXISTS readings_refuse_change()")
