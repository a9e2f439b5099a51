"""The access policy as a table: every operation of the OpenAPI schema, tried by six principals on one
world, answers as docs/api.md says (allowed: a success or a domain answer; refused: 403 or 404 as
problem+json). A route added to the API without a row here fails the test."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from meterflow.settings import Settings
from tests.integration.test_api_fixtures import SHANGHAI, ApiServer, Fleet, load_fleet

pytestmark = pytest.mark.integration

PRINCIPALS = ("admin", "own", "foreign", "owner", "operator", "regulator")
EVERYONE = frozenset(PRINCIPALS)
ADMIN = frozenset({"admin"})
# Tenant A's own data; "own" is A's enterprise key.
TENANT_RAW = frozenset({"admin", "own"})
TENANT_ACCOUNT = frozenset({"admin", "own", "regulator"})
AGGREGATE = frozenset({"admin", "own", "owner", "operator", "regulator"})
# VPP X: owned by the "owner" operator, A's PV is an approved member.
VPP_AGGREGATE = frozenset({"admin", "own", "owner", "regulator"})
VPP_DEVICES = frozenset({"admin", "own", "owner"})
VPP_MANAGE = frozenset({"admin", "owner"})
NOT_REGULATOR = EVERYONE - {"regulator"}

DAY = {"start": "2025-03-10T00:00:00+08:00", "end": "2025-03-11T00:00:00+08:00"}


@dataclass
class World:
    api: ApiServer
    fleet: Fleet
    run: str
    keys: dict[str, str]
    key_ids: dict[str, str]
    vpp_x: str
    vpp_y: str
    owner: str  # operator tenant owning VPP X
    gateway: str
    event_x: int
    counter: Iterator[int] = field(default_factory=itertools.count)

    @property
    def a(self) -> str:
        return self.fleet.tenant

    def fresh(self, prefix: str) -> str:
        return f"{prefix}{self.run}-{next(self.counter)}"

    def admin(self) -> httpx.Client:
        return self.api.client()

    def new_device(self) -> str:
        """A new device of tenant A (no VPP)."""
        device = self.fresh("dev")
        with self.admin() as http:
            r = http.post("/v1/devices", json={"tenant": self.a, "device": device, "role": "resource"})
            assert r.status_code == 201, r.text
        return device

    def requested(self) -> int:
        """A new device of A with a pending request to join VPP X, made by A's own key."""
        device = self.new_device()
        with self.api.client(self.keys["own"]) as http:
            r = http.post(f"/v1/vpps/{self.vpp_x}/enrolments", json={"tenant": self.a, "device": device})
            assert r.status_code == 201 and r.json()["status"] == "requested", r.text
            return int(r.json()["enrolment_id"])


def _key(api: ApiServer, role: str, tenant: str | None) -> tuple[str, str]:
    with api.client() as http:
        r = http.post("/v1/api-keys", json={"role": role, "tenant": tenant, "label": "matrix"})
        assert r.status_code == 201, r.text
        return r.json()["key_id"], r.json()["key"]


