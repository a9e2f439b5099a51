"""Attacks on VPP ownership, as a hostile tenant or operator would try them (issue 13, findings 1 and 6,
and its review): joining another tenant's VPP by naming it, reading it afterwards, foreign ids in paths
and bodies, deciding enrolments of a VPP one does not own, dispatching or changing holidays, writing
membership straight into the database, flooding owners with requests, probing VPP ids, reading another
tenant's resource through a small node, and memberships carried over by migration 0009."""

from __future__ import annotations

import asyncio
from contextlib import ExitStack
from dataclasses import dataclass

import httpx
import psycopg
import pytest
from prometheus_client import REGISTRY

from meterflow.settings import Settings
from processing.vpp import Fleet as VppFleet
from processing.vpp import load_fleet as load_vpp_fleet
from tests.integration.test_api_fixtures import ApiServer, Fleet, load_fleet

pytestmark = pytest.mark.integration

DAY = {"start": "2025-03-10T00:00:00+08:00", "end": "2025-03-11T00:00:00+08:00"}
EVENT = {"start": "2025-03-12T14:00:00+08:00", "end": "2025-03-12T15:00:00+08:00", "direction": "up",
         "committed_kw": 30, "program": "victim-programme"}  # fmt: skip


@dataclass
class Victim:
    """Tenant B's battery in VPP X, owned by operator O; tenant A is the attacker."""

    fleet: Fleet
    vpp: str
    operator: str
    battery: str
    attacker_device: str
    keys: dict[str, str]


def _key(api: ApiServer, role: str, tenant: str | None) -> str:
    with api.client() as http:
        r = http.post("/v1/api-keys", json={"role": role, "tenant": tenant})
        assert r.status_code == 201, r.text
        return str(r.json()["key"])


@pytest.fixture(scope="module")
def victim(base_settings: Settings, api: ApiServer) -> Victim:
    fleet = load_fleet(base_settings)
    vpp, operator, idle = f"vpp-east-{fleet.run}", f"grid{fleet.run}", f"idle{fleet.run}"
    battery, attacker_device = f"{fleet.other}-bat", f"{fleet.tenant}-s1-pv"
    with api.client() as http:
        for op in (operator, idle):
            assert (
                http.post("/v1/enterprises", json={"tenant": op, "name": op, "role": "operator"}).status_code
                == 201
            )
        assert http.post("/v1/vpps", json={"vpp": vpp, "name": "east", "owner": operator}).status_code == 201
        body = {"tenant": fleet.other, "device": battery, "role": "resource", "device_type": "battery", "vpp": vpp,
                "rated_power_kw": 100, "energy_capacity_kwh": 200}  # fmt: skip
        assert http.post("/v1/devices", json=body).status_code == 201
        model = {"tenant": fleet.other, "resource_class": "battery"}
        assert http.put(f"/v1/devices/{battery}/resource", json=model).status_code == 200
        assert http.post(f"/v1/vpps/{vpp}/dr-events", json=EVENT).status_code == 201
    keys = {
        "attacker": _key(api, "enterprise", fleet.tenant),
        "victim": _key(api, "enterprise", fleet.other),
        "owner": _key(api, "operator", operator),
        "idle": _key(api, "operator", idle),
    }
    return Victim(fleet, vpp, operator, battery, attacker_device, keys)


def _members(settings: Settings, vpp: str) -> dict[tuple[str, str], float]:
    """The resources the vpp service counts in `vpp` (its own registry query), with their rated kW."""

    async def load() -> VppFleet:
        async with await psycopg.AsyncConnection.connect(settings.db.conninfo()) as conn:
            return await load_vpp_fleet(conn)

    fleet = asyncio.run(load())
    if vpp not in fleet.vpps:
        return {}
    group = fleet.vpps.index(vpp)
    return {
        key: float(fleet.models.rated_kw[i])
        for i, key in enumerate(fleet.keys)
        if fleet.models.group[i] == group
    }


