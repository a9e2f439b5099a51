"""The access policy: what a key may see or write, written once (the roles table of docs/api.md).

Every route takes `AccessDep`, which authenticates the key (`api.auth.principal`), logs every request of
a regulator key in `regulator_reads`, and returns an `Access`: the principal with the rules applied to it.

Data comes in three kinds, by how much of a tenant it reveals:

- ``RAW``: raw readings and per-device data (devices, gateways, resource models, stale devices),
- ``AGGREGATE``: figures summed over a site's devices (load, time-of-use split, EUI),
- ``ACCOUNT``: the enterprise and site registry, carbon figures and accounts and what they are built
  from (output values, green certificates).

| role | RAW | AGGREGATE | ACCOUNT | writes |
|---|---|---|---|---|
| admin | every tenant | every tenant | every tenant | everything |
| enterprise | own tenant | own tenant | own tenant | own output values, certificates, resource models, enrolment requests |
| operator | own tenant | every tenant | own tenant | decisions and DR events of the VPPs it owns |
| regulator | none | every tenant | every tenant | nothing |

VPPs: admins and regulators see every VPP (regulators its aggregates only); an operator sees the VPPs its
tenant owns, with the per-device details of the resources enrolled in them; a tenant sees the aggregates of
the VPPs one of its devices is an approved member of, and only its own devices in them.

A tenant a key may not read is answered 404, as if it did not exist; a role that may never do something
(a regulator writing, an enterprise deciding an enrolment) is answered 403.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any

from fastapi import Depends, Request
from prometheus_client import Counter
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from api.auth import Principal, principal
from api.problems import Problem

log = logging.getLogger(__name__)

DENIED = Counter(
    "meterflow_api_access_denied_total", "Requests the access policy refused", ["role", "reason"]
)
REGULATOR_READS = Counter(
    "meterflow_api_regulator_requests_total", "Requests of regulator keys, each appended to regulator_reads"
)


class Kind(Enum):
    RAW = "raw"
    AGGREGATE = "aggregate"
    ACCOUNT = "account"


# The VPPs a key sees, as a condition on `vpps v` with the parameters of `Access.vpp_params`.
VISIBLE_VPP_SQL = """(%(all_vpps)s OR v.owner_tenant = %(owner)s OR EXISTS (
    SELECT 1 FROM vpp_enrolments e
    WHERE e.vpp_id = v.vpp_id AND e.tenant_id = %(member)s AND e.status = 'approved'))"""


@dataclass(frozen=True, slots=True)
class Access(Principal):
    """A principal with the policy applied: each method returns what the key may see, or raises."""

    def deny(self, reason: str, detail: str) -> Problem:
        DENIED.labels(self.role, reason).inc()
        return Problem(403, "forbidden", "Not allowed", f"key {self.key_id} ({self.role}): {detail}")

    def hidden(self, what: str) -> Problem:
        DENIED.labels(self.role, "not-visible").inc()
        return Problem(404, "not-found", "Not found", f"no {what} visible to this key")

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def require_admin(self) -> None:
        if not self.is_admin:
            raise self.deny("admin-only", "admin role required")

    # --- tenant data -------------------------------------------------------------------------------

    def _sees_every_tenant(self, kind: Kind) -> bool:
        if self.role == "admin":
            return True
        if self.role == "regulator":
            return kind is not Kind.RAW
        return self.role == "operator" and kind is Kind.AGGREGATE

    def _never(self, kind: Kind) -> bool:
        # Regulators read no tenant's raw data (grants are not implemented: docs/api.md).
        return self.role == "regulator" and kind is Kind.RAW

    def read_tenant(self, tenant: str, kind: Kind) -> None:
        """404 unless this key may read `tenant`'s data of this kind (403 for a regulator and raw data)."""
        if self._never(kind):
            raise self.deny("regulator-raw", "regulators read aggregates and accounts only")
        if not (self._sees_every_tenant(kind) or self.tenant == tenant):
            # 404, not 403: a foreign key must not learn which tenants exist.
            raise self.hidden(f"tenant {tenant!r}")

    def tenant_scope(self, tenant: str | None, kind: Kind) -> str | None:
        """The tenant filter of a list route: the one asked for if this key may read it, the key's own when
        it may read only that, None (every tenant) when it may read all and named none."""
        if tenant is not None:
            self.read_tenant(tenant, kind)
            return tenant
        if self._never(kind):
            raise self.deny("regulator-raw", "regulators read aggregates and accounts only")
        return None if self._sees_every_tenant(kind) else self.tenant

    def write_tenant(self, tenant: str) -> None:
        """Admins, or an enterprise key writing its own tenant's data."""
        if self.role == "admin" or (self.role == "enterprise" and self.tenant == tenant):
            return
        if self.tenant != tenant and self.role != "regulator":
            raise self.hidden(f"tenant {tenant!r}")
        raise self.deny("read-only", f"cannot write data of {tenant!r}")

    # --- VPPs --------------------------------------------------------------------------------------

    def manages(self, owner: str | None) -> bool:
        """Whether this key acts for the owner of a VPP owned by `owner` (admins act for every VPP)."""
        return self.is_admin or (self.role == "operator" and owner is not None and owner == self.tenant)

    def vpp_params(self) -> dict[str, Any]:
        """Parameters of VISIBLE_VPP_SQL for this key."""
        everything = self.role in ("admin", "regulator")
        return {
            "all_vpps": everything,
            "owner": self.tenant if self.role == "operator" else None,
            "member": None if everything else self.tenant,
        }

    async def still_sees_vpp(self, conn: AsyncConnection[Any], vpp: str) -> bool:
        """For a long-lived answer (the capacity stream): the key is not revoked and still sees the VPP
        (a member that left, or an owner the VPP was taken from, stops reading it)."""
        cur = await conn.execute(
            f"SELECT 1 FROM api_keys k, vpps v WHERE k.key_id = %(key)s AND k.revoked_at IS NULL "
            f"AND v.vpp_id = %(vpp)s AND {VISIBLE_VPP_SQL}",
            {"key": self.key_id, "vpp": vpp, **self.vpp_params()},
        )
        return await cur.fetchone() is not None

    async def vpp(
        self, request: Request, vpp: str, *, manage: bool = False, devices: bool = False
    ) -> str | None:
        """Checks the key may use the VPP: 404 unless visible; 403 when `manage` (DR events, enrolment
        decisions) is asked of a key that does not own it, or `devices` (per-device rows) of a regulator.
        Returns whose devices the key sees in the VPP's per-device rows: None for every tenant's (the owner
        and admins), else its own tenant."""
        pool: AsyncConnectionPool = request.app.state.pool
        async with pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                f"SELECT v.vpp_id, v.owner_tenant FROM vpps v WHERE v.vpp_id = %(vpp)s AND {VISIBLE_VPP_SQL}",
                {"vpp": vpp, **self.vpp_params()},
            )
            row = await cur.fetchone()
        if row is None:
            raise self.hidden(f"VPP {vpp!r}")
        manages = self.manages(row["owner_tenant"])
        if manage and not manages:
            raise self.deny("not-vpp-owner", f"only the owner of VPP {vpp!r} (or an admin) may do this")
        if devices and self.role == "regulator":
            raise self.deny("regulator-raw", "regulators read aggregates and accounts only")
        return None if manages else self.tenant

    async def read_resource(self, request: Request, tenant: str, device: str) -> None:
        """A device's resource model: its own tenant, admins, and the owner of the VPP the device is an
        approved member of (what the enrolment grants). 404 for anyone else."""
        if self._never(Kind.RAW):
            raise self.deny("regulator-raw", "regulators read aggregates and accounts only")
        if self.is_admin or self.tenant == tenant:
            return
        if self.role == "operator":
            pool: AsyncConnectionPool = request.app.state.pool
            async with pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT 1 FROM vpp_enrolments e JOIN vpps v USING (vpp_id) WHERE e.tenant_id = %s "
                    "AND e.device_id = %s AND e.status = 'approved' AND v.owner_tenant = %s",
                    (tenant, device, self.tenant),
                )
                if await cur.fetchone() is not None:
                    return
        raise self.hidden(f"device {device!r} of {tenant!r}")


async def _log_regulator(request: Request, who: Access) -> None:
    """Append the request to regulator_reads before the route runs: a read that cannot be logged is not
    served (the database error answers 503)."""
    route = request.scope.get("route")
    template = str(getattr(route, "path", request.url.path))
    tenant = request.path_params.get("tenant") or request.query_params.get("tenant")
    pool: AsyncConnectionPool = request.app.state.pool
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO regulator_reads (key_id, method, route, path, tenant) VALUES (%s, %s, %s, %s, %s)",
            (
                who.key_id,
                request.method,
                template,
                request.url.path[:2000],
                None if tenant is None else tenant[:200],
            ),
        )
    REGULATOR_READS.inc()
    log.info("regulator key %s: %s %s (tenant %s)", who.key_id, request.method, template, tenant or "-")


async def access(request: Request, who: Annotated[Principal, Depends(principal)]) -> Access:
    acc = Access(key_id=who.key_id, role=who.role, tenant=who.tenant)
    if acc.role == "regulator":
        await _log_regulator(request, acc)
    return acc


AccessDep = Annotated[Access, Depends(access)]
