"""The stack's services start wherever the checkout lives, e.g. under /root (mode 0700).

As root, PostgreSQL runs as `postgres` and Mosquitto drops to `mosquitto`; neither could reach a state
dir under a folder only root may enter, and initdb failed with nothing but its exit status. These
tests start both services in such a folder, on ports of their own, beside the shared stack.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pydantic import SecretStr

from deploy.local.services import Kafka, Mosquitto, Postgres, Service
from deploy.local.stack import app_dir, default_cache_dir, ensure_secrets, secure_app_dir
from meterflow.settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def private_checkout() -> Iterator[Settings]:
    """Settings whose state dir lies in a 0700 folder, as a clone in /root would. A short path: a Unix
    socket's path has at most 107 bytes."""
    home = Path(tempfile.mkdtemp(prefix="mf-home-", dir="/tmp"))
    state = home / "meterflow" / ".stack"
    state.mkdir(parents=True)
    home.chmod(0o700)
    ensure_secrets(state)
    settings = Settings(
        state_dir=state,
        db={"port": _free_port()},
        mqtt={"port": _free_port(), "tls_port": _free_port(), "service_port": _free_port()},
        kafka={"bootstrap": f"127.0.0.1:{_free_port()}", "controller_port": _free_port()},
    ).with_state_secrets()
    yield settings
    shutil.rmtree(home)


def _run(svc: Service) -> None:
    try:
        svc.start()
        svc.wait_healthy(120)
        svc.after_healthy()
        assert svc.status().healthy
    finally:
        svc.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="services run as their own users only when started by root")
def test_services_start_in_a_state_dir_inside_a_private_folder(private_checkout: Settings) -> None:
    home = private_checkout.state_path.parent.parent
    _run(Postgres(private_checkout, default_cache_dir()))
    _run(Mosquitto(private_checkout, default_cache_dir()))
    # Only search permission was granted, and only to the services' users: the folder stays private.
    assert home.stat().st_mode & 0o777 in (0o700, 0o710)
    for user, may in (("postgres", True), ("mosquitto", True), ("nobody", False)):
        reach = subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(home)], check=False)
        listing = subprocess.run(
            ["runuser", "-u", user, "--", "ls", str(home)], capture_output=True, check=False
        )
        assert (reach.returncode == 0) is may, user
        assert listing.returncode != 0, user


def test_a_failing_initdb_shows_its_own_error_and_what_to_do(private_checkout: Settings) -> None:
    pg = Postgres(private_checkout, default_cache_dir())
    pg.data_dir.mkdir(parents=True)
    (pg.data_dir / "left-over").write_text("not a database")
    with pytest.raises(RuntimeError) as failed:
        pg.start()
    message = str(failed.value)
    assert "initdb failed" in message
    assert "exists but is not empty" in message  # initdb's own stderr
    assert "run `meterflow stack up` again" in message


def test_an_older_installation_is_upgraded_in_place(private_checkout: Settings) -> None:
    """Data made by the previous stack: `trust` on the socket, the services' role with the published
    password and owning the database. One `stack up` step later none of it holds."""
    pg = Postgres(private_checkout, default_cache_dir())
    db = private_checkout.db
    try:
        pg.start()
        pg.wait_healthy(120)
        pg.after_healthy()
        (pg.data_dir / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )
        with pg._admin_conn() as conn:
            conn.execute("SELECT pg_reload_conf()")
            conn.execute(f"ALTER ROLE {db.user} PASSWORD 'meterflow-dev'")
            conn.execute(f"ALTER DATABASE {db.name} OWNER TO {db.user}")
        with psycopg.connect(host=str(pg.socket_dir), port=db.port, user="postgres", dbname="postgres"):
            pass  # the old hole: no password over the socket

        pg.after_healthy()  # what `stack up` runs on a healthy server

        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(host=str(pg.socket_dir), port=db.port, user="postgres", dbname="postgres")
        old = db.model_copy(update={"password": SecretStr("meterflow-dev")})
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(old.conninfo())
        with psycopg.connect(db.conninfo()) as conn:
            owner = conn.execute(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
            ).fetchone()
        assert owner == (db.owner_user,)
    finally:
        pg.stop()


def _nobody_reads(path: Path) -> bool:
    return (
        subprocess.run(["runuser", "-u", "nobody", "--", "cat", str(path)], capture_output=True).returncode
        == 0
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another OS user")
def test_another_host_user_reads_no_telemetry_at_rest(private_checkout: Settings) -> None:
    """The attacker is any local account: it goes for Kafka's segments (every tenant's readings and
    the dead letters' payloads), Mosquitto's persistence and the apps' logs, also on an installation
    made before the folders were private, which `stack up` upgrades without a restart."""
    state = private_checkout.state_path
    state.parent.parent.chmod(0o755)  # the checkout's own folder is no barrier here
    kafka = Kafka(private_checkout, default_cache_dir())
    mosquitto = Mosquitto(private_checkout, default_cache_dir())
    for svc in (mosquitto, kafka):
        _run(svc)  # topics created, so segment files exist; Mosquitto writes its store on exit
    segment = next(kafka.data_dir.rglob("*.log"))
    store = mosquitto.home / "data" / "mosquitto.db"
    secure_app_dir(private_checkout)
    app_log = app_dir(private_checkout) / "collector.log"
    app_log.write_text("refused payload\n")
    app_log.chmod(0o644)
    targets = (segment, store, app_log)
    assert store.exists()
    assert not any(_nobody_reads(path) for path in targets)

    # An older installation: service folders 0755 and files 0644, readable by anyone.
    for folder in (kafka.home, mosquitto.home, app_dir(private_checkout)):
        folder.chmod(0o755)
    for path in targets:
        path.chmod(0o644)
    assert all(_nobody_reads(path) for path in targets)
    for svc in (mosquitto, kafka):
        svc.secure_home()  # what `stack up` runs first, on running services too
    secure_app_dir(private_checkout)
    assert not any(_nobody_reads(path) for path in targets)
