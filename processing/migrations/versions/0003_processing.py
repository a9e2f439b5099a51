"""What the stream processors write and read besides raw readings.

- ``agg_1m``, ``agg_15m``, ``agg_1h``: interval aggregates per device, site, enterprise and VPP. Every
  column is additive (sums and counts, and a maximum that only late readings can raise), so a batch and
  a late correction are both written as deltas in the transaction that stores their Kafka offsets.
- Meter exchanges and multipliers (CT x VT x meter constant) with their effective times.
- Device membership in sites and VPPs with validity periods, kept by a trigger on ``devices``, so moving
  a device does not rewrite history.
- ``reading_flags``: raw readings that VEE rejected (never booked), with the reason.
- The audit chain: every written batch's SHA-256 digest, chained per Kafka partition and reading day;
  ``readings.audit_batch`` says which batch wrote a row.
- ``devices.calibration_due``: readings after it are counted as uncalibrated.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

AGG_TABLES = {"agg_1m": "1 day", "agg_15m": "7 days", "agg_1h": "30 days"}


def upgrade() -> None:
    op.execute("DROP TABLE device_energy_1m")
    for table, chunk in AGG_TABLES.items():
        # scope: device | site | enterprise | vpp; entity_id is the device, site, tenant or VPP id.
        # VPPs span tenants, so their rows carry tenant_id ''.
        op.execute(f"""
            CREATE TABLE {table} (
                scope            text NOT NULL CHECK (scope IN ('device', 'site', 'enterprise', 'vpp')),
                tenant_id        text NOT NULL,
                entity_id        text NOT NULL,
                metric           text NOT NULL,
                bucket           timestamptz NOT NULL,
                total            double precision NOT NULL DEFAULT 0,
                n                integer NOT NULL DEFAULT 0,
                max_value        double precision,
                n_measured       integer NOT NULL DEFAULT 0,
                n_estimated      integer NOT NULL DEFAULT 0,
                n_substituted    integer NOT NULL DEFAULT 0,
                n_flagged        integer NOT NULL DEFAULT 0,
                n_uncalibrated   integer NOT NULL DEFAULT 0,
                late_corrections integer NOT NULL DEFAULT 0,
                corrected_at     timestamptz,
                updated_at       timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (scope, tenant_id, entity_id, metric, bucket)
            )""")
        op.execute(
            f"SELECT create_hypertable('{table}', by_range('bucket', INTERVAL '{chunk}'), "
            "create_default_indexes => false)"
        )
    op.execute("""
        CREATE TABLE meter_exchanges (
            tenant_id    text NOT NULL,
            device_id    text NOT NULL,
            metric       text NOT NULL,
            ts           timestamptz NOT NULL,
            removal_read double precision NOT NULL,
            install_read double precision NOT NULL,
            change_seq   bigserial,
            created_at   timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, device_id, metric, ts),
            FOREIGN KEY (tenant_id, device_id) REFERENCES devices
        )""")
    op.execute("""
        CREATE TABLE meter_multipliers (
            tenant_id      text NOT NULL,
            device_id      text NOT NULL,
            effective_from timestamptz NOT NULL,
            ct_ratio       double precision NOT NULL DEFAULT 1 CHECK (ct_ratio > 0),
            vt_ratio       double precision NOT NULL DEFAULT 1 CHECK (vt_ratio > 0),
            meter_constant double precision NOT NULL DEFAULT 1 CHECK (meter_constant > 0),
            change_seq     bigserial,
            created_at     timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, device_id, effective_from),
            FOREIGN KEY (tenant_id, device_id) REFERENCES devices
        )""")
    # Membership starts at -infinity: readings backfilled from before registration belong to the
    # device's first site. A change closes the current period at the moment of the change.
    op.execute("""
        CREATE TABLE device_membership (
            tenant_id  text NOT NULL,
            device_id  text NOT NULL,
            site_id    text,
            vpp        text,
            valid_from timestamptz NOT NULL,
            valid_to   timestamptz NOT NULL DEFAULT 'infinity',
            change_seq bigserial,
            PRIMARY KEY (tenant_id, device_id, valid_from),
            FOREIGN KEY (tenant_id, device_id) REFERENCES devices
        )""")
    op.execute("""
        CREATE FUNCTION devices_track_membership() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                INSERT INTO device_membership (tenant_id, device_id, site_id, vpp, valid_from)
                VALUES (NEW.tenant_id, NEW.device_id, NEW.site_id, NEW.vpp, '-infinity');
            ELSIF NEW.site_id IS DISTINCT FROM OLD.site_id OR NEW.vpp IS DISTINCT FROM OLD.vpp THEN
                UPDATE device_membership SET valid_to = now()
                WHERE tenant_id = NEW.tenant_id AND device_id = NEW.device_id AND valid_to = 'infinity';
                INSERT INTO device_membership (tenant_id, device_id, site_id, vpp, valid_from)
                VALUES (NEW.tenant_id, NEW.device_id, NEW.site_id, NEW.vpp, now());
            END IF;
            RETURN NEW;
        END $$""")
    op.execute("""
        CREATE TRIGGER devices_membership AFTER INSERT OR UPDATE ON devices
        FOR EACH ROW EXECUTE FUNCTION devices_track_membership()""")
    op.execute("""
        INSERT INTO device_membership (tenant_id, device_id, site_id, vpp, valid_from)
        SELECT tenant_id, device_id, site_id, vpp, '-infinity' FROM devices""")
    op.execute("""
        CREATE TABLE reading_flags (
            tenant_id  text NOT NULL,
            device_id  text NOT NULL,
            metric     text NOT NULL,
            ts         timestamptz NOT NULL,
            flag       text NOT NULL,
            detail     text,
            flagged_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, device_id, metric, ts)
        )""")
    op.execute("ALTER TABLE devices ADD COLUMN calibration_due date")
    op.execute("ALTER TABLE readings ADD COLUMN audit_batch bigint")
    op.execute("CREATE SEQUENCE audit_batch_seq")
    op.execute("""
        CREATE TABLE audit_chain (
            topic           text NOT NULL,
            kafka_partition integer NOT NULL,
            day             date NOT NULL,
            seq             integer NOT NULL,
            audit_batch     bigint NOT NULL,
            row_count       integer NOT NULL,
            rows_sha256     bytea NOT NULL,
            chain_sha256    bytea NOT NULL,
            retired         boolean NOT NULL DEFAULT false,
            created_at      timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (topic, kafka_partition, day, seq)
        )""")
    op.execute("CREATE INDEX audit_chain_batch ON audit_chain (audit_batch)")


def downgrade() -> None:
    for table in (
        "audit_chain",
        "reading_flags",
        "device_membership",
        "meter_multipliers",
        "meter_exchanges",
        *AGG_TABLES,
    ):
        op.execute(f"DROP TABLE IF EXISTS {table}")
    op.execute("DROP FUNCTION IF EXISTS devices_track_membership() CASCADE")
    op.execute("DROP SEQUENCE IF EXISTS audit_batch_seq")
    op.execute("ALTER TABLE readings DROP COLUMN audit_batch")
    op.execute("ALTER TABLE devices DROP COLUMN calibration_due")