@pytest.fixture(scope="module")
def world(base_settings: Settings, api: ApiServer) -> World:
    fleet = load_fleet(base_settings)
    run = fleet.run
    owner, stranger = f"opx{run}", f"opn{run}"
    vpp_x, vpp_y, gateway = f"vppx-{run}", f"vppy-{run}", f"gw{run}"
    with api.client() as http:
        for op in (owner, stranger):
            r = http.post("/v1/enterprises", json={"tenant": op, "name": op, "role": "operator"})
            assert r.status_code == 201, r.text
        assert http.post("/v1/vpps", json={"vpp": vpp_x, "name": "X", "owner": owner}).status_code == 201
        assert http.post("/v1/vpps", json={"vpp": vpp_y, "name": "Y"}).status_code == 201
        for tenant, vpp in ((fleet.tenant, vpp_x), (fleet.other, vpp_y)):
            device = f"{tenant}-s1-pv"
            r = http.post(f"/v1/vpps/{vpp}/enrolments", json={"tenant": tenant, "device": device})
            assert r.status_code == 201 and r.json()["status"] == "approved", r.text
            model = {"tenant": tenant, "resource_class": "pv", "rated_power_kw": 50, "curtailable": True}
            r = http.put(f"/v1/devices/{device}/resource", json=model)
            assert r.status_code == 200, r.text
        assert http.post("/v1/gateways", json={"tenant": fleet.tenant, "gateway": gateway}).status_code == 201
        start = datetime(2025, 3, 10, 14, tzinfo=SHANGHAI)
        event = {
            "start": start.isoformat(),
            "end": (start + timedelta(hours=1)).isoformat(),
            "direction": "up",
            "committed_kw": 10,
            "program": f"secret-{run}",
        }
        r = http.post(f"/v1/vpps/{vpp_x}/dr-events", json=event)
        assert r.status_code == 201, r.text
        event_x = int(r.json()["event_id"])
    # What the vpp service would have published for X (it is not running in this module).
    with psycopg.connect(base_settings.db.conninfo()) as conn:
        conn.execute(
            "INSERT INTO vpp_capacity_now (vpp, duration_min, up_kw, down_kw, nameplate_up_kw, "
            "nameplate_down_kw, devices_online, devices_stale, as_of) VALUES (%s, 15, 1, 2, 3, 4, 1, 0, now())",
            (vpp_x,),
        )
        conn.execute(
            "INSERT INTO vpp_stale_devices (vpp, tenant_id, device_id, last_seen, telemetry_interval_s) "
            "VALUES (%s, %s, %s, NULL, 60)",
            (vpp_x, fleet.tenant, f"{fleet.tenant}-s1-pv"),
        )
    keys: dict[str, str] = {"admin": api.admin_key}
    key_ids: dict[str, str] = {}
    principals: list[tuple[str, str, str | None]] = [
        ("own", "enterprise", fleet.tenant),
        ("foreign", "enterprise", fleet.other),
        ("owner", "operator", owner),
        ("operator", "operator", stranger),
        ("regulator", "regulator", None),
    ]
    for name, role, bound in principals:
        key_ids[name], keys[name] = _key(api, role, bound)
    return World(api, fleet, run, keys, key_ids, vpp_x, vpp_y, owner, gateway, event_x)


@dataclass(frozen=True)
class Request:
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    body: Any = None


@dataclass(frozen=True)
class Case:
    allowed: frozenset[str]
    # Builds the request for one principal (writes get fresh objects each time).
    build: Callable[[World, str], Request]
    # What an allowed principal may get besides a 2xx: domain answers that are not about access.
    also_ok: frozenset[int] = frozenset()


def fixed(path: str, **params: Any) -> Callable[[World, str], Request]:
    """The same request for everyone; `{w...}` in the path and in string parameters names the world's ids."""
    return lambda w, _: Request(
        path.format(w=w), {k: v.format(w=w) if isinstance(v, str) else v for k, v in params.items()}
    )


