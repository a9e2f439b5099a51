from __future__ import annotations

import pytest

from meterflow.settings import Settings


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

    s = Settings(db={"password": "p%w@d/:x"})
    url = alembic_config(s).get_main_option("sqlalchemy.url")
    assert url is not None and make_url(url).password == "p%w@d/:x"


def test_kraft_cluster_ids_never_start_with_a_dash() -> None:
    """The storage tool reads an id starting with '-' as an option (one clean-clone CI run failed so)."""
    from deploy.local.services import kraft_cluster_id

    ids = [kraft_cluster_id() for _ in range(2000)]
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)