def _vpp_reads(v: Victim) -> list[str]:
    return [
        f"/v1/vpps/{v.vpp}",
        f"/v1/vpps/{v.vpp}/capacity",
        f"/v1/vpps/{v.vpp}/capacity/nodes",
        f"/v1/vpps/{v.vpp}/stale-devices",
        f"/v1/vpps/{v.vpp}/dr-events",
    ]


def test_enterprise_naming_a_foreign_vpp_in_its_resource_does_not_join_it(
    api: ApiServer, victim: Victim, base_settings: Settings
) -> None:
    """Finding 1, step by step: the enterprise PUTs its own device's resource model with another tenant's
    VPP. It must not join: the VPP's members and nameplate stay the victim's, and the key reads nothing."""
    v = victim
    before = _members(base_settings, v.vpp)
    assert before == {(v.fleet.other, v.battery): 100.0}
    attack = {"tenant": v.fleet.tenant, "resource_class": "battery", "vpp": v.vpp, "rated_power_kw": 200,
              "energy_capacity_kwh": 400}  # fmt: skip
    with api.client(v.keys["attacker"]) as http:
        r = http.put(f"/v1/devices/{v.attacker_device}/resource", json=attack)
        assert r.status_code == 409, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"].endswith("/not-enrolled")
        # Nothing else gained: every read of the VPP is as if it did not exist, and the list omits it.
        for path in _vpp_reads(v):
            assert http.get(path).status_code == 404, path
        history = http.get(f"/v1/vpps/{v.vpp}/capacity/history", params=DAY)
        assert history.status_code == 404
        assert v.vpp not in {x["vpp"] for x in http.get("/v1/vpps").json()["data"]}
        assert "victim-programme" not in http.get(f"/v1/vpps/{v.vpp}/dr-events").text
        with http.stream("GET", f"/v1/vpps/{v.vpp}/capacity/stream") as stream:
            assert stream.status_code == 404
    assert _members(base_settings, v.vpp) == before
    with psycopg.connect(base_settings.db.conninfo()) as conn:
        row = conn.execute(
            "SELECT d.vpp, r.device_id FROM devices d LEFT JOIN vpp_resources r USING (tenant_id, device_id) "
            "WHERE d.tenant_id = %s AND d.device_id = %s",
            (v.fleet.tenant, v.attacker_device),
        ).fetchone()
    assert row == (None, None), "the refused request wrote nothing"


def test_an_approved_member_cannot_raise_its_nameplate_in_the_owners_vpp(
    api: ApiServer, victim: Victim, base_settings: Settings
) -> None:
    """Review of issue 13: once admitted, a member PUTs its own model again with twice the rated power and
    other storage limits. The owner's VPP must keep counting what it admitted; an identical PUT stays 200."""
    v = victim
    before = _members(base_settings, v.vpp)
    assert before[(v.fleet.other, v.battery)] == 100.0
    admitted = {"tenant": v.fleet.other, "resource_class": "battery"}
    raises = [
        {**admitted, "rated_power_kw": 200},
        {**admitted, "energy_capacity_kwh": 4000},
        {**admitted, "charge_max_kw": 1e6, "discharge_max_kw": 1e6},
        {**admitted, "resource_class": "base_station", "reserved_soc_pct": 10},
    ]
    with api.client(v.keys["victim"]) as http:
        for body in raises:
            r = http.put(f"/v1/devices/{v.battery}/resource", json=body)
            assert r.status_code == 409, (body, r.text)
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["type"].endswith("/enrolled-model")
        assert http.put(f"/v1/devices/{v.battery}/resource", json=admitted).status_code == 200
    assert _members(base_settings, v.vpp) == before
    with api.client() as http:
        model = http.get(f"/v1/devices/{v.battery}/resource", params={"tenant": v.fleet.other}).json()
    assert (model["rated_power_kw"], model["energy_capacity_kwh"], model["charge_max_kw"]) == (100, 200, None)


