"""Registry, raw readings hypertable, 1-minute device aggregates, processor offsets.

TimescaleDB's edition decides what else is created: compression, retention policies and a continuous
aggregate exist only in the community (TSL) edition; the Apache-2 edition that Debian ships lacks
them, and meterflow then runs retention itself. What was detected is recorded in ``schema_features``.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TENANT_CHECK = r"tenant_id ~ '^[a-z0-9][a-z0-9-]{0,62}$'"
ID_CHECK = r"~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'"


def upgrade() -> None:
    op.execute(f"""
        CREATE TABLE tenants (
            tenant_id     text PRIMARY KEY CHECK ({TENANT_CHECK}),
            name          text NOT NULL,
            role          text NOT NULL DEFAULT 'enterprise' CHECK (role IN ('enterprise', 'operator')),
            industry_code text,
            timezone      text NOT NULL DEFAULT 'Asia/Shanghai',
            created_at    timestamptz NOT NULL DEFAULT now()
        )""")
    op.execute(f"""
        CREATE TABLE sites (
            tenant_id     text NOT NULL REFERENCES tenants ON DELETE RESTRICT,
            site_id       text NOT NULL CHECK (site_id {ID_CHECK}),
            name          text NOT NULL,
            floor_area_m2 double precision CHECK (floor_area_m2 > 0),
            timezone      text,
            created_at    timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, site_id)
        )""")
    # A gateway id is its MQTT username, so it is unique across tenants.
    op.execute(f"""
        CREATE TABLE gateways (
            gateway_id         text PRIMARY KEY CHECK (gateway_id {ID_CHECK}),
            tenant_id          text NOT NULL REFERENCES tenants ON DELETE RESTRICT,
            mqtt_password_hash text NOT NULL,
            enabled            boolean NOT NULL DEFAULT true,
            created_at         timestamptz NOT NULL DEFAULT now()
        )""")
    op.execute(f"""
        CREATE TABLE devices (
            tenant_id            text NOT NULL REFERENCES tenants ON DELETE RESTRICT,
            device_id            text NOT NULL CHECK (device_id {ID_CHECK}),
            site_id              text,
            gateway_id           text REFERENCES gateways,
            device_type          text NOT NULL DEFAULT 'meter',
            carrier              text NOT NULL DEFAULT 'electricity',
            rated_power_kw       double precision,
            register_max         double precision,
            telemetry_interval_s integer NOT NULL DEFAULT 60 CHECK (telemetry_interval_s > 0),
            created_at           timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, device_id),
            FOREIGN KEY (tenant_id, site_id) REFERENCES sites
        )""")
    op.execute("""
        CREATE TABLE api_keys (
            key_id     text PRIMARY KEY,
            key_hash   text NOT NULL UNIQUE,
            tenant_id  text REFERENCES tenants,
            role       text NOT NULL CHECK (role IN ('admin', 'enterprise', 'operator')),
            label      text,
            created_at timestamptz NOT NULL DEFAULT now(),
            revoked_at timestamptz,
            CHECK (role = 'admin' OR tenant_id IS NOT NULL)
        )""")
    # Raw readings: one row per tenant, device, metric and timestamp. Append-only; duplicates are
    # refused by the unique index and counted by the processor, never added.
    op.execute("""
        CREATE TABLE readings (
            tenant_id   text NOT NULL,
            device_id   text NOT NULL,
            metric      text NOT NULL,
            ts          timestamptz NOT NULL,
            value       double precision NOT NULL,
            gateway_id  text NOT NULL,
            received_at timestamptz NOT NULL,
            ingested_at timestamptz NOT NULL DEFAULT now(),
            UNIQUE (tenant_id, device_id, metric, ts)
        )""")
    op.execute(
        "SELECT create_hypertable('readings', by_range('ts', INTERVAL '1 day'), create_default_indexes => false)"
    )
    op.execute("""
        CREATE TABLE device_energy_1m (
            tenant_id         text NOT NULL,
            device_id         text NOT NULL,
            bucket            timestamptz NOT NULL,
            energy_import_kwh double precision,
            energy_export_kwh double precision,
            avg_power_kw      double precision,
            max_power_kw      double precision,
            n_readings        integer NOT NULL DEFAULT 0,
            quality           smallint NOT NULL DEFAULT 0,
            updated_at        timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, device_id, bucket)
        )""")
    op.execute(
        "SELECT create_hypertable('device_energy_1m', by_range('bucket', INTERVAL '7 days'), "
        "create_default_indexes => false)"
    )
    # Offsets live beside the data they produced and commit in the same transaction, so a crash or
    # a replay can never count a Kafka record twice.
    op.execute("""
        CREATE TABLE processor_offsets (
            consumer_group text NOT NULL,
            topic          text NOT NULL,
            kafka_partition integer NOT NULL,
            next_offset    bigint NOT NULL,
            updated_at     timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (consumer_group, topic, kafka_partition)
        )""")
    op.execute("""
        CREATE TABLE schema_features (
            feature text PRIMARY KEY,
            enabled boolean NOT NULL,
            detail  text NOT NULL
        )""")
    _timescale_features()


def _timescale_features() -> None:
    bind = op.get_bind()
    license_ = bind.execute(text("SELECT current_setting('timescaledb.license', true)")).scalar() or "unknown"
    version = bind.execute(text("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")).scalar()
    community = license_ == "timescale"
    detail = f"TimescaleDB {version}, license {license_}"
    for feature in ("compression", "retention_policy", "continuous_aggregates"):
        bind.execute(
            text("INSERT INTO schema_features VALUES (:f, :e, :d)"),
            {"f": feature, "e": community, "d": detail},
        )
    if not community:
        return
    op.execute(
        "ALTER TABLE readings SET (timescaledb.compress, timescaledb.compress_segmentby = 'tenant_id, device_id, metric')"
    )
    op.execute("SELECT add_compression_policy('readings', INTERVAL '7 days')")
    with op.get_context().autocommit_block():
        op.execute("""
            CREATE MATERIALIZED VIEW device_power_1h WITH (timescaledb.continuous) AS
            SELECT tenant_id, device_id, time_bucket('1 hour', ts) AS bucket,
                   avg(value) AS avg_power_kw, max(value) AS max_power_kw, count(*) AS n_readings
            FROM readings WHERE metric = 'power_kw'
            GROUP BY tenant_id, device_id, bucket WITH NO DATA""")


def downgrade() -> None:
    op.execute("DROP MATERIALIZED VIEW IF EXISTS device_power_1h")
    for table in (
        "schema_features",
        "processor_offsets",
        "device_energy_1m",
        "readings",
        "api_keys",
        "devices",
        "gateways",
        "sites",
        "tenants",
    ):
        op.execute(f"DROP TABLE IF EXISTS {table}")
