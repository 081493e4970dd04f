"""Cloud Hypervisor's OpenAPI spec (shared/reference), as validators for request bodies."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml
from openapi_schema_validator import OAS30Validator

REPO = Path(__file__).resolve().parents[2]
# The reference copy beside the checkout wins (it is the one kept current); the vendored copy makes the
# tests work in a checkout without it.
CANDIDATES = (
    REPO.parent / "shared" / "reference" / "cloud-hypervisor-openapi.yaml",
    REPO / "third_party" / "cloud-hypervisor" / "cloud-hypervisor-openapi.yaml",
)


@lru_cache
def spec() -> dict:
    for path in CANDIDATES:
        if path.exists():
            return yaml.safe_load(path.read_text())
    raise FileNotFoundError(f"no Cloud Hypervisor OpenAPI spec at {' or '.join(map(str, CANDIDATES))}")


def operation(method: str, endpoint: str) -> dict | None:
    return (spec()["paths"].get(f"/{endpoint}") or {}).get(method.lower())


def request_schema(method: str, endpoint: str) -> dict | None:
    op = operation(method, endpoint)
    body = (op or {}).get("requestBody")
    return body["content"]["application/json"]["schema"] if body else None


def _resolve(schema: dict) -> dict:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        schema = spec()["components"]["schemas"][name]
    return schema


def validate(schema: dict, body) -> list[str]:
    """Schema errors plus keys the schema does not declare (the spec allows them; a typo would pass)."""
    root = {**spec(), **schema}
    errors = [f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in OAS30Validator(root).iter_errors(body)]
    errors += undeclared_keys(body, schema)
    return errors


def undeclared_keys(body, schema: dict, where: str = "") -> list[str]:
    schema = _resolve(schema)
    problems = []
    if isinstance(body, dict) and "properties" in schema:
        for key, value in body.items():
            if key not in schema["properties"]:
                problems.append(f"{where}{key}: not a property of the schema")
            else:
                problems += undeclared_keys(value, schema["properties"][key], f"{where}{key}/")
    elif isinstance(body, list) and "items" in schema:
        for index, item in enumerate(body):
            problems += undeclared_keys(item, schema["items"], f"{where}{index}/")
    return problems
