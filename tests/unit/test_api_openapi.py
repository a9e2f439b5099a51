"""The OpenAPI schema tells the truth: every error an operation can answer is documented as
`application/problem+json`, authentication is declared, non-JSON answers carry their media type and
the links between operations resolve. A client generated from the schema (or schemathesis) relies on it."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from api.app import create_app

pytestmark = pytest.mark.unit

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    # As a client reads it: JSON (no database needed for the schema).
    document: dict[str, Any] = orjson.loads(orjson.dumps(create_app().openapi()))
    return document


def operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    ]


def test_every_error_response_is_problem_json(schema: dict[str, Any]) -> None:
    errors = 0
    for method, path, operation in operations(schema):
        for status, response in operation["responses"].items():
            if int(status) < 400:
                continue
            errors += 1
            assert set(response["content"]) == {"application/problem+json"}, (method, path, status)
            ref = response["content"]["application/problem+json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/Problem", (method, path, status)
    assert errors > 100
    assert "HTTPValidationError" not in schema["components"]["schemas"]


def test_authenticated_operations_document_what_a_key_can_be_refused(schema: dict[str, Any]) -> None:
    public = {("get", "/healthz"), ("get", "/readyz")}
    for method, path, operation in operations(schema):
        if (method, path) in public:
            assert "security" not in operation
            continue
        assert operation["security"] == [{"apiKey": []}], (method, path)
        assert {"401", "403", "404", "429", "503"} <= set(operation["responses"]), (method, path)
        assert "Retry-After" in operation["responses"]["429"]["headers"]
        assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]
        if method != "get":
            assert "409" in operation["responses"], (method, path)
        if operation.get("parameters") or operation.get("requestBody"):
            assert {"400", "422"} <= set(operation["responses"]), (method, path)
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key",
    }
    assert set(schema["paths"]["/readyz"]["get"]["responses"]) == {"200", "503"}


def test_files_and_streams_document_their_media_types(schema: dict[str, Any]) -> None:
    export = schema["paths"]["/v1/enterprises/{tenant}/carbon-account/export"]["get"]["responses"]["200"]
    assert set(export["content"]) == {"text/csv", "application/json"}
    stream = schema["paths"]["/v1/vpps/{vpp}/capacity/stream"]["get"]["responses"]["200"]
    assert set(stream["content"]) == {"text/event-stream"}


def test_links_point_at_operations_and_their_parameters(schema: dict[str, Any]) -> None:
    by_id = {operation["operationId"]: operation for _, _, operation in operations(schema)}
    links = 0
    for _, _, operation in operations(schema):
        for response in operation["responses"].values():
            for name, link in response.get("links", {}).items():
                links += 1
                target = by_id[link["operationId"]]
                names = {p["name"] for p in target.get("parameters", [])}
                assert set(link["parameters"]) <= names, name
    assert links >= 10