def test_membership_cannot_be_written_around_an_approved_enrolment(
    victim: Victim, base_settings: Settings
) -> None:
    """The database itself refuses a device in a VPP without an approved enrolment, rewriting an
    enrolment's history, and deleting it: no API bug can bypass the owner's approval."""
    v = victim
    with psycopg.connect(base_settings.db.conninfo(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CheckViolation, match="not enrolled"):
            conn.execute(
                "UPDATE devices SET vpp = %s WHERE tenant_id = %s AND device_id = %s",
                (v.vpp, v.fleet.tenant, v.attacker_device),
            )
        with pytest.raises(psycopg.errors.CheckViolation, match="not enrolled"):
            conn.execute(
                "INSERT INTO devices (tenant_id, device_id, vpp) VALUES (%s, %s, %s)",
                (v.fleet.tenant, f"sneak-{v.fleet.run}", v.vpp),
            )
        (enrolment,) = conn.execute(
            "INSERT INTO vpp_enrolments (vpp_id, tenant_id, device_id, status, requested_by) "
            "VALUES (%s, %s, %s, 'requested', 'attacker') RETURNING enrolment_id",
            (v.vpp, v.fleet.tenant, v.attacker_device),
        ).fetchone()  # type: ignore[misc]
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "UPDATE vpp_enrolments SET device_id = %s WHERE enrolment_id = %s", (v.battery, enrolment)
            )
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM vpp_enrolments WHERE enrolment_id = %s", (enrolment,))
        conn.execute(
            "UPDATE vpp_enrolments SET status = 'rejected', decided_by = 'test', decided_at = now() "
            "WHERE enrolment_id = %s",
            (enrolment,),
        )
        with pytest.raises(psycopg.errors.CheckViolation, match="cannot become"):
            conn.execute(
                "UPDATE vpp_enrolments SET status = 'approved' WHERE enrolment_id = %s", (enrolment,)
            )
        (vpp,) = conn.execute(
            "SELECT vpp FROM devices WHERE tenant_id = %s AND device_id = %s",
            (v.fleet.tenant, v.attacker_device),
        ).fetchone()  # type: ignore[misc]
    assert vpp is None


