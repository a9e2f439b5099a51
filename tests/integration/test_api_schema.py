"""Schemathesis against the API's own OpenAPI schema: no input makes a 500, and every error is
problem+json. Reads run with the admin key (every code path, every tenant); writes with an enterprise
key of a throwaway tenant, so generated bodies are validated and then refused or stored for that
tenant only (an admin's random writes would change shared reference data such as emission factors)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.generation.case import Case
from schemathesis.generation.modes import GenerationMode

from meterflow.settings import Settings
from tests.integration.test_api_fixtures import ApiServer, Fleet, load_fleet, serve

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 40


@pytest.fixture(scope="module")
def fleet(base_settings: Settings) -> Fleet:
    return load_fleet(base_settings)


@pytest.fixture(scope="module")
def api(base_settings: Settings) -> Iterator[ApiServer]:
    yield from serve(base_settings)


@pytest.fixture(scope="module")
def enterprise_key(api: ApiServer, fleet: Fleet) -> str:
    with api.client() as http:
        r = http.post(
            "/v1/api-keys", json={"role": "enterprise", "tenant": fleet.tenant, "label": "schemathesis"}
        )
        assert r.status_code == 201, r.text
        return str(r.json()["key"])


def test_no_input_makes_a_server_error(api: ApiServer, enterprise_key: str) -> None:
    """Each operation in turn with generated inputs (schemathesis' pytest plugin is not used: its lazy
    fixture loader does not work with this pytest)."""
    # The SSE stream never ends by design; it shares its parameters with the capacity route.
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json").exclude(path_regex=r"/stream$")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        operations += 1
        key = api.admin_key if operation.method.upper() == "GET" else enterprise_key

        # Inputs that fit the schema and inputs that do not (the latter must give 4xx problems).
        cases = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
        )

        @given(case=cases)
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Case[Any]) -> None:
            response = case.call(base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)  # noqa: B023
            case.validate_response(response, checks=[not_a_server_error])
            if response.status_code >= 400:
                media = response.headers.get("content-type") or [""]
                assert media[0] == "application/problem+json", response.text[:200]

        try:
            check()
        except Exception as exc:  # noqa: BLE001  (every operation's failures, in one report)
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}"[:2000])
    assert operations >= 25
    assert not failures, "\n\n".join(failures)
