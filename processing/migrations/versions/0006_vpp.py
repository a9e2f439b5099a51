"""VPP flexibility and demand response.

- ``vpp_resources``: the resource model of a device (class and class-specific ratings). Ratings shared with
  metering (rated power, energy capacity, SoC limits, VPP, topology node, telemetry interval) stay on
  ``devices``.
- ``vpp_capacity_now`` / ``vpp_node_capacity_now``: what the vpp service computed last, per required
  duration; ``vpp_capacity_1m``: a hypertable with the last figure of every minute.
- ``vpp_stale_devices``: the resources the vpp service currently counts as stale.
- ``dr_events``, ``dr_holidays``: demand-response events and the days excluded from baselines.

Revision ID: 0006
Revises: 0004
Create Date: 2026-11-21
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE TABLE vpp_resources (
            tenant_id         text NOT NULL,
            device_id         text NOT NULL,
            resource_class    text NOT NULL
                CHECK (resource_class IN ('battery', 'pv', 'ev_charger', 'building_load', 'base_station')),
            charge_max_kw     double precision CHECK (charge_max_kw >= 0),
            discharge_max_kw  double precision CHECK (discharge_max_kw >= 0),
            efficiency        double precision NOT NULL DEFAULT 0.95 CHECK (efficiency > 0 AND efficiency <= 1),
            curtailable       boolean NOT NULL DEFAULT false,
            min_power_kw      double precision NOT NULL DEFAULT 0 CHECK (min_power_kw >= 0),
            sheddable_share   double precision NOT NULL DEFAULT 0 CHECK (sheddable_share BETWEEN 0 AND 1),
            max_shed_min      double precision CHECK (max_shed_min > 0),
            reserved_soc_pct  double precision NOT NULL DEFAULT 0 CHECK (reserved_soc_pct BETWEEN 0 AND 100),
            updated_at        timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, device_id),
            FOREIGN KEY (tenant_id, device_id) REFERENCES devices ON DELETE CASCADE
        )""")
    op.execute("""
        CREATE TABLE vpp_capacity_now (
            vpp               text NOT NULL,
            duration_min      integer NOT NULL,
            up_kw             double precision NOT NULL,
            down_kw           double precision NOT NULL,
            nameplate_up_kw   double precision NOT NULL,
            nameplate_down_kw double precision NOT NULL,
            devices_online    integer NOT NULL,
            devices_stale     integer NOT NULL,
            as_of             timestamptz NOT NULL,
            PRIMARY KEY (vpp, duration_min)
        )""")
    op.execute("""
        CREATE TABLE vpp_node_capacity_now (
            vpp            text NOT NULL,
            node           text NOT NULL,
            duration_min   integer NOT NULL,
            up_kw          double precision NOT NULL,
            down_kw        double precision NOT NULL,
            devices_online integer NOT NULL,
            devices_stale  integer NOT NULL,
            as_of          timestamptz NOT NULL,
            PRIMARY KEY (vpp, node, duration_min)
        )""")
    op.execute("""
        CREATE TABLE vpp_capacity_1m (
            vpp               text NOT NULL,
            duration_min      integer NOT NULL,
            bucket            timestamptz NOT NULL,
            up_kw             double precision NOT NULL,
            down_kw           double precision NOT NULL,
            nameplate_up_kw   double precision NOT NULL,
            nameplate_down_kw double precision NOT NULL,
            devices_online    integer NOT NULL,
            devices_stale     integer NOT NULL,
            PRIMARY KEY (vpp, duration_min, bucket)
        )""")
    op.execute(
        "SELECT create_hypertable('vpp_capacity_1m', by_range('bucket', INTERVAL '7 days'), "
        "create_default_indexes => false)"
    )
    op.execute("""
        CREATE TABLE vpp_stale_devices (
            vpp                  text NOT NULL,
            tenant_id            text NOT NULL,
            device_id            text NOT NULL,
            last_seen            timestamptz,
            telemetry_interval_s integer NOT NULL,
            PRIMARY KEY (vpp, tenant_id, device_id)
        )""")
    op.execute("""
        CREATE TABLE dr_events (
            event_id     bigserial PRIMARY KEY,
            vpp          text NOT NULL,
            start_at     timestamptz NOT NULL,
            end_at       timestamptz NOT NULL,
            direction    text NOT NULL CHECK (direction IN ('up', 'down')),
            committed_kw double precision NOT NULL CHECK (committed_kw > 0),
            baseline     text NOT NULL,
            valid_ratio  double precision NOT NULL CHECK (valid_ratio > 0),
            program      text,
            created_at   timestamptz NOT NULL DEFAULT now(),
            CHECK (end_at > start_at)
        )""")
    op.execute("CREATE INDEX dr_events_vpp ON dr_events (vpp, start_at)")
    op.execute("""
        CREATE TABLE dr_holidays (
            day  date PRIMARY KEY,
            name text NOT NULL
        )""")


def downgrade() -> None:
    for table in (
        "dr_holidays",
        "dr_events",
        "vpp_stale_devices",
        "vpp_capacity_1m",
        "vpp_node_capacity_now",
        "vpp_capacity_now",
        "vpp_resources",
    ):
        op.execute(f"DROP TABLE IF EXISTS {table}")
