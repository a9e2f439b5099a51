"""Time-varying grid carbon intensity.

- ``grid_intensity``: one value per zone, signal type (average or marginal), basis (lifecycle or direct)
  and start time, as the intensity service reads it from Kafka; a hypertable. Figures derived from it
  are labelled estimated and never enter compliance totals.
- ``sites.grid_zone``: the zone whose intensity applies to a site; when unset, the site's province id.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-21
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

ZONE_CHECK = r"~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$'"


def upgrade() -> None:
    op.execute(f"""
        CREATE TABLE grid_intensity (
            zone            text NOT NULL CHECK (zone {ZONE_CHECK}),
            signal_type     text NOT NULL CHECK (signal_type IN ('average', 'marginal')),
            basis           text NOT NULL CHECK (basis IN ('lifecycle', 'direct')),
            ts              timestamptz NOT NULL,
            duration_s      integer NOT NULL CHECK (duration_s > 0 AND duration_s <= 86400),
            g_co2e_per_kwh  double precision NOT NULL CHECK (g_co2e_per_kwh >= 0),
            is_estimated    boolean NOT NULL,
            is_forecast     boolean NOT NULL,
            source          text NOT NULL,
            model_version   text,
            -- Where the value came from, so a figure can be traced back to its Kafka record.
            kafka_partition integer NOT NULL,
            kafka_offset    bigint NOT NULL,
            received_at     timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (zone, signal_type, basis, ts)
        )""")
    # A zone publishes 24 to 288 points a day: month-long chunks keep the chunk count small.
    op.execute(
        "SELECT create_hypertable('grid_intensity', by_range('ts', INTERVAL '30 days'), "
        "create_default_indexes => false)"
    )
    op.execute(f"ALTER TABLE sites ADD COLUMN grid_zone text CHECK (grid_zone {ZONE_CHECK})")


def downgrade() -> None:
    op.execute("ALTER TABLE sites DROP COLUMN grid_zone")
    op.execute("DROP TABLE grid_intensity")