def _cases() -> dict[tuple[str, str], Case]:
    pv = "{w.a}-s1-pv"
    return {
        # --- registry ---
        ("post", "/v1/enterprises"): Case(
            ADMIN, lambda w, _: Request("/v1/enterprises", body={"tenant": w.fresh("e"), "name": "new"})
        ),
        ("get", "/v1/enterprises"): Case(EVERYONE, fixed("/v1/enterprises")),
        ("get", "/v1/enterprises/{tenant}"): Case(TENANT_ACCOUNT, fixed("/v1/enterprises/{w.a}")),
        ("post", "/v1/sites"): Case(
            ADMIN,
            lambda w, _: Request("/v1/sites", body={"tenant": w.a, "site": w.fresh("s"), "name": "new"}),
        ),
        ("get", "/v1/sites"): Case(TENANT_ACCOUNT, fixed("/v1/sites", tenant="{w.a}")),
        ("patch", "/v1/sites/{site}"): Case(
            ADMIN, lambda w, _: Request(f"/v1/sites/{w.a}-s1", {"tenant": w.a}, {"name": "renamed"})
        ),
        ("post", "/v1/gateways"): Case(
            ADMIN, lambda w, _: Request("/v1/gateways", body={"tenant": w.a, "gateway": w.fresh("g")})
        ),
        ("get", "/v1/gateways"): Case(NOT_REGULATOR, fixed("/v1/gateways")),
        ("post", "/v1/gateways/{gateway}/credentials"): Case(
            ADMIN, fixed("/v1/gateways/{w.gateway}/credentials")
        ),
        ("post", "/v1/devices"): Case(
            ADMIN, lambda w, _: Request("/v1/devices", body={"tenant": w.a, "device": w.fresh("d")})
        ),
        ("get", "/v1/devices"): Case(NOT_REGULATOR, fixed("/v1/devices")),
        ("post", "/v1/devices/{device}/meter-exchanges"): Case(
            ADMIN,
            lambda w, _: Request(
                f"/v1/devices/{w.a}-s1-grid/meter-exchanges",
                body={
                    "tenant": w.a,
                    "metric": "energy_import_kwh",
                    "ts": f"2020-01-01T00:{next(w.counter) % 60:02d}:00Z",
                    "removal_read": 10,
                    "install_read": 0,
                },
            ),
        ),
        ("post", "/v1/devices/{device}/multipliers"): Case(
            ADMIN,
            lambda w, _: Request(
                f"/v1/devices/{w.a}-s1-grid/multipliers",
                body={"tenant": w.a, "effective_from": f"2020-01-01T01:{next(w.counter) % 60:02d}:00Z"},
            ),
        ),
        ("post", "/v1/green-certificates"): Case(
            TENANT_RAW,
            lambda w, _: Request(
                "/v1/green-certificates",
                body={
                    "tenant": w.a,
                    "certificate": w.fresh("c"),
                    "period_start": "2019-01-01",
                    "period_end": "2019-02-01",
                    "certificates": 1,
                },
            ),
        ),
        ("get", "/v1/green-certificates"): Case(
            TENANT_ACCOUNT, fixed("/v1/green-certificates", tenant="{w.a}")
        ),
        # --- readings, load, carbon ---
        ("get", "/v1/devices/{device}/readings"): Case(
            TENANT_RAW, lambda w, _: Request(f"/v1/devices/{w.a}-s1-grid/readings", {**DAY, "tenant": w.a})
        ),
        ("get", "/v1/sites/{site}/load"): Case(
            AGGREGATE, lambda w, _: Request(f"/v1/sites/{w.a}-s1/load", {**DAY, "tenant": w.a})
        ),
        ("get", "/v1/tou-calendars"): Case(EVERYONE, fixed("/v1/tou-calendars")),
        ("get", "/v1/sites/{site}/load/tou"): Case(
            AGGREGATE, lambda w, _: Request(f"/v1/sites/{w.a}-s1/load/tou", {**DAY, "tenant": w.a})
        ),
        ("get", "/v1/sites/{site}/eui"): Case(
            AGGREGATE, lambda w, _: Request(f"/v1/sites/{w.a}-s1/eui", {**DAY, "tenant": w.a})
        ),
        ("get", "/v1/enterprises/{tenant}/carbon"): Case(
            TENANT_ACCOUNT, lambda w, _: Request(f"/v1/enterprises/{w.a}/carbon", DAY)
        ),
        ("post", "/v1/enterprises/{tenant}/output-values"): Case(
            TENANT_RAW,
            lambda w, _: Request(
                f"/v1/enterprises/{w.a}/output-values",
                body={"period_start": "2019-01-01", "period_end": "2020-01-01", "value_added_cny": 1000},
            ),
        ),
        ("get", "/v1/enterprises/{tenant}/output-values"): Case(
            TENANT_ACCOUNT, fixed("/v1/enterprises/{w.a}/output-values")
        ),
        ("get", "/v1/enterprises/{tenant}/carbon-account"): Case(
            TENANT_ACCOUNT, lambda w, _: Request(f"/v1/enterprises/{w.a}/carbon-account", {"year": 2025})
        ),
        ("get", "/v1/enterprises/{tenant}/carbon-account/export"): Case(
            TENANT_ACCOUNT,
            lambda w, _: Request(f"/v1/enterprises/{w.a}/carbon-account/export", {"year": 2025}),
        ),
        ("get", "/v1/enterprises/{tenant}/carbon/estimated"): Case(
            TENANT_ACCOUNT, lambda w, _: Request(f"/v1/enterprises/{w.a}/carbon/estimated", DAY)
        ),
        # --- reference data ---
        ("get", "/v1/emission-factors"): Case(EVERYONE, fixed("/v1/emission-factors")),
        ("get", "/v1/emission-factors/{factor_id}"): Case(
            EVERYONE, fixed("/v1/emission-factors/none"), also_ok=frozenset({404})
        ),
        ("post", "/v1/emission-factors"): Case(
            ADMIN,
            lambda w, _: Request(
                "/v1/emission-factors",
                body={
                    "factor_id": w.fresh("f"),
                    "carrier": "electricity",
                    "kind": "location_based",
                    "region": w.fresh("r"),
                    "year": 2025,
                    "value": 0.5,
                    "unit": "kgCO2/kWh",
                    "status": "final",
                    "document": "matrix",
                },
            ),
            also_ok=frozenset({422}),
        ),
        ("get", "/v1/grid-intensity"): Case(EVERYONE, fixed("/v1/grid-intensity")),
        ("get", "/v1/grid-intensity/{zone}"): Case(EVERYONE, fixed("/v1/grid-intensity/zhejiang", **DAY)),
        ("get", "/v1/grid-intensity/{zone}/latest"): Case(
            EVERYONE, fixed("/v1/grid-intensity/zhejiang/latest"), also_ok=frozenset({404})
        ),
        ("get", "/v1/grid-intensity/{zone}/best-window"): Case(
            EVERYONE, fixed("/v1/grid-intensity/zhejiang/best-window", **DAY)
        ),
        # --- keys ---
        ("post", "/v1/api-keys"): Case(
            ADMIN, lambda w, _: Request("/v1/api-keys", body={"role": "enterprise", "tenant": w.a})
        ),
        ("get", "/v1/api-keys"): Case(ADMIN, fixed("/v1/api-keys")),
        ("delete", "/v1/api-keys/{key_id}"): Case(
            ADMIN, lambda w, _: Request(f"/v1/api-keys/{_key(w.api, 'enterprise', w.a)[0]}")
        ),
        # --- VPPs and enrolments ---
        ("get", "/v1/vpps"): Case(EVERYONE, fixed("/v1/vpps")),
        ("post", "/v1/vpps"): Case(
            ADMIN, lambda w, _: Request("/v1/vpps", body={"vpp": w.fresh("v"), "name": "n"})
        ),
        ("patch", "/v1/vpps/{vpp}"): Case(
            ADMIN, lambda w, _: Request(f"/v1/vpps/{w.vpp_x}", body={"name": "X"})
        ),
        ("get", "/v1/vpps/{vpp}"): Case(VPP_AGGREGATE, fixed("/v1/vpps/{w.vpp_x}")),
        ("post", "/v1/vpps/{vpp}/enrolments"): Case(
            TENANT_RAW,
            lambda w, _: Request(
                f"/v1/vpps/{w.vpp_x}/enrolments", body={"tenant": w.a, "device": w.new_device()}
            ),
        ),
        ("get", "/v1/vpp-enrolments"): Case(NOT_REGULATOR, fixed("/v1/vpp-enrolments")),
        ("post", "/v1/vpp-enrolments/{enrolment_id}/approve"): Case(
            VPP_MANAGE, lambda w, _: Request(f"/v1/vpp-enrolments/{w.requested()}/approve")
        ),
        ("post", "/v1/vpp-enrolments/{enrolment_id}/reject"): Case(
            VPP_MANAGE, lambda w, _: Request(f"/v1/vpp-enrolments/{w.requested()}/reject")
        ),
        ("post", "/v1/vpp-enrolments/{enrolment_id}/leave"): Case(
            VPP_MANAGE | {"own"}, lambda w, _: Request(f"/v1/vpp-enrolments/{w.requested()}/leave")
        ),
        ("put", "/v1/devices/{device}/resource"): Case(
            TENANT_RAW,
            lambda w, _: Request(
                f"/v1/devices/{w.a}-s1-pv/resource",
                body={
                    "tenant": w.a,
                    "resource_class": "pv",
                    "vpp": w.vpp_x,
                    "rated_power_kw": 50,
                    "curtailable": True,
                },  # the admitted model, unchanged: an approved member's own write
            ),
        ),
        ("get", "/v1/devices/{device}/resource"): Case(
            VPP_DEVICES, fixed(f"/v1/devices/{pv}/resource", tenant="{w.a}")
        ),
        ("get", "/v1/vpps/{vpp}/capacity"): Case(VPP_AGGREGATE, fixed("/v1/vpps/{w.vpp_x}/capacity")),
        ("get", "/v1/vpps/{vpp}/capacity/history"): Case(
            VPP_AGGREGATE, fixed("/v1/vpps/{w.vpp_x}/capacity/history", **DAY)
        ),
        ("get", "/v1/vpps/{vpp}/capacity/nodes"): Case(
            VPP_AGGREGATE, fixed("/v1/vpps/{w.vpp_x}/capacity/nodes")
        ),
        ("get", "/v1/vpps/{vpp}/stale-devices"): Case(VPP_DEVICES, fixed("/v1/vpps/{w.vpp_x}/stale-devices")),
        ("get", "/v1/vpps/{vpp}/capacity/stream"): Case(
            VPP_AGGREGATE, fixed("/v1/vpps/{w.vpp_x}/capacity/stream")
        ),
        ("post", "/v1/vpps/{vpp}/dr-events"): Case(
            VPP_MANAGE,
            lambda w, _: Request(
                f"/v1/vpps/{w.vpp_x}/dr-events",
                body={
                    "start": "2025-03-11T14:00:00+08:00",
                    "end": "2025-03-11T15:00:00+08:00",
                    "direction": "up",
                    "committed_kw": 5,
                },
            ),
        ),
        ("get", "/v1/vpps/{vpp}/dr-events"): Case(VPP_AGGREGATE, fixed("/v1/vpps/{w.vpp_x}/dr-events")),
        ("get", "/v1/dr-events/{event_id}"): Case(VPP_AGGREGATE, fixed("/v1/dr-events/{w.event_x}")),
        ("get", "/v1/dr-events/{event_id}/result"): Case(
            VPP_AGGREGATE, fixed("/v1/dr-events/{w.event_x}/result"), also_ok=frozenset({422})
        ),
        ("get", "/v1/dr-events/{event_id}/report"): Case(
            VPP_AGGREGATE, fixed("/v1/dr-events/{w.event_x}/report"), also_ok=frozenset({422})
        ),
        ("put", "/v1/dr-holidays/{day}"): Case(
            ADMIN, lambda w, _: Request("/v1/dr-holidays/1999-01-01", body={"name": "matrix"})
        ),
        ("get", "/v1/dr-holidays"): Case(EVERYONE, fixed("/v1/dr-holidays")),
        # --- unauthenticated ---
        ("get", "/healthz"): Case(EVERYONE, fixed("/healthz")),
        ("get", "/readyz"): Case(EVERYONE, fixed("/readyz")),
    }