def test_enrolment_needs_the_owner_and_grants_only_aggregates(api: ApiServer, victim: Victim) -> None:
    """A request grants nothing until the owner approves; an approved member reads the VPP's aggregates
    and its own devices, never the other tenant's; leaving takes it all back. Foreign ids in bodies and
    paths are refused."""
    v = victim
    own_pv = v.attacker_device
    with api.client(v.keys["attacker"]) as http:
        # Someone else's device in the body.
        foreign = http.post(
            f"/v1/vpps/{v.vpp}/enrolments", json={"tenant": v.fleet.other, "device": v.battery}
        )
        assert foreign.status_code == 404
        own_tenant_foreign_device = http.post(
            f"/v1/vpps/{v.vpp}/enrolments", json={"tenant": v.fleet.tenant, "device": v.battery}
        )
        assert own_tenant_foreign_device.status_code == 404
        r = http.post(f"/v1/vpps/{v.vpp}/enrolments", json={"tenant": v.fleet.tenant, "device": own_pv})
        assert r.status_code == 201 and r.json()["status"] == "requested", r.text
        enrolment = r.json()["enrolment_id"]
        # The model goes with the request: the owner admits what it sees, and it stays fixed after.
        model = {"tenant": v.fleet.tenant, "resource_class": "pv", "rated_power_kw": 10}
        assert http.put(f"/v1/devices/{own_pv}/resource", json=model).status_code == 200
        # A second open request for the same device is a conflict, not a second membership.
        again = http.post(f"/v1/vpps/{v.vpp}/enrolments", json={"tenant": v.fleet.tenant, "device": own_pv})
        assert again.status_code == 409
        # Requesting is not joining; approving one's own request is not allowed.
        assert http.get(f"/v1/vpps/{v.vpp}/capacity").status_code == 404
        assert http.post(f"/v1/vpp-enrolments/{enrolment}/approve").status_code == 403
    with api.client(v.keys["idle"]) as http:
        assert http.post(f"/v1/vpp-enrolments/{enrolment}/approve").status_code == 404
        assert v.vpp not in {x["vpp"] for x in http.get("/v1/vpp-enrolments").json()["data"]}
    with api.client(v.keys["victim"]) as http:
        assert http.post(f"/v1/vpp-enrolments/{enrolment}/approve").status_code == 404
        assert http.post(f"/v1/vpp-enrolments/{enrolment}/leave").status_code == 404
    with api.client(v.keys["owner"]) as http:
        pending = http.get("/v1/vpp-enrolments", params={"vpp": v.vpp, "status": "requested"}).json()["data"]
        assert [(e["tenant"], e["device"]) for e in pending] == [(v.fleet.tenant, own_pv)]
        approved = http.post(f"/v1/vpp-enrolments/{enrolment}/approve", json={"note": "welcome"})
        assert approved.status_code == 200 and approved.json()["status"] == "approved", approved.text
        assert http.post(f"/v1/vpp-enrolments/{enrolment}/reject").status_code == 409
    with api.client(v.keys["attacker"]) as http:
        # Now a member: the admitted model is fixed for it (needing no vpp in the body).
        assert http.put(f"/v1/devices/{own_pv}/resource", json=model).status_code == 200
        assert (
            http.put(f"/v1/devices/{own_pv}/resource", json={**model, "rated_power_kw": 20}).status_code
            == 409
        )
        summary = http.get(f"/v1/vpps/{v.vpp}")
        assert summary.status_code == 200 and summary.json()["tenants"] == 2
        assert http.get(f"/v1/vpps/{v.vpp}/dr-events").status_code == 200
        # Per-device rows of the other member stay hidden.
        assert (
            http.get(f"/v1/devices/{v.battery}/resource", params={"tenant": v.fleet.other}).status_code == 404
        )
        listed = http.get("/v1/vpp-enrolments", params={"vpp": v.vpp}).json()["data"]
        assert {e["tenant"] for e in listed} == {v.fleet.tenant}
        left = http.post(f"/v1/vpp-enrolments/{enrolment}/leave")
        assert left.status_code == 200 and left.json()["status"] == "left"
        for path in _vpp_reads(v):
            assert http.get(path).status_code == 404, path


def test_operator_acts_only_on_the_vpps_it_owns(api: ApiServer, victim: Victim) -> None:
    """Finding 6: an operator dispatching a VPP it does not own, writing global holidays, reading another
    tenant's resource model and stale devices; the owner reads its members' models."""
    v = victim
    with api.client(v.keys["idle"]) as http:
        assert http.post(f"/v1/vpps/{v.vpp}/dr-events", json=EVENT).status_code == 404
        assert http.get(f"/v1/vpps/{v.vpp}/dr-events").status_code == 404
        assert http.get(f"/v1/vpps/{v.vpp}/stale-devices").status_code == 404
        holiday = http.put("/v1/dr-holidays/2025-03-11", json={"name": "skip the attacker's bad day"})
        assert holiday.status_code == 403 and holiday.json()["type"].endswith("/forbidden")
        model = http.get(f"/v1/devices/{v.battery}/resource", params={"tenant": v.fleet.other})
        assert model.status_code == 404
        assert http.get("/v1/devices", params={"tenant": v.fleet.other}).status_code == 404
        assert http.patch(f"/v1/vpps/{v.vpp}", json={"owner": None}).status_code == 403
        assert http.post("/v1/vpps", json={"vpp": f"mine-{v.fleet.run}", "name": "x"}).status_code == 403
    with api.client(v.keys["owner"]) as http:
        assert http.put("/v1/dr-holidays/2025-03-11", json={"name": "x"}).status_code == 403
        model = http.get(f"/v1/devices/{v.battery}/resource", params={"tenant": v.fleet.other})
        assert model.status_code == 200 and model.json()["vpp"] == v.vpp
        # The owner sees its members' resource models, not the rest of their tenant.
        pv = http.get(f"/v1/devices/{v.fleet.other}-s1-pv/resource", params={"tenant": v.fleet.other})
        assert pv.status_code == 404
        readings = http.get(f"/v1/devices/{v.battery}/readings", params={**DAY, "tenant": v.fleet.other})
        assert readings.status_code == 404
        created = http.post(f"/v1/vpps/{v.vpp}/dr-events", json={**EVENT, "program": "owner"})
        assert created.status_code == 201, created.text
        # Changing the VPP's member's resource model stays the member's (or an admin's) business.
        put = http.put(
            f"/v1/devices/{v.battery}/resource", json={"tenant": v.fleet.other, "resource_class": "battery"}
        )
        assert put.status_code == 404


