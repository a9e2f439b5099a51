"""PostgreSQL as a host user or a compromised service would attack it (issue 13, finding 3).

No `trust`: the superuser needs its password over TCP and over the socket, and other OS users cannot
reach the socket at all. The services' role is no superuser and owns nothing, so it can neither disable
nor drop the append-only trigger, and it may not rewrite raw readings, the keys that say whose and what
they are, or audit entries, nor retire an entry or drop raw readings inside the retention floor
(issue 13, review findings 1 and 8).
"""

from __future__ import annotations

import os
import subprocess
import uuid

import psycopg
import pytest

from deploy.local import bootstrap
from deploy.local.services import Postgres
from deploy.local.stack import default_cache_dir
from meterflow.settings import Settings
from processing.privileges import retention_floor_days


def _refused(settings: Settings, statement: str) -> str:
    """Run statement as the services' role; return the error PostgreSQL answered (fail if it ran)."""
    with psycopg.connect(settings.db.conninfo()) as conn:
        try:
            conn.execute(statement)
        except psycopg.Error as exc:
            return str(exc)
        pytest.fail(f"the services' role was allowed: {statement}")


def test_postgres_superuser_without_password_is_refused_over_tcp(base_settings: Settings) -> None:
    db = base_settings.db
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(host=db.host, port=db.port, user="postgres", dbname="postgres", password="")


def test_postgres_superuser_without_password_is_refused_over_the_socket(base_settings: Settings) -> None:
    pg = Postgres(base_settings, default_cache_dir())
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(
            host=str(pg.socket_dir), port=base_settings.db.port, user="postgres", dbname="postgres"
        )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another OS user")
def test_another_os_user_cannot_reach_the_socket(base_settings: Settings) -> None:
    pg = Postgres(base_settings, default_cache_dir())
    psql = str(bootstrap.pg_bindir() / "psql")
    argv = ["runuser", "-u", "nobody", "--", psql, "-w", "-h", str(pg.socket_dir)]
    argv += ["-p", str(base_settings.db.port), "-U", "postgres", "-d", "postgres", "-c", "SELECT 1"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, env={"PATH": os.environ["PATH"]})
    assert done.returncode != 0
    assert "Permission denied" in done.stderr or "password" in done.stderr, done.stderr


def test_no_trust_rule_is_loaded(base_settings: Settings) -> None:
    pg = Postgres(base_settings, default_cache_dir())
    with pg._admin_conn() as conn:
        methods = {r[0] for r in conn.execute("SELECT auth_method FROM pg_hba_file_rules")}
    assert methods == {"scram-sha-256"}
    # The socket's folder shuts out every other OS user (unix_socket_permissions 0700 as well, from
    # the server's next start).
    assert pg.socket_dir.stat().st_mode & 0o077 == 0


def test_the_services_role_is_no_superuser_and_owns_nothing(base_settings: Settings) -> None:
    with psycopg.connect(base_settings.db.conninfo()) as conn:
        row = conn.execute(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        assert row == (False, False, False, False)
        # Sessions' temporary tables aside (the processor stages its COPY in some).
        owned = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relowner = (SELECT oid FROM pg_roles WHERE rolname = current_user) "
            "AND n.nspname !~ '^pg_(toast_)?temp_'"
        ).fetchone()
        assert owned == (0,)


@pytest.mark.parametrize(
    "statement",
    [
        "ALTER TABLE reading_values DISABLE TRIGGER readings_append_only",
        "ALTER TABLE reading_values DISABLE TRIGGER ALL",
        "DROP TRIGGER readings_append_only ON reading_values",
        "SET session_replication_role = replica",
        "UPDATE reading_values SET value = value + 1",
        "DELETE FROM reading_values",
        "TRUNCATE reading_values",
        "UPDATE audit_chain SET rows_sha256 = sha256(rows_sha256)",
        "DELETE FROM audit_chain",
        "TRUNCATE audit_chain",
        # Moving a series to another tenant, or swapping import and export, rewrites its readings.
        "UPDATE series SET tenant_id = 'victim', device_id = 'd9' WHERE series_id = 42",
        "UPDATE series SET metric = CASE metric WHEN 'energy_import_kwh' THEN 'energy_export_kwh' "
        "ELSE 'energy_import_kwh' END",
        "DELETE FROM series",
        "TRUNCATE series",
        "UPDATE agg_keys SET tenant_id = 'victim'",
        "DELETE FROM agg_keys",
        "TRUNCATE agg_keys",
        # Retiring hides a day from `audit verify`; only the owner's retention function may.
        "UPDATE audit_chain SET retired = true WHERE day >= '2000-01-01'",
        "UPDATE retention_floor SET raw_days = 1",
        "DELETE FROM retention_floor",
        "INSERT INTO retention_floor (singleton, raw_days) VALUES (false, 1)",
        "SELECT drop_raw_chunks(now())",
        "SELECT drop_raw_chunks(now() - interval '2 days')",
        "SELECT drop_raw_chunks(now() - interval '4 years')",
        "CREATE TABLE forged (a int)",
    ],
)
def test_the_services_role_cannot_rewrite_evidence(base_settings: Settings, statement: str) -> None:
    error = _refused(base_settings, statement)
    assert "must be owner" in error or "permission denied" in error or "refused" in error, error


def test_the_services_role_still_does_its_work(base_settings: Settings) -> None:
    """What the services need stays granted: the registry, temp tables, new keys, retiring what is dropped."""
    run = uuid.uuid4().hex[:8]
    with psycopg.connect(base_settings.db.conninfo()) as conn:
        conn.execute("SELECT count(*) FROM tenants")
        conn.execute("CREATE TEMP TABLE scratch (a int)")
        conn.execute(
            "INSERT INTO series (tenant_id, device_id, metric) VALUES (%s, 'd', 'power_kw') "
            "ON CONFLICT DO NOTHING",
            (f"roles-{run}",),
        )
        conn.execute(
            "INSERT INTO agg_keys (scope, tenant_id, entity_id, metric) VALUES ('device', %s, 'd', 'power_kw') "
            "ON CONFLICT DO NOTHING",
            (f"roles-{run}",),
        )
        conn.execute("SELECT retire_dropped_audit_days()")
        assert conn.execute("SELECT raw_days FROM retention_floor").fetchone() == (
            retention_floor_days(base_settings),
        )
        conn.rollback()


def test_drop_raw_chunks_refuses_a_cutoff_inside_the_owners_floor(base_settings: Settings) -> None:
    """The floor is what the owner configured at migration (five years by default), whatever a service asks."""
    floor = retention_floor_days(base_settings)
    with psycopg.connect(base_settings.db.conninfo()) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=f"at least {floor} days"):
            conn.execute("SELECT drop_raw_chunks(now() - make_interval(days => %s - 1))", (floor,))
        conn.rollback()
        # A cutoff past the floor runs (dropping nothing from this century).
        conn.execute("SELECT drop_raw_chunks('1980-01-01T00:00:00Z')")
        conn.rollback()


def test_owner_rights_functions_search_pg_temp_last(base_settings: Settings) -> None:
    """A caller's temporary table or function cannot stand in for one a SECURITY DEFINER function uses."""
    with psycopg.connect(base_settings.db.conninfo()) as conn:
        rows = conn.execute(
            "SELECT proname, proconfig FROM pg_proc WHERE prosecdef AND pronamespace = 'public'::regnamespace"
        ).fetchall()
    assert {name for name, _ in rows} >= {"drop_raw_chunks", "retire_dropped_audit_days"}
    for name, config in rows:
        assert "search_path=public, pg_temp" in (config or []), (name, config)
