"""envd's wire (services/gateway/e2b/connect_protocol.py, envd_http.py) spoken by hand: the Connect framing and
codecs the SDK does not exercise (binary proto, client streaming), and the caller's mistakes, each answered in
Connect's or envd's error shape, never a 500. A real in-process installation (fake VMM) behind it."""

from __future__ import annotations

import gzip
import json
import struct
import uuid

import aiohttp
import pytest
from e2b_envd import process_pb2 as proc

from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from tests.e2b_envd import SANDBOX_ENV, envd_app
from tests.inprocess import tenant_caller
from tests.unit.e2b_fixtures import envelopes

pytestmark = pytest.mark.timeout(120)
JSON, PROTO = {"Content-Type": "application/json"}, {"Content-Type": "application/proto"}
STREAM_PROTO = {"Content-Type": "application/connect+proto"}


def envelope(data: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(data)) + data


@pytest.fixture(scope="module")
async def caller(installation):
    return await tenant_caller(installation, f"envd-wire-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
async def sandbox_id(caller):
    request = api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(env=SANDBOX_ENV))
    created = await caller.stub.CreateSandbox(request, metadata=caller.metadata, timeout=60)
    return created.sandbox.name.split("/", 1)[1]


@pytest.fixture(scope="module")
async def url(caller, sandbox_id):
    async with envd_app(caller, sandbox_id) as url:
        yield url


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def test_start_over_binary_connect_streams_start_output_end_and_end_of_stream(http, url):
    request = proc.StartRequest(process=proc.ProcessConfig(cmd="/bin/sh", args=["-c", "echo hi; exit 4"]))
    async with http.post(
        f"{url}/process.Process/Start", data=envelope(request.SerializeToString()), headers=STREAM_PROTO
    ) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/connect+proto"
        frames = envelopes(await r.read())
    events = [proc.StartResponse.FromString(data).event for flags, data in frames[:-1]]
    assert events[0].start.pid > 0 and b"".join(e.data.stdout for e in events) == b"hi\n"
    assert (events[-1].end.exit_code, events[-1].end.status) == (4, "exit status 4")
    assert frames[-1] == (0x02, b"{}")


async def test_a_bad_message_is_invalid_argument_in_every_framing(http, url):
    async with http.post(f"{url}/process.Process/List", data=b"{not json", headers=JSON) as r:
        assert r.status == 400 and (await r.json())["code"] == "invalid_argument"
    async with http.post(f"{url}/process.Process/SendInput", data=b"\xff\xff\xff", headers=PROTO) as r:
        assert r.status == 400 and (await r.json())["code"] == "invalid_argument"
    async with http.post(f"{url}/process.Process/Start", data=envelope(b"\xff\xff"), headers=STREAM_PROTO) as r:
        flags, data = envelopes(await r.read())[-1]
        assert r.status == 200 and flags == 0x02 and json.loads(data)["error"]["code"] == "invalid_argument"
    request = proc.StartRequest(process=proc.ProcessConfig(cmd=""))
    async with http.post(
        f"{url}/process.Process/Start", data=envelope(request.SerializeToString()), headers=STREAM_PROTO
    ) as r:
        assert json.loads(envelopes(await r.read())[-1][1])["error"]["code"] == "invalid_argument"
    async with http.post(
        f"{url}/process.Process/List", data=b"{}", headers={**JSON, "Connect-Timeout-Ms": "soon"}
    ) as r:
        assert r.status == 400 and (await r.json())["code"] == "invalid_argument"


async def test_unknown_methods_content_types_and_pids(http, url):
    async with http.post(f"{url}/process.Process/Fork", data=b"{}", headers=JSON) as r:
        assert r.status == 501 and (await r.json())["code"] == "unimplemented"
    async with http.post(f"{url}/process.Process/List", data=b"{}", headers={"Content-Type": "text/plain"}) as r:
        assert r.status == 415
    signal = proc.SendSignalRequest(process=proc.ProcessSelector(pid=4_000_000), signal=proc.SIGNAL_SIGKILL)
    async with http.post(f"{url}/process.Process/SendSignal", data=signal.SerializeToString(), headers=PROTO) as r:
        assert r.status == 404 and (await r.json())["code"] == "not_found"
    async with http.post(f"{url}/process.Process/SendSignal", json={"process": {"tag": "nobody"}}) as r:
        assert r.status == 400 and (await r.json())["code"] == "invalid_argument"  # no signal named
    resize = {"process": {"tag": "plain"}, "pty": {"size": {"cols": 10, "rows": 10}}}
    async with http.post(f"{url}/process.Process/Start", data=b"", headers=STREAM_PROTO) as r:
        assert json.loads(envelopes(await r.read())[-1][1])["error"]["code"] == "invalid_argument"  # no message
    start = proc.StartRequest(process=proc.ProcessConfig(cmd="sleep", args=["30"]), tag="plain")
    async with http.post(
        f"{url}/process.Process/Start", data=envelope(start.SerializeToString()), headers=STREAM_PROTO
    ) as r:
        await r.content.readexactly(5)  # the start event's envelope: it runs
        async with http.post(f"{url}/process.Process/Update", json=resize) as resized:
            assert resized.status == 400 and "no PTY" in (await resized.json())["message"]
        async with http.post(f"{url}/process.Process/SendSignal", json={"process": {"tag": "plain"}, "signal": 9}) as k:
            assert k.status == 200


