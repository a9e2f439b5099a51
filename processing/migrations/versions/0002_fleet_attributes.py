"""What the simulator's fleet description (and a real deployment) tells meterflow about its fleet:
enterprise output value for carbon intensity, site location for grid factors and solar geometry,
device role, register resolution and VPP ratings, and green-certificate blocks.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ID_CHECK = r"~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'"


def upgrade() -> None:
    op.execute(
        "ALTER TABLE tenants ADD COLUMN annual_output_value_cny double precision CHECK (annual_output_value_cny > 0)"
    )
    op.execute("""
        ALTER TABLE sites
            ADD COLUMN province  text,
            ADD COLUMN latitude  double precision CHECK (latitude BETWEEN -90 AND 90),
            ADD COLUMN longitude double precision CHECK (longitude BETWEEN -180 AND 180)""")
    # A meter without a stated role is taken to be a boundary (grid) meter: that is what a site with
    # one meter has, and what carbon accounting sums. Sub-meters and resources must say so.
    op.execute("""
        ALTER TABLE devices
            ADD COLUMN role                text NOT NULL DEFAULT 'grid' CHECK (role IN ('grid', 'submeter', 'resource')),
            ADD COLUMN register_resolution double precision NOT NULL DEFAULT 0.01 CHECK (register_resolution > 0),
            ADD COLUMN energy_capacity_kwh double precision CHECK (energy_capacity_kwh > 0),
            ADD COLUMN soc_min_pct         double precision NOT NULL DEFAULT 10 CHECK (soc_min_pct BETWEEN 0 AND 100),
            ADD COLUMN soc_max_pct         double precision NOT NULL DEFAULT 95 CHECK (soc_max_pct BETWEEN 0 AND 100),
            ADD COLUMN vpp                 text,
            ADD COLUMN topology_node       text,
            ADD CHECK (soc_min_pct < soc_max_pct)""")
    op.execute("CREATE INDEX devices_vpp ON devices (vpp) WHERE vpp IS NOT NULL")
    op.execute(f"""
        CREATE TABLE green_certificates (
            tenant_id      text NOT NULL REFERENCES tenants ON DELETE RESTRICT,
            certificate_id text NOT NULL CHECK (certificate_id {ID_CHECK}),
            period_start   date NOT NULL,
            period_end     date NOT NULL,
            certificates   integer NOT NULL CHECK (certificates > 0),
            created_at     timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, certificate_id),
            CHECK (period_end > period_start)
        )""")


def downgrade() -> None:
    op.execute("DROP TABLE green_certificates")
    op.execute("DROP INDEX devices_vpp")
    op.execute("""
        ALTER TABLE devices DROP COLUMN role, DROP COLUMN register_resolution, DROP COLUMN energy_capacity_kwh,
            DROP COLUMN soc_min_pct, DROP COLUMN soc_max_pct, DROP COLUMN vpp, DROP COLUMN topology_node""")
    op.execute("ALTER TABLE sites DROP COLUMN province, DROP COLUMN latitude, DROP COLUMN longitude")
    op.execute("ALTER TABLE tenants DROP COLUMN annual_output_value_cny")
