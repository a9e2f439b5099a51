from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from deploy.local.stack import ensure_secrets
from meterflow.settings import SECRET_FILES, SECRETS_DIR, InsecureSecretsError, Settings


def test_env_prefix_and_nested_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERFLOW_KAFKA__PARTITIONS", "12")
    monkeypatch.setenv("METERFLOW_DB__PORT", "25432")
    monkeypatch.setenv("METERFLOW_BOOTSTRAP_ADMIN_KEY", "k")
    s = Settings()
    assert s.kafka.partitions == 12
    assert s.db.port == 25432
    assert s.bootstrap_admin_key is not None and s.bootstrap_admin_key.get_secret_value() == "k"


def test_defaults_avoid_standard_ports() -> None:
    s = Settings()
    assert (s.mqtt.port, s.kafka.bootstrap.rsplit(":", 1)[1], s.db.port) == (18830, "19092", 15432)


def test_password_with_special_characters_survives_alembic_config() -> None:
    from sqlalchemy.engine import make_url

    from processing.migrate import alembic_config

    # Alembic connects as the owner role (migrations), with its password.
    s = Settings(db={"owner_password": "p%w@d/:x"})
    url = alembic_config(s).get_main_option("sqlalchemy.url")
    assert url is not None and make_url(url).password == "p%w@d/:x"


def test_kraft_cluster_ids_never_start_with_a_dash() -> None:
    """The storage tool reads an id starting with '-' as an option (one clean-clone CI run failed so)."""
    from deploy.local.services import kraft_cluster_id

    ids = [kraft_cluster_id() for _ in range(2000)]
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)


# --- secrets (issue 13, finding 3: default service credentials) -----------------------------------

SECRET_ENV = (
    "METERFLOW_MQTT__SERVICE_PASSWORD",
    "METERFLOW_MQTT__CLIENT_ID",
    "METERFLOW_DB__PASSWORD",
    "METERFLOW_DB__OWNER_PASSWORD",
    "METERFLOW_BOOTSTRAP_ADMIN_KEY",
    "METERFLOW_DEV_MODE",
)


@pytest.fixture
def bare_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No secret in the environment and a state dir of the test's own (nothing generated yet)."""
    for name in SECRET_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("METERFLOW_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def test_no_secret_has_a_default(bare_env: Path) -> None:
    s = Settings()
    assert s.mqtt.service_password.get_secret_value() == ""
    assert s.db.password.get_secret_value() == ""
    assert s.db.owner_password.get_secret_value() == ""
    assert s.bootstrap_admin_key is None
    with pytest.raises(InsecureSecretsError, match="METERFLOW_DB__PASSWORD is empty"):
        s.require_secrets()


@pytest.mark.parametrize("published", ["meterflow-collector-dev", "meterflow-dev"])
def test_the_published_development_passwords_are_refused(
    bare_env: Path, monkeypatch: pytest.MonkeyPatch, published: str
) -> None:
    """An attacker who read the old settings.py logs in with these: no process may run with them."""
    ensure_secrets(bare_env)
    monkeypatch.setenv("METERFLOW_MQTT__SERVICE_PASSWORD", published)
    with pytest.raises(InsecureSecretsError, match="SERVICE_PASSWORD is a published default"):
        Settings().require_secrets()
    monkeypatch.setenv("METERFLOW_DEV_MODE", "1")
    Settings().require_secrets()  # the explicit development flag allows them


def test_every_entry_point_refuses_default_secrets(bare_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from meterflow.cli import app

    ensure_secrets(bare_env)
    monkeypatch.setenv("METERFLOW_DB__PASSWORD", "meterflow-dev")
    for argv in (["collector"], ["processor"], ["vpp"], ["api"], ["db", "migrate"], ["intensity", "serve"]):
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 2, (argv, result.output)
        assert "METERFLOW_DB__PASSWORD is a published default" in result.output


def test_a_weak_bootstrap_admin_key_is_refused(bare_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ensure_secrets(bare_env)
    monkeypatch.setenv("METERFLOW_BOOTSTRAP_ADMIN_KEY", "admin")
    with pytest.raises(InsecureSecretsError, match="METERFLOW_BOOTSTRAP_ADMIN_KEY is too short"):
        Settings().require_secrets()


def test_generated_secrets_are_private_stable_and_read_by_every_process(
    bare_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    created = ensure_secrets(bare_env)
    folder = bare_env / SECRETS_DIR
    assert sorted(created) == sorted([*SECRET_FILES.values(), "postgres-password"])
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in folder.iterdir())
    assert ensure_secrets(bare_env) == []  # kept: the services were provisioned with them

    s = Settings()
    s.require_secrets()
    assert s.db.password.get_secret_value() == (folder / "db-password").read_text().strip()
    assert len(s.mqtt.service_password.get_secret_value()) >= 40
    assert re.fullmatch(r"meterflow-collector-[0-9a-f]{32}", s.mqtt.client_id)
    # The environment still wins (deployments that inject secrets).
    monkeypatch.setenv("METERFLOW_DB__PASSWORD", "from-the-environment-0123456789")
    assert Settings().db.password.get_secret_value() == "from-the-environment-0123456789"


def test_stack_fills_in_generated_secrets_where_settings_held_defaults(bare_env: Path) -> None:
    before = Settings(
        mqtt={"service_password": "meterflow-collector-dev"}, db={"password": "kept-0123456789"}
    )
    ensure_secrets(bare_env)
    after = before.with_state_secrets()
    generated = (bare_env / SECRETS_DIR / "mqtt-service-password").read_text().strip()
    assert after.mqtt.service_password.get_secret_value() == generated
    assert after.db.password.get_secret_value() == "kept-0123456789"


def test_a_collector_without_a_client_id_refuses_to_start(bare_env: Path) -> None:
    """No shared, guessable default id: each collector has its own (generated by `stack up`)."""
    from typer.testing import CliRunner

    from meterflow.cli import app

    ensure_secrets(bare_env)
    (bare_env / SECRETS_DIR / SECRET_FILES[("mqtt", "client_id")]).unlink()
    result = CliRunner().invoke(app, ["collector"])
    assert result.exit_code == 2
    assert "METERFLOW_MQTT__CLIENT_ID is empty" in result.output


def test_the_api_factory_refuses_a_weak_admin_key_as_uvicorn_runs_it(
    bare_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`uvicorn --factory api.app:app_factory` bypasses the CLI: the app itself must refuse to register
    `admin` (or a published default) as a live admin key."""
    from api.app import app_factory

    ensure_secrets(bare_env)
    app_factory()  # generated secrets and no bootstrap key: starts
    for weak in ("admin", "meterflow-dev"):
        monkeypatch.setenv("METERFLOW_BOOTSTRAP_ADMIN_KEY", weak)
        with pytest.raises(InsecureSecretsError, match="METERFLOW_BOOTSTRAP_ADMIN_KEY"):
            app_factory()
    monkeypatch.setenv("METERFLOW_DEV_MODE", "1")
    app_factory()