def test_a_vpp_without_members_has_zero_capacity(api: ApiServer, victim: Victim) -> None:
    """A VPP registered before anyone joined is not an outage: zeros, not 503, and its stream starts."""
    empty = f"vpp-new-{victim.fleet.run}"
    with api.client() as http:
        assert (
            http.post("/v1/vpps", json={"vpp": empty, "name": "new", "owner": victim.operator}).status_code
            == 201
        )
    with api.client(victim.keys["owner"]) as http:
        now = http.get(f"/v1/vpps/{empty}/capacity")
        assert now.status_code == 200, now.text
        body = now.json()
        assert (body["up_kw"], body["nameplate_up_kw"], body["devices_online"], body["devices_stale"]) == (
            0,
            0,
            0,
            0,
        )
        with http.stream("GET", f"/v1/vpps/{empty}/capacity/stream") as stream:
            assert stream.status_code == 200
            first = next(line for line in stream.iter_lines() if line.startswith("data:"))
        assert '"devices_online":0' in first


def test_a_live_stream_ends_when_its_reader_leaves_the_vpp(
    api: ApiServer, victim: Victim, base_settings: Settings
) -> None:
    """Access is checked at every wake-up of the stream, not only when it opens: a member that leaves
    stops receiving the VPP's capacity at the next change."""
    v = victim
    device = f"streamer-{v.fleet.run}"
    with api.client() as http:
        assert http.post("/v1/devices", json={"tenant": v.fleet.tenant, "device": device}).status_code == 201
        joined = http.post(f"/v1/vpps/{v.vpp}/enrolments", json={"tenant": v.fleet.tenant, "device": device})
        assert joined.status_code == 201 and joined.json()["status"] == "approved"
    with (
        api.client(v.keys["attacker"]) as http,
        http.stream("GET", f"/v1/vpps/{v.vpp}/capacity/stream") as stream,
    ):
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert next(lines).startswith(":")  # no capacity published: a keep-alive
        left = http.post(f"/v1/vpp-enrolments/{joined.json()['enrolment_id']}/leave")
        assert left.status_code == 200
        with psycopg.connect(base_settings.db.conninfo(), autocommit=True) as conn:
            conn.execute("SELECT pg_notify('vpp_capacity', %s)", (v.vpp,))
        rest = list(lines)  # ends when the server closes the stream
    assert not any(line.startswith("data:") for line in rest)


def test_one_key_cannot_take_every_capacity_stream(api: ApiServer, victim: Victim) -> None:
    """Review of issue 13: a key opening streams until the process is full left every other tenant a 503.
    It gets its share (4 by default), then 429; another key still streams."""
    v = victim
    greedy = _key(api, "operator", v.operator)
    path = f"/v1/vpps/{v.vpp}/capacity/stream"
    with ExitStack() as held, api.client(greedy) as http:
        for _ in range(4):
            assert held.enter_context(http.stream("GET", path)).status_code == 200
        # Streamed, so that a 200 (the hole) fails here instead of waiting on an endless body.
        with http.stream("GET", path) as refused:
            assert refused.status_code == 429
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.headers["retry-after"]
        with api.client(v.keys["victim"]) as other, other.stream("GET", path) as stream:
            assert stream.status_code == 200


