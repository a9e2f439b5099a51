"""The access policy's tenant rules, role by role and kind by kind, without a database."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from api.access import Access, Kind
from api.problems import Problem

pytestmark = pytest.mark.unit

OWN, OTHER = "acme", "rival"
KEYS = {
    "admin": Access("k0", "admin", None),
    "enterprise": Access("k1", "enterprise", OWN),
    "operator": Access("k2", "operator", OWN),
    "regulator": Access("k3", "regulator", None),
}
# (role, kind) -> reads another tenant's data of that kind
FOREIGN_READS = {
    ("admin", Kind.RAW): True, ("admin", Kind.AGGREGATE): True, ("admin", Kind.ACCOUNT): True,
    ("enterprise", Kind.RAW): False, ("enterprise", Kind.AGGREGATE): False, ("enterprise", Kind.ACCOUNT): False,
    ("operator", Kind.RAW): False, ("operator", Kind.AGGREGATE): True, ("operator", Kind.ACCOUNT): False,
    ("regulator", Kind.RAW): False, ("regulator", Kind.AGGREGATE): True, ("regulator", Kind.ACCOUNT): True,
}  # fmt: skip


def _status(call: Callable[[], object]) -> int:
    try:
        call()
    except Problem as exc:
        return exc.status
    return 200


@pytest.mark.parametrize(("role", "kind"), list(FOREIGN_READS))
def test_reading_another_tenant(role: str, kind: Kind) -> None:
    who = KEYS[role]
    status = _status(lambda: who.read_tenant(OTHER, kind))
    if FOREIGN_READS[(role, kind)]:
        assert status == 200
    else:
        # A regulator is told it may never read raw data; anyone else learns nothing about the tenant.
        assert status == (403 if role == "regulator" else 404)


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("role", ["enterprise", "operator"])
def test_a_tenant_key_reads_its_own_tenant(role: str, kind: Kind) -> None:
    KEYS[role].read_tenant(OWN, kind)
    assert KEYS[role].tenant_scope(None, kind) in (OWN, None)


def test_list_scopes() -> None:
    assert KEYS["admin"].tenant_scope(None, Kind.RAW) is None
    assert KEYS["enterprise"].tenant_scope(None, Kind.ACCOUNT) == OWN
    assert KEYS["operator"].tenant_scope(None, Kind.AGGREGATE) is None
    assert KEYS["operator"].tenant_scope(None, Kind.ACCOUNT) == OWN
    assert KEYS["regulator"].tenant_scope(None, Kind.ACCOUNT) is None
    assert _status(lambda: KEYS["regulator"].tenant_scope(None, Kind.RAW)) == 403
    assert _status(lambda: KEYS["enterprise"].tenant_scope(OTHER, Kind.ACCOUNT)) == 404


@pytest.mark.parametrize(
    ("role", "tenant", "status"),
    [
        ("admin", OTHER, 200),
        ("enterprise", OWN, 200),
        ("enterprise", OTHER, 404),
        ("operator", OWN, 403),
        ("operator", OTHER, 404),
        ("regulator", OTHER, 403),
    ],
)
def test_writes(role: str, tenant: str, status: int) -> None:
    assert _status(lambda: KEYS[role].write_tenant(tenant)) == status


def test_only_admins_pass_require_admin() -> None:
    assert [_status(who.require_admin) for who in KEYS.values()] == [200, 403, 403, 403]


def test_vpp_visibility_parameters() -> None:
    assert KEYS["admin"].vpp_params() == {"all_vpps": True, "owner": None, "member": None}
    assert KEYS["regulator"].vpp_params() == {"all_vpps": True, "owner": None, "member": None}
    assert KEYS["operator"].vpp_params() == {"all_vpps": False, "owner": OWN, "member": OWN}
    assert KEYS["enterprise"].vpp_params() == {"all_vpps": False, "owner": None, "member": OWN}
