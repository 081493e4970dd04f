"""Template builds over the HTTP door (`POST /v1/templates/{name}:build`, services/gateway/http_builds.py) on a
fake-VMM installation: a tar body streamed as the context, NDJSON and SSE events, errors before the stream as
JSON statuses, and the template's other routes (get, builds, log, watch, delete)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import tarfile
import uuid

import aiohttp
import pytest

from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(180)

BIG = 2_621_440  # 2.5 MiB: the body reaches the gateway in several chunks of at most 1 MiB
DOCKERFILE = """\
FROM default
ARG WHO=nobody
WORKDIR /app
COPY . ./
RUN wc -c < big.bin && cat hello.txt && echo "built by $WHO"
"""


def context_tar(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def ndjson(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def logged(events: list[dict]) -> str:
    return b"".join(base64.b64decode(e["log"]["data"]) for e in events if "log" in e).decode()


class Door:
    """The HTTP door as one tenant sees it."""

    def __init__(self, installation, key: str | None) -> None:
        self.base = f"http://{installation.settings['gateway']['http_listen']}"
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    async def request(self, verb: str, path: str, **kwargs) -> tuple[int, dict[str, str], str]:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        timeout = aiohttp.ClientTimeout(total=150)
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
            async with http.request(verb, self.base + path, **kwargs) as response:
                return response.status, dict(response.headers), await response.text()


@pytest.fixture(scope="module")
async def door(installation):
    caller = await tenant_caller(installation, f"tpl-http-{uuid.uuid4().hex[:6]}")
    door = Door(installation, caller.key)
    for _ in range(100):  # the gateway starts its HTTP listener after its gRPC server
        try:
            await door.request("GET", "/openapi.json")
            return door
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.1)
    raise AssertionError("the HTTP door did not open")


@pytest.fixture(scope="module")
async def built(door):
    name = f"web-{uuid.uuid4().hex[:6]}"
    body = context_tar({"hello.txt": b"hi over http\n", "big.bin": os.urandom(BIG)})
    status, headers, text = await door.request(
        "POST",
        f"/v1/templates/{name}:build",
        params=[("dockerfile", DOCKERFILE), ("tag", "v1"), ("tag", "http"), ("buildArg", "WHO=curl")],
        data=body,
        headers={"Content-Type": "application/x-tar"},
    )
    assert status == 200, text
    assert headers["Content-Type"] == "application/x-ndjson"
    return name, ndjson(text)


async def test_a_tar_body_builds_and_the_events_stream_as_ndjson_until_the_build_succeeded(built):
    _, events = built
    assert "build" in events[0] and "build" in events[-1]
    last = events[-1]["build"]
    assert last["state"] == "TEMPLATE_BUILD_STATE_SUCCEEDED", last.get("failureMessage")
    assert last["tags"] == ["v1", "http"]
    steps = [e["step"] for e in events if "step" in e]
    assert {"TEMPLATE_STEP_STATE_RUNNING", "TEMPLATE_STEP_STATE_DONE"} <= {s["state"] for s in steps}
    output = logged(events)
    assert f"{BIG}\nhi over http\nbuilt by curl\n" in output  # every byte of the body arrived
    assert "--> COPY . /app/" in output


async def test_the_template_its_builds_and_log_are_read_over_http_and_deleted(door, built):
    name, events = built
    build = events[-1]["build"]["name"]
    build_id = build.rsplit("/", 1)[1]
    status, _, text = await door.request("GET", f"/v1/templates/{name}")
    assert status == 200, text
    assert json.loads(text)["template"]["tags"] == {"v1": build_id, "http": build_id}
    status, _, text = await door.request("GET", f"/v1/templates/{name}/builds")
    assert status == 200 and [b["name"] for b in json.loads(text)["builds"]] == [build]
    status, _, text = await door.request("GET", f"/v1/{build}")
    assert status == 200 and json.loads(text)["build"]["state"] == "TEMPLATE_BUILD_STATE_SUCCEEDED"
    status, _, text = await door.request("GET", f"/v1/{build}/log")
    assert status == 200 and "built by curl" in base64.b64decode(json.loads(text)["data"]).decode()
    status, _, text = await door.request("GET", f"/v1/{build}:watch")
    assert status == 200 and ndjson(text)[-1]["build"]["state"] == "TEMPLATE_BUILD_STATE_SUCCEEDED"
    status, _, text = await door.request("DELETE", f"/v1/templates/{name}")
    assert (status, json.loads(text)) == (200, {})
    status, _, text = await door.request("GET", f"/v1/templates/{name}")
    assert status == 404 and json.loads(text)["details"][0]["reason"] == "TEMPLATE_NOT_FOUND"


async def test_a_json_body_builds_without_a_context_and_events_come_as_server_sent_events(door):
    name = f"json-{uuid.uuid4().hex[:6]}"
    spec = {
        "recipe": "from: default\nargs: {V: '1'}\nsteps:\n  - run: echo version $V\n",
        "tags": ["sse"],
        "buildArgs": {"V": "2"},
        "noCache": True,
    }
    # No Content-Type (as `curl -d` sends form-urlencoded): without a definition in the query, the body is JSON.
    status, headers, text = await door.request(
        "POST", f"/v1/templates/{name}:build", data=json.dumps(spec), headers={"Accept": "text/event-stream"}
    )
    assert status == 200, text
    assert headers["Content-Type"] == "text/event-stream"
    blocks = [block for block in text.split("\n\n") if block.strip()]
    assert all(block.startswith("data: ") for block in blocks), blocks
    events = [json.loads(block.removeprefix("data: ")) for block in blocks]
    assert events[-1]["build"]["state"] == "TEMPLATE_BUILD_STATE_SUCCEEDED", events[-1]
    assert events[-1]["build"]["tags"] == ["sse"]
    assert "version 2" in logged(events)
    assert (await door.request("DELETE", f"/v1/templates/{name}"))[0] == 200


async def test_a_bad_dockerfile_is_400_with_its_reason_and_line_and_creates_nothing(door):
    name = f"bad-{uuid.uuid4().hex[:6]}"
    # 1500 comment lines: far longer than aiohttp's default request line (8190 bytes) once in the query string.
    dockerfile = "FROM default\n" + "# a comment the parser skips\n" * 1500 + "HEALTHCHECK CMD true\n"
    status, _, text = await door.request(
        "POST",
        f"/v1/templates/{name}:build",
        params={"dockerfile": dockerfile},
        data=context_tar({"a.txt": b"a"}),
        headers={"Content-Type": "application/x-tar"},
    )
    assert status == 400, text
    error = json.loads(text)
    assert error["code"] == 3 and "line 1502" in error["message"]
    assert error["details"][0]["reason"] == "UNSUPPORTED_INSTRUCTION"
    assert error["details"][0]["metadata"]["line"] == "1502"
    assert (await door.request("GET", f"/v1/templates/{name}"))[0] == 404


async def test_a_body_that_is_not_a_tar_stream_is_400_invalid_context(door):
    status, _, text = await door.request(
        "POST",
        f"/v1/templates/junk-{uuid.uuid4().hex[:6]}:build",
        params={"dockerfile": "FROM default\nRUN true\n"},
        data=b"not a tar stream " * 100,
    )
    assert status == 400 and json.loads(text)["details"][0]["reason"] == "INVALID_CONTEXT", text


async def test_a_failing_step_ends_the_stream_with_a_failed_build_after_a_200(door):
    name = f"fails-{uuid.uuid4().hex[:6]}"
    status, _, text = await door.request(
        "POST", f"/v1/templates/{name}:build", json={"dockerfile": "FROM default\nRUN echo oops >&2; exit 3\n"}
    )
    assert status == 200, text  # the stream had started: the outcome is its last event
    last = ndjson(text)[-1]["build"]
    assert last["state"] == "TEMPLATE_BUILD_STATE_FAILED"
    assert last["failureReason"] == "BUILD_STEP_FAILED" and "oops" in last["failureMessage"]
    assert (await door.request("DELETE", f"/v1/templates/{name}"))[0] == 200


async def test_a_build_without_credentials_is_401(installation):
    status, _, text = await Door(installation, None).request(
        "POST",
        "/v1/templates/anon:build",
        params={"dockerfile": "FROM default\nRUN true\n"},
        data=context_tar({"a.txt": b"a" * (3 << 20)}),
        headers={"Content-Type": "application/x-tar"},
    )
    assert status == 401, text
    assert json.loads(text)["details"][0]["reason"] == "NO_CREDENTIAL"


@pytest.mark.parametrize(
    "params, body, content_type, message",
    [
        ({"dockerfile": "FROM default\n", "colour": "red"}, b"", None, "unknown query parameter 'colour'"),
        ({"dockerfile": "FROM default\n", "buildArg": "NOVALUE"}, b"", None, "is not NAME=VALUE"),
        ({}, b"", "application/x-tar", "the definition goes in the query string"),
        ({"recipe": "from: default\n"}, b"{}", "application/json", "or in a JSON body"),
        ({}, b'{"dockerfile": "FROM default", "context": "eA=="}', None, "context"),
        ({}, b'{"template": "templates/other", "dockerfile": "FROM default"}', None, "the path"),
    ],
)
async def test_requests_the_door_cannot_read_are_400_before_any_call(door, params, body, content_type, message):
    headers = {"Content-Type": content_type} if content_type else {}
    status, _, text = await door.request(
        "POST", "/v1/templates/unread:build", params=params, data=body, headers=headers
    )
    assert status == 400, text
    error = json.loads(text)
    assert error["code"] == 3 and message in error["message"], error


async def test_openapi_describes_the_build_route_with_both_bodies(door):
    status, _, text = await door.request("GET", "/openapi.json")
    assert status == 200
    operation = json.loads(text)["paths"]["/v1/templates/{spec_template}:build"]["post"]
    assert operation["operationId"] == "BuildTemplate"
    assert set(operation["requestBody"]["content"]) == {"application/x-tar", "application/json"}
    assert {p["name"] for p in operation["parameters"]} == {
        "spec_template",
        "dockerfile",
        "recipe",
        "tag",
        "buildArg",
        "noCache",
    }
    assert "application/x-ndjson" in operation["responses"]["200"]["content"]
