"""The local stack's generated configuration: who may be which client, how PostgreSQL authenticates."""

from __future__ import annotations

import re
import struct
from pathlib import Path

from deploy.local.services import Mosquitto, Postgres
from meterflow.settings import Settings


def _listeners(conf: str) -> dict[int, str]:
    """Each listener's block of a mosquitto.conf, by port."""
    blocks = re.split(r"^listener ", conf, flags=re.MULTILINE)[1:]
    return {int(b.split()[0]): b for b in blocks}


def test_gateways_cannot_choose_their_client_id_and_services_listen_apart(tmp_path: Path) -> None:
    """Mosquitto hands a session to whoever presents its client id: on the gateway listeners the id
    is the username, and the service listener, where ids are free, admits the service account only."""
    settings = Settings(state_dir=tmp_path)
    broker = Mosquitto(settings, tmp_path / "cache")
    conf = broker._render_conf()
    assert "per_listener_settings true" in conf
    listeners = _listeners(conf)
    mqtt = settings.mqtt
    assert set(listeners) == {mqtt.port, mqtt.tls_port, mqtt.service_port}
    for port in (mqtt.port, mqtt.tls_port):
        block = listeners[port]
        assert "use_username_as_clientid true" in block
        assert f"password_file {broker.passwd_file}\n" in block
        assert "allow_anonymous false" in block
    service = listeners[mqtt.service_port]
    assert "use_username_as_clientid" not in service
    assert f"password_file {broker.service_passwd_file}\n" in service
    assert f"acl_file {broker.service_acl_file}\n" in service
    assert "allow_anonymous false" in service


def test_service_listener_files_hold_the_service_account_only(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path, mqtt={"service_password": "a-generated-secret-0123456789"})
    broker = Mosquitto(settings, tmp_path / "cache")
    broker.home.mkdir(parents=True)
    assert broker.sync_service_auth()
    users = [line.split(":")[0] for line in broker.service_passwd_file.read_text().splitlines()]
    assert users == [settings.mqtt.service_user]
    assert not broker.sync_service_auth()  # unchanged password: nothing rewritten, no reload


def test_postgres_trusts_no_one(tmp_path: Path) -> None:
    pg = Postgres(Settings(state_dir=tmp_path), tmp_path / "cache")
    pg.data_dir.mkdir(parents=True)
    pg._write_hba()
    rules = [
        line.split()
        for line in (pg.data_dir / "pg_hba.conf").read_text().splitlines()
        if line and line[0] != "#"
    ]
    assert rules and all(rule[-1] == "scram-sha-256" for rule in rules)


def test_search_acl_keeps_what_the_folder_granted() -> None:
    from deploy.local.services import acl_granting_search

    first = acl_granting_search(b"", 0o700, 108)
    assert first is not None
    second = acl_granting_search(first, 0o710, 109)
    assert second is not None
    entries = sorted(struct.unpack_from("<HHI", second, 4 + 8 * i) for i in range((len(second) - 4) // 8))
    owner, user_a, user_b, group, mask, other = entries
    assert owner[:2] == (0x01, 0o7) and group[:2] == (0x04, 0) and other[:2] == (0x20, 0)
    assert (user_a, user_b) == ((0x02, 1, 108), (0x02, 1, 109))  # search only, for those two
    assert mask[:2] == (0x10, 1)
    assert acl_granting_search(second, 0o710, 109) is None  # nothing to add
