"""Query API reference and submitted data.

- ``emission_factors``: the emission-factor library as versioned reference data. Rows are never
  changed in meaning: a corrected or final value is a new row whose ``replaces`` names the row it
  supersedes (that row gets ``superseded_by``), so a report that cites a factor id keeps its number.
  Seeded from the packaged library (meterflow/carbon/factors.yaml); the API adds packaged rows it does
  not have yet at start-up, so a newer packaged library reaches an existing database.
- ``output_values``: value added, output value and product quantity an enterprise submits per period,
  the denominators of carbon intensity and grading.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
        CREATE TABLE emission_factors (
            factor_id       text PRIMARY KEY CHECK (factor_id ~ '^[a-z0-9][a-z0-9-]*$'),
            carrier         text NOT NULL,
            scope           smallint NOT NULL CHECK (scope IN (1, 2)),
            kind            text NOT NULL,
            region          text NOT NULL,
            year            integer,
            value           double precision NOT NULL CHECK (value > 0),
            unit            text NOT NULL,
            status          text NOT NULL CHECK (status IN ('final', 'provisional', 'unverified')),
            published       text,
            publisher       text,
            document        text,
            source_url      text,
            sources         jsonb NOT NULL,
            inputs          jsonb,
            note            text,
            library_version integer NOT NULL,
            origin          text NOT NULL CHECK (origin IN ('packaged', 'admin')),
            replaces        text REFERENCES emission_factors,
            superseded_by   text REFERENCES emission_factors,
            created_by      text,
            created_at      timestamptz NOT NULL DEFAULT now()
        )""")
    op.execute("CREATE INDEX emission_factors_slot ON emission_factors (carrier, kind, region, year)")
    op.execute("""
        CREATE TABLE output_values (
            tenant_id        text NOT NULL REFERENCES tenants ON DELETE RESTRICT,
            period_start     date NOT NULL,
            period_end       date NOT NULL,
            value_added_cny  double precision CHECK (value_added_cny > 0),
            output_value_cny double precision CHECK (output_value_cny > 0),
            product_quantity double precision CHECK (product_quantity > 0),
            product_unit     text,
            submitted_by     text,
            created_at       timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (tenant_id, period_start, period_end),
            CHECK (period_end > period_start)
        )""")
    # Seeding goes through the same function the API runs at start-up.
    from processing.carbon import packaged_factor_rows

    bind = op.get_bind()
    import sqlalchemy as sa

    insert = sa.text(
        "INSERT INTO emission_factors (factor_id, carrier, scope, kind, region, year, value, unit, status, "
        "published, publisher, document, source_url, sources, inputs, note, library_version, origin) VALUES "
        "(:factor_id, :carrier, :scope, :kind, :region, :year, :value, :unit, :status, :published, :publisher, "
        ":document, :source_url, CAST(:sources AS jsonb), CAST(:inputs AS jsonb), :note, :library_version, "
        "'packaged') ON CONFLICT (factor_id) DO NOTHING"
    )
    for row in packaged_factor_rows():
        bind.execute(insert, row)


def downgrade() -> None:
    op.execute("DROP TABLE output_values")
    op.execute("DROP TABLE emission_factors")