def _denied(role: str, reason: str) -> float:
    """The API runs in this process: its refusal counter, as /metrics would show it."""
    value = REGISTRY.get_sample_value("meterflow_api_access_denied_total", {"role": role, "reason": reason})
    return value or 0.0


def _tenant_with_devices(api: ApiServer, name: str, devices: int) -> tuple[str, list[str]]:
    """A fresh enterprise (so limits kept per tenant start empty), its devices and its key."""
    ids = [f"{name}-d{i}" for i in range(devices)]
    with api.client() as http:
        assert http.post("/v1/enterprises", json={"tenant": name, "name": name}).status_code == 201
        for device in ids:
            assert http.post("/v1/devices", json={"tenant": name, "device": device}).status_code == 201
    return _key(api, "enterprise", name), ids


def _assert_429(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"].endswith("/too-many-requests")
    assert 0 < int(r.headers["retry-after"]) <= 86_400


def test_request_and_withdraw_cannot_flood_the_owner(
    api: ApiServer, victim: Victim, base_settings: Settings
) -> None:
    """Review of issue 13: request, withdraw, request again, forever, each a permanent row in the owner's
    queue. A device gets enrolment_requests_per_device_day (5) a day, then 429; an admin is not held."""
    v = victim
    per_device = base_settings.vpp.enrolment_requests_per_device_day
    key, (device,) = _tenant_with_devices(api, f"churn{v.fleet.run}", 1)
    refused = _denied("enterprise", "enrolment-device-limit")
    path, body = f"/v1/vpps/{v.vpp}/enrolments", {"tenant": f"churn{v.fleet.run}", "device": device}
    with api.client(key) as http:
        for _ in range(per_device):
            r = http.post(path, json=body)
            assert r.status_code == 201, r.text
            assert http.post(f"/v1/vpp-enrolments/{r.json()['enrolment_id']}/leave").status_code == 200
        for _ in range(3):
            _assert_429(http.post(path, json=body))
    assert _denied("enterprise", "enrolment-device-limit") == refused + 3
    with psycopg.connect(base_settings.db.conninfo()) as conn:
        (rows,) = conn.execute(
            "SELECT count(*) FROM vpp_enrolments WHERE tenant_id = %s AND device_id = %s",
            (f"churn{v.fleet.run}", device),
        ).fetchone()  # type: ignore[misc]
    assert rows == per_device
    with api.client() as http:
        assert http.post(path, json=body).json()["status"] == "approved"


def test_a_tenant_cannot_queue_unbounded_requests(
    api: ApiServer, victim: Victim, base_settings: Settings
) -> None:
    """Many devices asking at once: at most enrolment_open_requests_per_tenant (50) await a decision;
    withdrawing one makes room for the next."""
    v = victim
    limit = base_settings.vpp.enrolment_open_requests_per_tenant
    tenant = f"crowd{v.fleet.run}"
    key, devices = _tenant_with_devices(api, tenant, limit + 1)
    path = f"/v1/vpps/{v.vpp}/enrolments"
    with api.client(key) as http:
        ids = []
        for device in devices[:limit]:
            r = http.post(path, json={"tenant": tenant, "device": device})
            assert r.status_code == 201, r.text
            ids.append(r.json()["enrolment_id"])
        _assert_429(http.post(path, json={"tenant": tenant, "device": devices[-1]}))
        assert http.post(f"/v1/vpp-enrolments/{ids[0]}/leave").status_code == 200
        assert http.post(path, json={"tenant": tenant, "device": devices[-1]}).status_code == 201
    with api.client(v.keys["owner"]) as http:
        queued = http.get("/v1/vpp-enrolments", params={"tenant": tenant, "status": "requested"})
    assert len(queued.json()["data"]) == limit


def test_an_unknown_vpp_is_answered_as_a_hidden_one_and_guessing_is_bounded(
    api: ApiServer, victim: Victim, base_settings: Settings
) -> None:
    """Review of issue 13: the request route told existing VPP ids (201) from unknown ones (404 "no VPP").
    A VPP one cannot see yet must stay requestable, so the id is what the owner hands out: an unknown id
    gets the very 404 every route gives a hidden VPP, and a tenant gets
    enrolment_misses_per_tenant_hour (20) such answers an hour, then 429 for any id."""
    v = victim
    tenant = f"probe{v.fleet.run}"
    key, (first, second) = _tenant_with_devices(api, tenant, 2)
    unknown = f"vpp-guess-{v.fleet.run}"
    with api.client(key) as http:
        guessed = http.post(f"/v1/vpps/{unknown}/enrolments", json={"tenant": tenant, "device": first})
        hidden = http.get(f"/v1/vpps/{v.vpp}")
        assert guessed.status_code == hidden.status_code == 404
        assert guessed.headers["content-type"] == hidden.headers["content-type"] == "application/problem+json"
        shape = {k: val for k, val in guessed.json().items() if k != "instance"}
        assert shape == {
            **{k: val for k, val in hidden.json().items() if k != "instance"},
            "detail": hidden.json()["detail"].replace(v.vpp, unknown),
        }
        # The owner gave this id out: the request goes through although the VPP is not visible.
        assert (
            http.post(f"/v1/vpps/{v.vpp}/enrolments", json={"tenant": tenant, "device": first}).status_code
            == 201
        )
        for i in range(base_settings.vpp.enrolment_misses_per_tenant_hour - 1):
            r = http.post(f"/v1/vpps/{unknown}-{i}/enrolments", json={"tenant": tenant, "device": second})
            assert r.status_code == 404
        # Past the budget an existing id is not told apart either.
        _assert_429(http.post(f"/v1/vpps/{v.vpp}/enrolments", json={"tenant": tenant, "device": second}))
        _assert_429(http.post(f"/v1/vpps/{unknown}/enrolments", json={"tenant": tenant, "device": second}))


def test_memberships_carried_over_by_migration_0009_can_be_reviewed_and_ended(
    api: ApiServer, victim: Victim, base_settings: Settings
) -> None:
    """Review of issue 13: 0009 approved every membership it found, joins made with the finding-1
    exploit included. Such a row (written as 0009 wrote them) is listed by decided_by=migration-0009 to
    admins and to the VPP's owner, to no other tenant, and ending it takes the device out of the VPP."""
    v = victim
    device = f"{v.fleet.tenant}-smuggled"
    with api.client() as http:
        assert http.post("/v1/devices", json={"tenant": v.fleet.tenant, "device": device}).status_code == 201
    with psycopg.connect(base_settings.db.conninfo(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO vpp_enrolments (vpp_id, tenant_id, device_id, status, requested_by, decided_by, "
            "decided_at) VALUES (%s, %s, %s, 'approved', 'migration-0009', 'migration-0009', now())",
            (v.vpp, v.fleet.tenant, device),
        )
    carried = {"decided_by": "migration-0009", "status": "approved"}
    with api.client() as http:
        listed = http.get("/v1/vpp-enrolments", params={**carried, "vpp": v.vpp}).json()["data"]
        assert [(e["tenant"], e["device"], e["decided_by"]) for e in listed] == [
            (v.fleet.tenant, device, "migration-0009")
        ]
        decided_by_admin = http.get("/v1/vpp-enrolments", params={"vpp": v.vpp, "decided_by": "nobody"})
        assert decided_by_admin.json()["data"] == []
    with api.client(v.keys["owner"]) as http:
        review = http.get("/v1/vpp-enrolments", params=carried).json()["data"]
        assert [(e["tenant"], e["device"]) for e in review] == [(v.fleet.tenant, device)]
        assert http.post(f"/v1/vpp-enrolments/{review[0]['enrolment_id']}/leave").status_code == 200
    with api.client(v.keys["victim"]) as http:
        assert http.get("/v1/vpp-enrolments", params=carried).json()["data"] == []
    with psycopg.connect(base_settings.db.conninfo()) as conn:
        (vpp,) = conn.execute(
            "SELECT vpp FROM devices WHERE tenant_id = %s AND device_id = %s", (v.fleet.tenant, device)
        ).fetchone()  # type: ignore[misc]
    assert vpp is None


def test_a_member_does_not_see_another_tenants_resource_through_a_small_node(
    api: ApiServer, victim: Victim, base_settings: Settings
) -> None:
    """Review of issue 13: a node holding one resource of another tenant showed that resource's
    flexibility, under a name that tenant wrote, to every member. A member sees nodes of its own
    resources only, or with at least node_min_foreign_resources (3) of others; the rest is one row with
    node null, and the figures still add up. The owner sees every node; a regulator only the large."""
    v = victim
    assert base_settings.vpp.node_min_foreign_resources == 3
    vpp, other, attacker = f"vpp-nodes-{v.fleet.run}", v.fleet.other, v.fleet.tenant
    layout = {  # node: tenants of its resources
        "big": [other, other, other],
        "lonely-secret-plant": [other],
        "mine": [attacker],
        "mixed": [attacker, other],
    }
    figures = {"big": (30.0, 3), "lonely-secret-plant": (7.0, 1), "mine": (5.0, 1), "mixed": (11.0, 2)}
    with api.client() as http:
        assert (
            http.post("/v1/vpps", json={"vpp": vpp, "name": "nodes", "owner": v.operator}).status_code == 201
        )
        for node, tenants in layout.items():
            for i, tenant in enumerate(tenants):
                device = f"{node}-{i}-{v.fleet.run}"
                body = {"tenant": tenant, "device": device, "vpp": vpp, "topology_node": node}
                assert http.post("/v1/devices", json=body).status_code == 201
                model = {"tenant": tenant, "resource_class": "pv", "rated_power_kw": 10}
                assert http.put(f"/v1/devices/{device}/resource", json=model).status_code == 200
    with psycopg.connect(base_settings.db.conninfo(), autocommit=True) as conn:
        # What the vpp service publishes for these nodes.
        for node, (up, online) in figures.items():
            conn.execute(
                "INSERT INTO vpp_node_capacity_now VALUES (%s, %s, 15, %s, %s, %s, 0, now()) "
                "ON CONFLICT (vpp, node, duration_min) DO UPDATE SET up_kw = EXCLUDED.up_kw, "
                "down_kw = EXCLUDED.down_kw, devices_online = EXCLUDED.devices_online, devices_stale = 0",
                (vpp, node, up, up / 2, online),
            )

    def nodes(key: str) -> dict[str | None, tuple[float, float, int]]:
        with api.client(key) as http:
            r = http.get(f"/v1/vpps/{vpp}/capacity/nodes")
            assert r.status_code == 200, r.text
        return {n["node"]: (n["up_kw"], n["down_kw"], n["devices_online"]) for n in r.json()["nodes"]}

    owner = nodes(v.keys["owner"])
    assert set(owner) == set(layout)
    member = nodes(v.keys["attacker"])
    assert member == {
        "big": owner["big"],
        "mine": owner["mine"],
        None: (7.0 + 11.0, (7.0 + 11.0) / 2, 1 + 2),
    }
    regulator = nodes(_key(api, "regulator", None))
    assert set(regulator) == {"big", None}
    assert regulator[None][0] == 7.0 + 5.0 + 11.0
