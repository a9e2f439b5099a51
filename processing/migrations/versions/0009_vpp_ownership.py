"""VPPs are owned registry entities; resources join them by enrolment; regulator keys and their read log.

- ``vpps``: a VPP with its owner, a tenant with the ``operator`` role (a composite key onto
  ``tenants (tenant_id, role)`` refuses any other), or none: an unowned VPP is held by admins until one
  assigns an operator.
- ``vpp_enrolments``: a device's request to join a VPP and what became of it (``requested`` ->
  ``approved`` | ``rejected`` | ``left``; ``approved`` -> ``left``), with who and when. At most one open
  (requested or approved) enrolment per device. Rows keep their VPP, device and requester for good.
- ``devices.vpp`` stays the effective membership that the processor and the vpp service read (through
  ``device_membership``), but is now derived: approving an enrolment sets it, leaving clears it, and a
  trigger refuses any other value than the VPP of the device's approved enrolment, so no API bug and no
  hand-typed statement can put a device into a VPP it was not admitted to.
- ``dr_events.vpp`` must name a registered VPP.
- ``api_keys.role`` gains ``regulator`` (not bound to a tenant, like ``admin``); every request of a
  regulator key is appended to ``regulator_reads``, which refuses UPDATE, DELETE and TRUNCATE.

Existing data: every distinct ``devices.vpp`` (and every VPP named by a DR event) becomes an unowned VPP,
and every current membership an approved enrolment decided by ``migration-0009``.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

ID_CHECK = r"~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'"
MIGRATION = "migration-0009"


def upgrade() -> None:
    op.execute("ALTER TABLE tenants ADD CONSTRAINT tenants_tenant_role UNIQUE (tenant_id, role)")
    op.execute("""
        CREATE TABLE vpps (
            vpp_id       text PRIMARY KEY,
            name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
            owner_tenant text,
            -- Only ever 'operator': with the composite key below, an owner must be an operator tenant.
            owner_role   text NOT NULL GENERATED ALWAYS AS ('operator') STORED,
            created_at   timestamptz NOT NULL DEFAULT now(),
            FOREIGN KEY (owner_tenant, owner_role) REFERENCES tenants (tenant_id, role)
        )""")
    op.execute("CREATE INDEX vpps_owner ON vpps (owner_tenant) WHERE owner_tenant IS NOT NULL")
    op.execute("""
        CREATE TABLE vpp_enrolments (
            enrolment_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            vpp_id       text NOT NULL REFERENCES vpps,
            tenant_id    text NOT NULL,
            device_id    text NOT NULL,
            status       text NOT NULL CHECK (status IN ('requested', 'approved', 'rejected', 'left')),
            requested_by text NOT NULL,
            requested_at timestamptz NOT NULL DEFAULT now(),
            decided_by   text,
            decided_at   timestamptz,
            left_by      text,
            left_at      timestamptz,
            note         text CHECK (length(note) <= 500),
            -- Deferred: a device registered with its VPP gets its approved enrolment first, so that the
            -- device row is inserted with its VPP and its membership history starts with it (-infinity).
            FOREIGN KEY (tenant_id, device_id) REFERENCES devices DEFERRABLE INITIALLY DEFERRED,
            CHECK ((status = 'requested') = (decided_at IS NULL AND left_at IS NULL)),
            CHECK ((status = 'left') = (left_at IS NOT NULL))
        )""")
    op.execute(
        "CREATE UNIQUE INDEX vpp_enrolments_open ON vpp_enrolments (tenant_id, device_id) "
        "WHERE status IN ('requested', 'approved')"
    )
    op.execute("CREATE INDEX vpp_enrolments_vpp ON vpp_enrolments (vpp_id, status)")

    # Existing data, before the triggers exist (nothing in devices changes).
    op.execute("""
        INSERT INTO vpps (vpp_id, name)
        SELECT vpp, vpp FROM devices WHERE vpp IS NOT NULL
        UNION SELECT vpp, vpp FROM dr_events""")
    op.execute(f"""
        INSERT INTO vpp_enrolments (vpp_id, tenant_id, device_id, status, requested_by, decided_by, decided_at)
        SELECT vpp, tenant_id, device_id, 'approved', '{MIGRATION}', '{MIGRATION}', now()
        FROM devices WHERE vpp IS NOT NULL""")
    # NOT VALID: ids the API has always refused may exist from direct inserts; new VPPs are checked.
    op.execute(f"ALTER TABLE vpps ADD CONSTRAINT vpps_vpp_id_check CHECK (vpp_id {ID_CHECK}) NOT VALID")
    op.execute("ALTER TABLE dr_events ADD CONSTRAINT dr_events_vpp_fkey FOREIGN KEY (vpp) REFERENCES vpps")

    op.execute("""
        CREATE FUNCTION vpp_enrolments_guard() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF (NEW.vpp_id, NEW.tenant_id, NEW.device_id, NEW.requested_by, NEW.requested_at)
               IS DISTINCT FROM (OLD.vpp_id, OLD.tenant_id, OLD.device_id, OLD.requested_by, OLD.requested_at) THEN
                RAISE EXCEPTION 'enrolment %: its VPP, device and request never change', OLD.enrolment_id
                    USING ERRCODE = 'check_violation';
            END IF;
            IF NEW.status <> OLD.status AND NOT (
                (OLD.status = 'requested' AND NEW.status IN ('approved', 'rejected', 'left'))
                OR (OLD.status = 'approved' AND NEW.status = 'left')) THEN
                RAISE EXCEPTION 'enrolment %: % cannot become %', OLD.enrolment_id, OLD.status, NEW.status
                    USING ERRCODE = 'check_violation';
            END IF;
            RETURN NEW;
        END $$""")
    op.execute("""
        CREATE TRIGGER vpp_enrolments_guard BEFORE UPDATE ON vpp_enrolments
        FOR EACH ROW EXECUTE FUNCTION vpp_enrolments_guard()""")
    op.execute("""
        CREATE FUNCTION vpp_enrolments_refuse_delete() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'vpp_enrolments is a history: % refused', TG_OP
                USING ERRCODE = 'insufficient_privilege', HINT = 'An enrolment ends with status left.';
        END $$""")
    op.execute("""
        CREATE TRIGGER vpp_enrolments_no_delete BEFORE DELETE ON vpp_enrolments
        FOR EACH ROW EXECUTE FUNCTION vpp_enrolments_refuse_delete()""")
    op.execute("""
        CREATE TRIGGER vpp_enrolments_no_truncate BEFORE TRUNCATE ON vpp_enrolments
        FOR EACH STATEMENT EXECUTE FUNCTION vpp_enrolments_refuse_delete()""")
    # Approval is what moves a device into a VPP; leaving moves it out.
    op.execute("""
        CREATE FUNCTION vpp_enrolments_apply() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.status = 'approved' AND (TG_OP = 'INSERT' OR OLD.status <> 'approved') THEN
                UPDATE devices SET vpp = NEW.vpp_id
                WHERE tenant_id = NEW.tenant_id AND device_id = NEW.device_id;
            ELSIF TG_OP = 'UPDATE' AND OLD.status = 'approved' AND NEW.status <> 'approved' THEN
                UPDATE devices SET vpp = NULL
                WHERE tenant_id = NEW.tenant_id AND device_id = NEW.device_id AND vpp = OLD.vpp_id;
            END IF;
            RETURN NULL;
        END $$""")
    op.execute("""
        CREATE TRIGGER vpp_enrolments_apply AFTER INSERT OR UPDATE OF status ON vpp_enrolments
        FOR EACH ROW EXECUTE FUNCTION vpp_enrolments_apply()""")
    op.execute("""
        CREATE FUNCTION devices_vpp_guard() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            admitted text;
        BEGIN
            IF TG_OP = 'UPDATE' AND NEW.vpp IS NOT DISTINCT FROM OLD.vpp THEN
                RETURN NEW;
            END IF;
            SELECT vpp_id INTO admitted FROM vpp_enrolments
            WHERE tenant_id = NEW.tenant_id AND device_id = NEW.device_id AND status = 'approved';
            IF NEW.vpp IS DISTINCT FROM admitted THEN
                RAISE EXCEPTION 'device %/% is not enrolled in VPP %', NEW.tenant_id, NEW.device_id, NEW.vpp
                    USING ERRCODE = 'check_violation',
                          HINT = 'A device joins a VPP by an enrolment its owner approves (vpp_enrolments).';
            END IF;
            RETURN NEW;
        END $$""")
    op.execute("""
        CREATE TRIGGER devices_vpp_guard BEFORE INSERT OR UPDATE OF vpp ON devices
        FOR EACH ROW EXECUTE FUNCTION devices_vpp_guard()""")

    op.execute("ALTER TABLE api_keys DROP CONSTRAINT api_keys_role_check")
    op.execute("ALTER TABLE api_keys DROP CONSTRAINT api_keys_check")
    op.execute(
        "ALTER TABLE api_keys ADD CONSTRAINT api_keys_role_check "
        "CHECK (role IN ('admin', 'enterprise', 'operator', 'regulator'))"
    )
    op.execute(
        "ALTER TABLE api_keys ADD CONSTRAINT api_keys_tenant_check "
        "CHECK (role IN ('admin', 'regulator') OR tenant_id IS NOT NULL)"
    )
    op.execute("""
        CREATE TABLE regulator_reads (
            read_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            key_id   text NOT NULL REFERENCES api_keys,
            method   text NOT NULL,
            route    text NOT NULL,
            path     text NOT NULL,
            tenant   text,
            at       timestamptz NOT NULL DEFAULT now()
        )""")
    op.execute("CREATE INDEX regulator_reads_key ON regulator_reads (key_id, at)")
    op.execute("""
        CREATE FUNCTION regulator_reads_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'regulator_reads is append-only: % refused', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END $$""")
    op.execute("""
        CREATE TRIGGER regulator_reads_append_only BEFORE UPDATE OR DELETE ON regulator_reads
        FOR EACH ROW EXECUTE FUNCTION regulator_reads_refuse_change()""")
    op.execute("""
        CREATE TRIGGER regulator_reads_no_truncate BEFORE TRUNCATE ON regulator_reads
        FOR EACH STATEMENT EXECUTE FUNCTION regulator_reads_refuse_change()""")


def downgrade() -> None:
    op.execute("DROP TABLE regulator_reads")
    op.execute("DROP FUNCTION regulator_reads_refuse_change()")
    op.execute("DELETE FROM api_keys WHERE role = 'regulator'")
    op.execute("ALTER TABLE api_keys DROP CONSTRAINT api_keys_tenant_check")
    op.execute("ALTER TABLE api_keys DROP CONSTRAINT api_keys_role_check")
    op.execute(
        "ALTER TABLE api_keys ADD CONSTRAINT api_keys_role_check CHECK (role IN ('admin', 'enterprise', 'operator'))"
    )
    op.execute(
        "ALTER TABLE api_keys ADD CONSTRAINT api_keys_check CHECK (role = 'admin' OR tenant_id IS NOT NULL)"
    )
    op.execute("DROP TRIGGER devices_vpp_guard ON devices")
    op.execute("DROP FUNCTION devices_vpp_guard()")
    op.execute("ALTER TABLE dr_events DROP CONSTRAINT dr_events_vpp_fkey")
    op.execute("DROP TABLE vpp_enrolments")
    op.execute("DROP FUNCTION vpp_enrolments_apply()")
    op.execute("DROP FUNCTION vpp_enrolments_refuse_delete()")
    op.execute("DROP FUNCTION vpp_enrolments_guard()")
    op.execute("DROP TABLE vpps")
    op.execute("ALTER TABLE tenants DROP CONSTRAINT tenants_tenant_role")
