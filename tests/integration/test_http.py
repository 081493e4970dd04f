"""HTTP/JSON at the gateway: the same API and semantics as gRPC, routes generated from the protos."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.gateway.http import routes
from tests.fuzz_transport import OPEN_ENDED

pytestmark = pytest.mark.guest


def http_base(stack) -> str:
    config = yaml.safe_load(stack.config_path.read_text())
    return "http://" + config["gateway"]["http_listen"]


def call(
    stack, method: str, path: str, key: str | None, body=None, headers=None, raw: bytes | None = None, first_line=False
):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(
        http_base(stack) + path,
        data=data,
        method=method,
        headers={**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            reply = response.readline() if first_line else response.read()
            return response.status, reply, response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers.get("Content-Type", "")


def test_create_exec_streamed_files_and_delete_over_http(stack):
    key = stack.admin_key
    status, body, _ = call(stack, "POST", "/v1/sandboxes", key, {"template": "default", "labels": {"via": "http"}})
    assert status == 200
    name = json.loads(body)["sandbox"]["name"]
    try:
        status, body, kind = call(
            stack,
            "POST",
            f"/v1/{name}:exec",
            key,
            {"process": {"argv": ["sh", "-c", "echo out; echo err >&2; exit 4"]}},
        )
        events = [json.loads(line) for line in body.decode().splitlines()]
        assert status == 200 and kind == "application/x-ndjson"
        assert [next(iter(e)) for e in events] == ["started", "stdout", "stderr", "exited"]
        assert events[-1]["exited"]["exitCode"] == 4
        status, body, kind = call(
            stack,
            "POST",
            f"/v1/{name}:exec",
            key,
            {"process": {"argv": ["echo", "sse"]}},
            headers={"Accept": "text/event-stream"},
        )
        assert kind == "text/event-stream" and body.decode().count("data: ") == 3
        payload = bytes(range(256)) * 100
        status, body, _ = call(
            stack,
            "POST",
            f"/v1/{name}/files:write?path=/root/blob&makeParents=true",
            key,
            raw=payload,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert status == 200 and json.loads(body)["file"]["size"] == str(len(payload))
        status, body, kind = call(stack, "GET", f"/v1/{name}/files:read?path=/root/blob", key)
        assert status == 200 and body == payload and kind == "application/octet-stream"
        status, body, _ = call(stack, "GET", f"/v1/{name}/files:read?path=/missing", key)
        assert status == 404 and json.loads(body)["details"][0]["reason"] == "NOT_FOUND"
    finally:
        status, _, _ = call(stack, "DELETE", f"/v1/{name}", key)
    assert status == 200
    assert call(stack, "GET", f"/v1/{name}", key)[0] == 404


def test_errors_are_json_statuses_with_http_codes(stack):
    status, body, _ = call(stack, "GET", "/v1/sandboxes", None)
    assert status == 401 and json.loads(body)["code"] == 16
    status, body, _ = call(stack, "POST", "/v1/sandboxes", stack.admin_key, {"vcpus": 1000})
    assert status == 400 and json.loads(body)["details"][0]["reason"] == "VCPUS_OUT_OF_RANGE"
    status, body, _ = call(stack, "POST", "/v1/sandboxes", stack.admin_key, raw=b"{not json")
    assert status == 400


def test_another_tenant_gets_nothing_over_http_either(stack, tenants):
    _, b, sandbox, snapshot = tenants
    name, snap = sandbox.name, snapshot.name
    attempts = [
        ("GET", f"/v1/{name}", None),
        ("PATCH", f"/v1/{name}", {"labels": {"x": "y"}}),
        ("DELETE", f"/v1/{name}", None),
        ("POST", f"/v1/{name}:exec", {"process": {"argv": ["id"]}}),
        ("GET", f"/v1/{name}/files:read?path=/etc/hostname", None),
        ("GET", f"/v1/{name}/files:list?path=/", None),
        ("GET", f"/v1/{name}/files:stat?path=/", None),
        ("POST", f"/v1/{name}/files:mkdir", {"path": "/x"}),
        ("POST", f"/v1/{name}/files:remove", {"path": "/etc"}),
        ("POST", f"/v1/{name}:pause", {}),
        ("POST", f"/v1/{name}:resume", {}),
        ("POST", f"/v1/{name}:snapshot", {}),
        ("POST", f"/v1/{name}:fork", {"count": 1}),
        ("GET", f"/v1/{snap}", None),
        ("POST", f"/v1/{snap}:restore", {}),
        ("DELETE", f"/v1/{snap}", None),
        ("POST", f"/v1/{name}:exposePort", {"guestPort": 80}),
    ]
    outcomes = [call(stack, method, path, b.api_key, body)[0] for method, path, body in attempts]
    successes = [a for a, s in zip(attempts, outcomes, strict=True) if s < 300]
    print(f"\nadversarial tally over HTTP: {len(attempts)} attempts, {len(successes)} successes")
    assert successes == [] and set(outcomes) <= {404, 501}


def test_openapi_document_covers_every_annotated_rpc(stack):
    status, body, _ = call(stack, "GET", "/openapi.json", None)
    document = json.loads(body)
    operations = {op["operationId"] for path in document["paths"].values() for op in path.values()}
    assert status == 200 and operations == {r.method.name for r in routes()}
    by_id = {op["operationId"]: op for path in document["paths"].values() for op in path.values()}
    assert {"name": "updateMask", "in": "query", "required": False, "schema": {"type": "string"}} in by_id[
        "UpdateSandbox"
    ]["parameters"]
    assert {p["name"] for p in by_id["ListSandboxes"]["parameters"]} >= {"pageSize", "pageToken", "filter"}


ROUTES = routes()


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    route=st.sampled_from(ROUTES),
    segment=st.text(min_size=1, max_size=20).filter(lambda s: "/" not in s),
    body=st.one_of(
        st.none(),
        st.dictionaries(
            st.sampled_from(
                [
                    "name",
                    "sandbox",
                    "path",
                    "count",
                    "process",
                    "labels",
                    "timeout",
                    "guestPort",
                    "template",
                    "vcpus",
                    "memoryMib",
                    "pageSize",
                    "pageToken",
                    "filter",
                    "offset",
                    "length",
                    "recursive",
                ]
            ),
            st.one_of(
                st.integers(-5, 2**40),
                st.text(max_size=30),
                st.booleans(),
                st.none(),
                st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
            ),
            max_size=4,
        ),
    ),
)
def test_random_requests_against_every_route_never_cause_a_server_error(stack, route, segment, body):
    from urllib.parse import quote

    path = route.template
    for field in route.fields.values():
        collection = "snapshots" if "snapshot" in route.template.split(field)[1][:30] else "sandboxes"
        path = path.replace(path[path.index("{") : path.index("}") + 1], f"{collection}/{quote(segment, safe='')}", 1)
    first_only = route.method.name in OPEN_ENDED  # a watch goes on until cancelled: its first answer says enough
    status, reply, _ = call(
        stack, route.verb, path, stack.admin_key, body if route.verb != "GET" else None, first_line=first_only
    )
    assert status < 500 or status in (501, 503), (route.verb, path, body, status, reply[:300])