def _send(http: httpx.Client, method: str, req: Request) -> tuple[int, str, str]:
    if req.path.endswith("/stream"):
        with http.stream(method.upper(), req.path, params=req.params) as r:
            return (
                r.status_code,
                r.headers.get("content-type", ""),
                "" if r.status_code < 300 else r.read().decode(),
            )
    r = http.request(method.upper(), req.path, params=req.params, json=req.body)
    return r.status_code, r.headers.get("content-type", ""), r.text


def test_every_route_answers_every_role_as_the_policy_says(world: World) -> None:
    schema = httpx.get(f"{world.api.url}/openapi.json").json()
    operations = {(m, p) for p, ops in schema["paths"].items() for m in ops}
    cases = _cases()
    assert operations == set(cases), (
        f"routes without a row: {sorted(operations - set(cases))}; rows without a route: "
        f"{sorted(set(cases) - operations)}"
    )
    wrong: list[str] = []
    for (method, _), case in sorted(cases.items()):
        for who in PRINCIPALS:
            req = case.build(world, who)
            with world.api.client(world.keys[who]) as http:
                status, content_type, text = _send(http, method, req)
            where = f"{who:9} {method.upper()} {req.path}: {status} {text[:200]}"
            if status >= 500:
                wrong.append(f"server error: {where}")
            elif who in case.allowed:
                if not (200 <= status < 300 or status in case.also_ok):
                    wrong.append(f"refused, should be allowed: {where}")
            elif status not in (403, 404) or content_type != "application/problem+json":
                wrong.append(f"allowed, should be refused: {where}")
    assert not wrong, "\n".join(wrong)