async def test_stream_input_feeds_a_process_in_order(http, url, caller, sandbox_id):
    started = await caller.stub.StartProcess(
        api.StartProcessRequest(
            sandbox=f"sandboxes/{sandbox_id}", process=api.ProcessConfig(argv=["cat"]), stdin=True, tag="cat-in"
        ),
        metadata=caller.metadata,
    )
    selector = proc.ProcessSelector(tag="cat-in")
    messages = [proc.StreamInputRequest(start=proc.StreamInputRequest.StartEvent(process=selector))]
    for piece in (b"one ", b"two ", b"three"):
        data = proc.StreamInputRequest.DataEvent(input=proc.ProcessInput(stdin=piece))
        messages.append(proc.StreamInputRequest(data=data))
    body = b"".join(envelope(m.SerializeToString()) for m in messages)
    async with http.post(f"{url}/process.Process/StreamInput", data=body, headers=STREAM_PROTO) as r:
        assert r.status == 200 and envelopes(await r.read())[-1] == (0x02, b"{}")
    close = {"process": {"pid": started.process.pid}}
    async with http.post(f"{url}/process.Process/CloseStdin", json=close) as r:
        assert r.status == 200
    follow = caller.stub.ConnectProcess(
        api.ConnectProcessRequest(sandbox=f"sandboxes/{sandbox_id}", pid=started.process.pid, tail_bytes=1 << 20),
        metadata=caller.metadata,
        timeout=30,
    )
    output = b"".join([response.event.stdout async for response in follow])
    assert output == b"one two three"


async def test_health_envs_init_and_metrics(http, url):
    async with http.get(f"{url}/health") as r:
        assert r.status == 204
    async with http.get(f"{url}/envs") as r:
        assert r.status == 200 and isinstance(await r.json(), dict)
    async with http.post(f"{url}/init", json={"envVars": {"A": "1"}, "accessToken": "t"}) as r:
        assert r.status == 204
    async with http.post(f"{url}/init", data=b"[1, 2", headers=JSON) as r:
        assert r.status == 400 and (await r.json())["code"] == 400
    async with http.get(f"{url}/metrics") as r:
        assert r.status == 200 and "ts" in await r.json()
    async with http.get(f"{url}/nowhere") as r:
        assert r.status == 404 and (await r.json())["code"] == 404


async def test_files_errors_and_a_gzip_octet_stream_upload(http, url):
    path = f"/tmp/e2b-wire-{uuid.uuid4().hex[:6]}/up.txt"
    async with http.get(f"{url}/files", params={"path": path}) as r:
        assert r.status == 404 and (await r.json())["code"] == 404
    async with http.get(f"{url}/files") as r:
        assert r.status == 400 and (await r.json())["code"] == 400
    async with http.get(f"{url}/files", params={"path": "/tmp"}) as r:
        assert r.status == 400 and (await r.json())["code"] == 400  # a directory
    headers = {"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"}
    async with http.post(f"{url}/files", params={"path": path}, data=gzip.compress(b"zipped"), headers=headers) as r:
        assert r.status == 200 and (await r.json()) == [{"path": path, "name": "up.txt", "type": "file"}]
    async with http.get(f"{url}/files", params={"path": path}) as r:
        assert r.status == 200 and await r.read() == b"zipped"
    async with http.post(f"{url}/files", params={"path": path}, data=b"x", headers={"X-Metadata-Owner": "me"}) as r:
        assert r.status == 400 and "X-Metadata" in (await r.json())["message"]
    async with http.post(f"{url}/files", data=b"x", headers={"Content-Type": "application/octet-stream"}) as r:
        assert r.status == 400  # no path for an octet-stream upload


async def test_another_tenant_cannot_reach_the_sandbox_through_envd(http, installation, sandbox_id):
    stranger = await tenant_caller(installation, f"envd-stranger-{uuid.uuid4().hex[:6]}")
    async with envd_app(stranger, sandbox_id) as strangers_url:
        async with http.post(f"{strangers_url}/process.Process/List", json={}) as r:
            assert r.status == 404 and (await r.json())["code"] == "not_found"
        async with http.get(f"{strangers_url}/files", params={"path": "/etc/hostname"}) as r:
            assert r.status == 404
