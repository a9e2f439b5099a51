"""Schemathesis against the API's own OpenAPI schema: no input makes a 500, and every answer, error or
not, has a status, media type and body the schema documents for its operation.

Operation by operation, reads run with the admin key (every code path, every tenant) and with an
enterprise key; writes with an enterprise key of a throwaway tenant, so generated bodies are validated
and then refused or stored for that tenant only (an admin's random writes would change shared reference
data such as emission factors). The stateful phase follows the schema's links (create -> read) with an
enterprise key over every operation and with the admin key over everything but what is shared by every
tenant (emission factors, DR holidays) or by the broker (gateway credentials)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.core.transport import Response
from schemathesis.generation.case import Case
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.test_api_fixtures import ApiServer, Fleet

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 30
STATEFUL_EXAMPLES = 40
STATEFUL_STEPS = 8
CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# The SSE stream never ends by design; it shares its parameters with the capacity route.
STREAM = r"/stream$"
# Data every tenant shares, or the broker's accounts: not for an admin's random writes.
SHARED_WRITES = [
    ("POST", r"^/v1/emission-factors$"),
    ("PUT", r"^/v1/dr-holidays/"),
    ("POST", r"^/v1/gateways"),
]


@pytest.fixture(scope="module")
def enterprise_key(api: ApiServer, fleet: Fleet) -> str:
    with api.client() as http:
        r = http.post(
            "/v1/api-keys", json={"role": "enterprise", "tenant": fleet.tenant, "label": "schemathesis"}
        )
        assert r.status_code == 201, r.text
        return str(r.json()["key"])


def _schema(api: ApiServer) -> Any:
    return schemathesis.openapi.from_url(f"{api.url}/openapi.json").exclude(path_regex=STREAM)


def test_every_operation_answers_as_documented(api: ApiServer, enterprise_key: str) -> None:
    """Each operation in turn with generated inputs (schemathesis' pytest plugin is not used: its lazy
    fixture loader does not work with this pytest)."""
    failures: list[str] = []
    operations = 0
    for result in _schema(api).get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()
        operations += 1
        keys = [api.admin_key, enterprise_key] if operation.method.upper() == "GET" else [enterprise_key]

        # Inputs that fit the schema and inputs that do not (the latter must give documented 4xx problems).
        cases = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
        )

        @given(case=cases, key=st.sampled_from(keys))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Case[Any], key: str) -> None:
            headers = {"Authorization": f"Bearer {key}"}
            response = case.call(base_url=api.url, headers=headers, timeout=60)
            case.validate_response(response, checks=CHECKS, headers=headers)

        try:
            check()
        except Exception as exc:  # noqa: BLE001  (every operation's failures, in one report)
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}"[:3000])
    assert operations >= 25
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("role", ["enterprise", "admin"])
def test_linked_operations_answer_as_documented(api: ApiServer, enterprise_key: str, role: str) -> None:
    """Schemathesis' stateful phase: sequences of calls along the schema's links, each answer checked."""
    schema = _schema(api)
    key = enterprise_key
    if role == "admin":
        key = api.admin_key
        for method, path in SHARED_WRITES:
            schema = schema.exclude(method=method, path_regex=path)
    headers = {"Authorization": f"Bearer {key}"}
    failures: list[str] = []

    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Case[Any]) -> dict[str, Any]:
            return {"base_url": api.url, "headers": headers, "timeout": 60}

        def validate_response(
            self,
            response: Response,
            case: Case[Any],
            additional_checks: list[CheckFunction] | None = None,
            **kwargs: Any,
        ) -> None:
            try:
                case.validate_response(
                    response, checks=CHECKS, headers=headers, transport_kwargs=kwargs, recorder=self.recorder
                )
            except Exception as exc:
                failures.append(f"{case.method} {case.path} -> {response.status_code}: {exc}"[:3000])
                raise

    # Which rules Hypothesis can draw depends on what the server answered before, so it may call the
    # generation inconsistent (schemathesis' runner passes such a run too); a failed check is in
    # `failures` either way.
    with contextlib.suppress(Flaky):
        Machine.run(
            settings=settings(
                max_examples=STATEFUL_EXAMPLES,
                stateful_step_count=STATEFUL_STEPS,
                # As schemathesis' own runner: no replay or shrinking, which cannot reproduce a scenario
                # once the server has stored what it created.
                phases=[Phase.generate],
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
        )
    assert not failures, "\n\n".join(failures)