def test_lists_show_each_role_only_what_it_may_see(world: World) -> None:
    """List routes answer 200 to everyone; what they list is scoped."""

    def listed(who: str, path: str, key: str, **params: Any) -> set[str]:
        with world.api.client(world.keys[who]) as http:
            r = http.get(path, params=params)
            assert r.status_code == 200, r.text
            return {str(item[key]) for item in r.json()["data"]}

    vpps = {who: listed(who, "/v1/vpps", "vpp") for who in PRINCIPALS}
    for who in ("admin", "regulator"):
        assert {world.vpp_x, world.vpp_y} <= vpps[who]
    assert world.vpp_x in vpps["own"] and world.vpp_y not in vpps["own"]
    assert world.vpp_y in vpps["foreign"] and world.vpp_x not in vpps["foreign"]
    assert vpps["owner"] == {world.vpp_x}
    assert vpps["operator"] == set()
    enrolled = {who: listed(who, "/v1/vpp-enrolments", "tenant") for who in NOT_REGULATOR}
    assert enrolled["foreign"] == {world.fleet.other}
    assert enrolled["operator"] == set()
    assert world.fleet.other not in enrolled["owner"] | enrolled["own"]
    stale = {}
    for who in VPP_DEVICES:
        with world.api.client(world.keys[who]) as http:
            stale[who] = http.get(f"/v1/vpps/{world.vpp_x}/stale-devices").json()["devices"]
    assert all(len(devices) == 1 for devices in stale.values())
    enterprises = {who: listed(who, "/v1/enterprises", "tenant") for who in PRINCIPALS}
    assert enterprises["own"] == {world.a}
    assert world.fleet.other in enterprises["regulator"] and world.a in enterprises["regulator"]
    assert enterprises["owner"] == {world.owner}


