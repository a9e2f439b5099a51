from __future__ import annotations

import time

from deploy.local import stack
from meterflow.settings import Settings


def test_every_service_is_healthy_with_pid_port_and_log(base_settings: Settings) -> None:
    for status in stack.status(base_settings):
        assert status.healthy, status
        assert status.pid is not None
        assert status.log_file.exists()


def test_stack_up_twice_is_harmless(base_settings: Settings) -> None:
    before = {s.name: s.pid for s in stack.status(base_settings)}
    started = time.monotonic()
    stack.up(base_settings, lambda _msg: None)
    assert {s.name: s.pid for s in stack.status(base_settings)} == before
    assert time.monotonic() - started < 60


def test_timescaledb_edition_is_detected(base_settings: Settings) -> None:
    import psycopg

    with psycopg.connect(base_settings.db.conninfo()) as conn:
        license_ = conn.execute("SELECT current_setting('timescaledb.license')").fetchone()
        features: dict[str, bool] = dict(
            conn.execute("SELECT feature, enabled FROM schema_features").fetchall()
        )
        hypertables = {
            r[0] for r in conn.execute("SELECT hypertable_name FROM timescaledb_information.hypertables")
        }
    assert license_ is not None
    assert features["continuous_aggregates"] is (license_[0] == "timescale")
    assert {"reading_values", "agg_1m_values", "agg_15m_values", "agg_1h_values"} <= hypertables


def test_stack_up_leaves_running_services_their_privileges(base_settings: Settings) -> None:
    """stack up provisions roles while services run: their sessions' staging tables stay theirs."""
    import psycopg

    with psycopg.connect(base_settings.db.conninfo()) as conn:
        conn.execute("CREATE TEMP TABLE staged (a int)")
        conn.commit()
        stack.up(base_settings, lambda _msg: None)
        conn.execute("INSERT INTO staged VALUES (1)")
        assert conn.execute("SELECT count(*) FROM staged").fetchone() == (1,)


def test_generated_secrets_are_private(base_settings: Settings) -> None:
    folder = base_settings.state_path / "secrets"
    assert folder.stat().st_mode & 0o777 == 0o700
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in folder.iterdir())
    assert base_settings.secret_problems() == []
