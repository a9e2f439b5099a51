"""Enrolment requests answered 404 are bounded per tenant and hour (review of issue 13): guessing VPP ids
costs the guesser its budget, admins are not held, and the window moves on."""

from __future__ import annotations

import pytest

from api.access import Access
from api.problems import Problem
from api.routes.vpp import MissBudget

pytestmark = pytest.mark.unit

PROBER = Access(key_id="k1", role="enterprise", tenant="probe")
ADMIN = Access(key_id="k0", role="admin", tenant=None)


def test_a_tenant_gets_its_misses_per_hour_then_429_until_the_oldest_expires() -> None:
    clock = [1000.0]
    budget = MissBudget(per_hour=3, clock=lambda: clock[0])
    for _ in range(3):
        budget.check(PROBER, "probe")
        budget.miss(PROBER, "probe")
        clock[0] += 60
    with pytest.raises(Problem) as refused:
        budget.check(PROBER, "probe")
    assert refused.value.status == 429
    assert refused.value.headers == {"Retry-After": str(3600 - 180)}
    # Another tenant and admins are not held by the prober's misses.
    budget.check(Access(key_id="k2", role="enterprise", tenant="other"), "other")
    for _ in range(10):
        budget.check(ADMIN, "probe")
        budget.miss(ADMIN, "probe")
    clock[0] = 1000.0 + 3600
    budget.check(PROBER, "probe")


def test_forgotten_tenants_leave_no_entry() -> None:
    budget = MissBudget(per_hour=1)
    budget.check(PROBER, "probe")
    assert not budget._misses