def test_regulator_reads_are_logged_and_writes_refused(world: World, base_settings: Settings) -> None:
    regulator = world.keys["regulator"]
    path = f"/v1/enterprises/{world.fleet.other}/carbon"
    with world.api.client(regulator) as http:
        assert http.get(path, params=DAY).status_code == 200
        raw = http.get(
            f"/v1/devices/{world.fleet.other_device}/readings", params={**DAY, "tenant": world.fleet.other}
        )
        assert raw.status_code == 403 and raw.json()["type"].endswith("/forbidden")
        write = http.post(
            f"/v1/enterprises/{world.fleet.other}/output-values",
            json={"period_start": "2019-01-01", "period_end": "2020-01-01", "value_added_cny": 1},
        )
        assert write.status_code == 403
        assert http.get("/v1/devices", params={"tenant": world.fleet.other}).status_code == 403
        assert http.post("/v1/api-keys", json={"role": "regulator"}).status_code == 403
    with psycopg.connect(base_settings.db.conninfo()) as conn:
        rows = conn.execute(
            "SELECT method, route, path, tenant FROM regulator_reads WHERE key_id = %s ORDER BY read_id",
            (world.key_ids["regulator"],),
        ).fetchall()
        assert ("GET", "/v1/enterprises/{tenant}/carbon", path, world.fleet.other) in rows
        assert ("GET", "/v1/devices/{device}/readings") in {r[:2] for r in rows}
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM regulator_reads WHERE key_id = %s", (world.key_ids["regulator"],))
    with world.api.client() as http:
        assert http.post("/v1/api-keys", json={"role": "regulator", "tenant": world.a}).status_code == 422
