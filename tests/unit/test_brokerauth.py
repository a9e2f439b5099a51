from __future__ import annotations

from meterflow import brokerauth


def test_hash_verifies_and_uses_mosquitto_format() -> None:
    h = brokerauth.hash_password("s3cret")
    assert h.startswith(f"$7${brokerauth.PBKDF2_ITERATIONS}$")
    assert brokerauth.verify_password("s3cret", h)
    assert not brokerauth.verify_password("wrong", h)
    assert not brokerauth.verify_password("s3cret", "garbage")


def test_acl_confines_a_gateway_to_its_own_tenant_and_id() -> None:
    acl = brokerauth.render_acl("svc", [brokerauth.GatewayAccount("acme", "gw-1", "$7$x")])
    assert "user gw-1\ntopic write meterflow/v1/acme/gw-1/#" in acl
    assert "topic write spBv1.0/acme/+/gw-1\n" in acl
    assert "meterflow/v1/+/" not in acl


def test_sync_writes_both_files(tmp_path) -> None:
    gw = brokerauth.GatewayAccount("acme", "gw-1", "$7$1$a$b")
    reloaded = brokerauth.sync(
        passwd_file=tmp_path / "passwd",
        acl_file=tmp_path / "acl",
        pid_file=tmp_path / "missing.pid",
        service=[brokerauth.BrokerAccount("svc", "$7$1$c$d")],
        gateways=[gw],
    )
    assert not reloaded
    assert (tmp_path / "passwd").read_text() == "svc:$7$1$c$d\ngw-1:$7$1$a$b\n"
    assert (tmp_path / "passwd").stat().st_mode & 0o077 == 0
