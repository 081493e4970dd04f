"""API fuzz (issue 13, standing suite): property-based requests for every RPC of every public service the gateway
serves, over gRPC and over the HTTP/JSON gateway. Whatever a caller sends:
- no call answers INTERNAL or UNKNOWN (HTTP 500), nor hangs (every call has a deadline; DEADLINE_EXCEEDED, HTTP 504
  or a client timeout is a finding), nor cuts the connection;
- the installation keeps serving: well-formed calls work after each batch, every service still runs;
- nothing tells a tenant that another tenant's sandbox or snapshot exists: a call naming one answers exactly as the
  same call naming one that does not exist (same status, same message with the name substituted), and no answer to
  a call that does not name them mentions them.
Requests come from the proto descriptors (tests/fuzz_requests.py), so a new RPC is fuzzed without editing this file,
and go through both doors (tests/fuzz_transport.py); raw bytes over gRPC and raw HTTP requests (any verb, path, content
type, body) are fuzzed too. A whole installation (fake VMM) in this event loop; hypothesis runs in a worker thread and
sends each example to this loop, so failures shrink (and replay first next time, from .pytest_cache/hypothesis).
`MVM_FUZZ_EXAMPLES=200` for a deeper run than the default 10 examples per RPC and door."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import shutil
import tempfile
import time
import urllib.parse
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from microvm.admin.v1 import nodes_pb2, nodes_pb2_grpc
from microvm.sandbox.v1 import sandbox_pb2
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.types.v1 import auth_pb2 as auth_types
from services.auth import permissions
from services.common.records import SANDBOX_TOMBSTONES, Records
from services.gateway.http import SERVICES
from services.gateway.records import sandbox_key
from tests.fuzz_requests import RequestStrategies, build, http_rule, mentions, printable_ascii, token
from tests.fuzz_transport import CALL_TIMEOUT, Doors, Outcome
from tests.inprocess import (
    Caller,
    InProcessNode,
    etcd_client_for,
    fake_image_root,
    start_installation,
    tenant_caller,
)

pytestmark = [
    pytest.mark.timeout(600),
    # Hypothesis generates in a worker thread while this loop's background tasks (leases, reapers) use `random`.
    pytest.mark.filterwarnings("ignore:Do not use the `random` module:hypothesis.errors.HypothesisDeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Generating overly large repr:hypothesis.errors.HypothesisWarning"),
]
# Examples per RPC and door (the raw fuzz draws 15 times as many): about 35 s on two cores; more for a deeper run.
EXAMPLES = int(os.environ.get("MVM_FUZZ_EXAMPLES", "10"))
METHODS = [method for service in SERVICES for method in service.methods]
BY_NAME = {method.full_name: method for method in METHODS}
HTTP_METHODS = [method for method in METHODS if http_rule(method)]
# Statuses no request may cause in a healthy installation: a bug, a hang, or a service that fell over.
BROKEN = {"INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED", "DATA_LOSS", "UNAVAILABLE"}
BROKEN_HTTP = {"500", "502", "503", "504", "TIMEOUT", "DISCONNECTED"}
WHO = ("tenant", "tenant", "operator", "anonymous", "forged")
HOUR = duration_pb2.Duration(seconds=3600)
ID_OF = {"sandboxes": "sandbox-id", "snapshots": "snapshot-id"}
DATABASE = Path(__file__).resolve().parents[2] / ".pytest_cache" / "hypothesis"


@pytest.fixture(scope="module")
async def installation(etcd_server):
    """As the shared one, with a rate limit fuzzing never reaches (RESOURCE_EXHAUSTED from the door would hide what
    the services answer) and an operator tenant of its own for the node administration."""
    node = InProcessNode(etcd_server.endpoint, Path(tempfile.mkdtemp(prefix="mvm-fuzz-")))
    images = fake_image_root(node.state_dir / "images")
    node.settings["compute"] = {"vmm": "fake", "image_cache_dir": str(images), "warm_pool_size": 1}
    node.settings["gateway"] = {
        "rate_limit_per_second": 100_000.0,
        "rate_limit_burst": 100_000.0,
        "operator_tenants": [f"fz-ops-{node.node}"],
    }
    await start_installation(node)
    yield node
    await node.stop_all()
    shutil.rmtree(node.state_dir, ignore_errors=True)


def look_alike(identifier: str) -> str:
    """An id of the same shape and length as `identifier` that names nothing."""
    prefix, _, rest = identifier.rpartition("-")
    return (prefix + "-" if prefix else "") + secrets.token_hex(len(rest))[: len(rest)]


class World:
    """The installation as the fuzz sees it: a tenant whose calls are fuzzed, another tenant whose sandbox and
    snapshot it must never learn of, an operator, the names each token stands for, and both doors."""

    def __init__(
        self, installation: InProcessNode, address: str, tenant: Caller, other: Caller, operator: Caller
    ) -> None:
        self.installation, self.tenant, self.other, self.operator = installation, tenant, other, operator
        self.doors = Doors(address, f"http://{installation.settings['gateway']['http_listen']}")
        self.own_id = f"fz-own-{secrets.token_hex(3)}"
        self.names: dict[str, str] = {}
        self._records: Records | None = None

    @classmethod
    async def make(cls, installation: InProcessNode) -> World:
        tag = installation.node
        world = cls(
            installation,
            await installation.address("gateway"),
            await tenant_caller(installation, f"fz-{tag}", max_sandboxes=3, max_snapshot_bytes=4 << 30),
            await tenant_caller(installation, f"fz-other-{tag}"),
            await tenant_caller(installation, f"fz-ops-{tag}", role=auth_types.ROLE_ADMIN),
        )
        other = world.other
        theirs = (
            await other.stub.CreateSandbox(
                api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(timeout=HOUR)),
                metadata=other.metadata,
                timeout=60,
            )
        ).sandbox
        their_snapshot = (
            await other.stub.CreateSnapshot(
                api.CreateSnapshotRequest(sandbox=theirs.name), metadata=other.metadata, timeout=60
            )
        ).snapshot
        names = {"sandboxes": theirs.name, "snapshots": their_snapshot.name}
        for collection, name in names.items():
            ident = name.split("/", 1)[1]
            missing = look_alike(ident)
            world.names[token("other", collection)] = name
            world.names[token("other", ID_OF[collection])] = ident
            world.names[token("missing", collection)] = f"{collection}/{missing}"
            world.names[token("missing", ID_OF[collection])] = missing
        world.names[token("own", "sandboxes")] = f"sandboxes/{world.own_id}"
        world.names[token("own", "sandbox-id")] = world.own_id
        world.names[token("own", "nodes")] = f"nodes/{installation.node}"
        world.names[token("missing", "nodes")] = f"nodes/{look_alike(installation.node)}"
        await world.settle()
        return world

    @property
    def renames(self) -> dict[str, str]:
        """Another tenant's names -> the look-alikes that name nothing (full names before bare ids)."""
        return {
            self.names[token("other", c)]: self.names[token("missing", c)]
            for c in ("sandboxes", "snapshots", "sandbox-id", "snapshot-id")
        }

    @property
    def placeholders(self) -> dict[str, str]:
        """Every name a token stands for -> `<name>` (full names before the bare ids they contain)."""
        names = sorted(set(self.names.values()), key=len, reverse=True)
        return {name: "<name>" for name in names}

    def without_others(self) -> dict[str, str]:
        names = dict(self.names)
        for key in [k for k in names if k.startswith("{{other:")]:
            names[key] = names[key.replace("other", "missing")]
        return names

    def metadata(self, who: str) -> tuple:
        return {
            "tenant": self.tenant.metadata,
            "operator": self.operator.metadata,
            "anonymous": (),
            "forged": (("authorization", f"Bearer {self.tenant.key[:-4]}AAAA"),),
        }[who]

    async def settle(self) -> None:
        """Back to the starting point after whatever the last example did: only the tenant's own sandbox (running,
        an hour to live) and own snapshot, the node schedulable."""
        stub, md = self.tenant.stub, self.tenant.metadata
        await nodes_pb2_grpc.NodeServiceStub(self.operator.channel).UncordonNode(
            nodes_pb2.UncordonNodeRequest(name=self.names[token("own", "nodes")]),
            metadata=self.operator.metadata,
            timeout=CALL_TIMEOUT,
        )
        listed = await stub.ListSandboxes(api.ListSandboxesRequest(page_size=1000), metadata=md, timeout=CALL_TIMEOUT)
        own = None
        for sandbox in listed.sandboxes:
            healthy = sandbox.state in (sandbox_pb2.SANDBOX_STATE_RUNNING, sandbox_pb2.SANDBOX_STATE_PAUSED)
            if sandbox.name == self.names[token("own", "sandboxes")] and healthy:
                own = sandbox
            else:
                await self._quietly(stub.DeleteSandbox(api.DeleteSandboxRequest(name=sandbox.name), metadata=md))
                # Ids are per tenant: the tenant may have made one under another tenant's id or the look-alike. Its
                # tombstone would tell the tenant about its own past under that name; the fuzz compares answers
                # about names the tenant never used, so the past goes.
                await self.forget_tombstone(sandbox.name)
        if own is None:
            own = (
                await stub.CreateSandbox(
                    api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(timeout=HOUR), sandbox_id=self.own_id),
                    metadata=md,
                    timeout=60,
                )
            ).sandbox
        if own.state == sandbox_pb2.SANDBOX_STATE_PAUSED:
            await stub.ResumeSandbox(api.ResumeSandboxRequest(name=own.name), metadata=md, timeout=CALL_TIMEOUT)
        if own.expire_time.ToSeconds() < time.time() + 1800:
            await stub.UpdateSandbox(
                api.UpdateSandboxRequest(
                    sandbox=sandbox_pb2.Sandbox(name=own.name, timeout=HOUR),
                    update_mask=field_mask_pb2.FieldMask(paths=["timeout"]),
                ),
                metadata=md,
                timeout=CALL_TIMEOUT,
            )
        snapshots = await stub.ListSnapshots(
            api.ListSnapshotsRequest(page_size=1000), metadata=md, timeout=CALL_TIMEOUT
        )
        own_snapshot = self.names.get(token("own", "snapshots"))
        for snapshot in snapshots.snapshots:
            if snapshot.name != own_snapshot or snapshot.expire_time.seconds:
                await self._quietly(stub.DeleteSnapshot(api.DeleteSnapshotRequest(name=snapshot.name), metadata=md))
        if own_snapshot not in [s.name for s in snapshots.snapshots if not s.expire_time.seconds]:
            made = await stub.CreateSnapshot(
                api.CreateSnapshotRequest(sandbox=own.name), metadata=md, timeout=CALL_TIMEOUT
            )
            self.names[token("own", "snapshots")] = made.snapshot.name
            self.names[token("own", "snapshot-id")] = made.snapshot.name.split("/", 1)[1]

    async def forget_tombstone(self, name: str) -> None:
        if self._records is None:
            self._records = Records(etcd_client_for(self.installation.etcd_endpoint))
        tenant = f"fz-{self.installation.node}"
        await self._records.delete(SANDBOX_TOMBSTONES, sandbox_key(tenant, name.split("/", 1)[1]))

    @staticmethod
    async def _quietly(call) -> None:
        try:
            await asyncio.wait_for(call, CALL_TIMEOUT)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise

    async def send(self, transport: str, method, who: str, plan, names: dict[str, str] | None = None) -> Outcome:
        request = build(message_factory.GetMessageClass(method.input_type), plan, names or self.names)
        if transport == "grpc":
            return await self.doors.call_grpc(method, request, self.metadata(who))
        return await self.doors.send_http(method, request, self.metadata(who))

    async def assert_serving(self) -> None:
        """Well-formed calls still work, over both doors, and no service stopped."""
        for kind, running in self.installation.running.items():
            assert not running.task.done(), f"{kind} stopped: {running.task}"
        await self.settle()
        stub, md, own = self.tenant.stub, self.tenant.metadata, self.names[token("own", "sandboxes")]
        got = await stub.GetSandbox(api.GetSandboxRequest(name=own), metadata=md, timeout=CALL_TIMEOUT)
        assert got.sandbox.state == sandbox_pb2.SANDBOX_STATE_RUNNING
        events = stub.Exec(
            api.ExecRequest(sandbox=own, process=api.ProcessConfig(argv=["echo", "still-serving"])),
            metadata=md,
            timeout=CALL_TIMEOUT,
        )
        assert b"still-serving" in b"".join([e.stdout async for e in events])
        async with self.doors.session.get(
            f"{self.doors.http}/v1/{own}", headers={"Authorization": md[0][1]}
        ) as response:
            assert response.status == 200, await response.text()

    async def close(self) -> None:
        await self.doors.close()
        for caller in (self.tenant, self.other, self.operator):
            await caller.channel.close()


@pytest.fixture(scope="module")
async def world(installation):
    world = await World.make(installation)
    yield world
    await world.close()


async def fuzz(strategy, example, name: str, examples: int = EXAMPLES) -> None:
    """Runs hypothesis over `strategy` in a worker thread, each example as a coroutine on this event loop, so the
    installation keeps serving while hypothesis generates and shrinks."""
    loop = asyncio.get_running_loop()

    def run() -> None:
        @settings(
            max_examples=examples,
            deadline=None,
            suppress_health_check=[
                HealthCheck.too_slow,
                HealthCheck.data_too_large,
                HealthCheck.filter_too_much,
                HealthCheck.large_base_example,
                HealthCheck.function_scoped_fixture,
            ],
            database=DirectoryBasedExampleDatabase(str(DATABASE / name)),
            print_blob=True,
        )
        @given(strategy)
        def check(drawn) -> None:
            asyncio.run_coroutine_threadsafe(example(drawn), loop).result(CALL_TIMEOUT * 6)

        check()

    await asyncio.to_thread(run)


def assert_sound(outcome: Outcome, context: str) -> None:
    broken = BROKEN.intersection(outcome.codes) | BROKEN_HTTP.intersection({outcome.status})
    if "metadata size exceeds" in outcome.detail:  # the status did not fit in what a client accepts
        broken.add(outcome.status)
    assert not broken, f"{context} answered {outcome.status} {sorted(broken)}: {outcome.detail[:2000]}"


async def exercise(world: World, transport: str, method, drawn) -> None:
    (temper, plan), who = drawn
    if temper == "tame":
        who = (
            "operator"
            if f"/{method.containing_service.full_name}/{method.name}" in permissions.NODE_ADMIN
            else "tenant"
        )
    await world.settle()
    context = f"{transport} {method.name} as {who}"
    outcome = await world.send(transport, method, who, plan)
    assert_sound(outcome, context)
    if who != "tenant":
        return
    if not mentions(plan, "{{other:"):
        for name in world.renames:
            assert name not in outcome.detail, f"{context} told of another tenant's {name}: {outcome.detail[:2000]}"
        return
    await world.settle()
    twin = await world.send(transport, method, who, plan, world.without_others())
    assert_sound(twin, context)
    if outcome.ok and twin.ok:
        return
    if any("SANDBOX_DELETED_DURING_CREATE" in o.detail for o in (outcome, twin)):
        # A sandbox asked for with a timeout of a second may run out while it is being made, or just after: which
        # of the two calls that happens to is timing (CI: 200 against 409), and tells nothing about tenancy.
        return
    # Every name as one placeholder: which of several bad names an error quotes tells nothing. A map keyed by names
    # is walked in an order of its keys: which bad entry an error quotes differs, so only the status is compared.
    theirs, nobodys = outcome.renamed(world.placeholders), twin.renamed(world.placeholders)
    if keyed_by(plan, "{{other:"):
        theirs, nobodys = replace(theirs, detail=""), replace(nobodys, detail="")
    assert (theirs.status, theirs.detail) == (nobodys.status, nobodys.detail), (
        f"{context}: naming another tenant's resource answers differently from naming none:\n"
        f"  theirs:  {theirs.status} {theirs.detail[:1000]}\n  nobody's: {nobodys.status} {nobodys.detail[:1000]}"
    )


def keyed_by(plan, prefix: str) -> bool:
    """Whether a map of `plan` has a key with a token of `prefix`."""
    if isinstance(plan, dict):
        return any(prefix in str(key) or keyed_by(value, prefix) for key, value in plan.items())
    if isinstance(plan, list | tuple):
        return any(keyed_by(item, prefix) for item in plan)
    return False


def requests_of(method):
    return st.tuples(RequestStrategies(method).plans(), st.sampled_from(WHO))


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.containing_service.name}.{m.name}")
async def test_fuzz_grpc_requests_of_every_rpc(world, method):
    await fuzz(requests_of(method), lambda drawn: exercise(world, "grpc", method, drawn), f"grpc-{method.full_name}")
    await world.assert_serving()


@pytest.mark.parametrize("method", HTTP_METHODS, ids=lambda m: f"{m.containing_service.name}.{m.name}")
async def test_fuzz_http_requests_of_every_route(world, method):
    await fuzz(requests_of(method), lambda drawn: exercise(world, "http", method, drawn), f"http-{method.full_name}")
    await world.assert_serving()


async def test_fuzz_raw_grpc_bytes(world):
    """Bytes that may not parse as the request, on every method, with any credential."""
    payloads = st.one_of(st.binary(max_size=300), st.sampled_from([b"\x0a\x02\xff\xfe", b"\xff" * 64, b"\x12\x80"]))
    credentials = st.one_of(st.sampled_from(["tenant", "anonymous", "forged"]), printable_ascii())

    async def example(drawn) -> None:
        name, messages, who = drawn
        method = BY_NAME[name]
        metadata = world.metadata(who) if who in WHO else (("authorization", who),)
        request = messages if method.client_streaming else messages[0]
        assert_sound(await world.doors.call_grpc(method, request, metadata, raw=True), f"raw gRPC {name}")

    strategy = st.tuples(st.sampled_from(sorted(BY_NAME)), st.lists(payloads, min_size=1, max_size=4), credentials)
    await fuzz(strategy, example, "grpc-raw", examples=EXAMPLES * 15)
    await world.assert_serving()


def json_values():
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=12,
    )


HUGE_BODIES = {
    "half an object": lambda: b"{",
    "6 MiB of stdin": lambda: b'{"process": {"argv": ["echo"]}, "stdin": "%s"}' % base64.b64encode(b"x" * (6 << 20)),
    "100k labels": lambda: b'{"labels": {%s}}' % b",".join(b'"k%d": "v"' % i for i in range(100_000)),
    "100k nested arrays": lambda: b"[" * 100_000,
    "9 MiB of x": lambda: b"x" * (9 << 20),
}


async def test_fuzz_raw_http_requests(world):
    """Any verb on any route (or none), paths with junk, bodies that are not the message, or not JSON, or huge."""
    templates = sorted({http_rule(m)[1] for m in HTTP_METHODS}) + ["/v1/", "/v1/sandboxes/x:nothing", "/openapi.json"]
    owns = [world.names[token("own", c)] for c in ("sandboxes", "snapshots", "nodes")]
    fills = st.one_of(st.sampled_from(owns), st.text(max_size=20).map(lambda t: urllib.parse.quote(t, safe="/")))
    paths = st.builds(lambda template, fill: re.sub(r"\{[^}]+\}", fill, template), st.sampled_from(templates), fills)
    fields = sorted({f.json_name for m in HTTP_METHODS for f in m.input_type.fields})
    objects = st.dictionaries(st.sampled_from(fields) | st.text(max_size=8), json_values(), max_size=5)
    bodies = st.one_of(
        st.just(b""),
        objects.map(lambda o: json.dumps(o).encode()),
        json_values().map(lambda o: json.dumps(o).encode()),
        st.binary(max_size=200),
        st.sampled_from(sorted(HUGE_BODIES)),  # by name: built when sent
    )
    content_types = st.sampled_from(
        ["application/json", "text/plain", "application/octet-stream", "multipart/form-data; boundary=x", "", "\x7f"]
    )
    queries = st.dictionaries(
        st.sampled_from(["path", "mode", "pageSize", "updateMask", "makeParents", "x"]),
        st.text(max_size=12),
        max_size=3,
    )
    verbs = st.sampled_from(["GET", "POST", "PATCH", "DELETE", "PUT", "OPTIONS", "HEAD"])

    async def example(drawn) -> None:
        verb, path, query, body, content_type, who = drawn
        body = HUGE_BODIES[body]() if isinstance(body, str) else body
        headers = {"Authorization": world.metadata(who)[0][1]} if world.metadata(who) else {}
        if content_type.isprintable() and content_type:
            headers["Content-Type"] = content_type
        outcome = await world.doors.http_call(verb, path, query, body, headers)
        assert_sound(outcome, f"raw HTTP {verb} {path}")

    strategy = st.tuples(verbs, paths, queries, bodies, content_types, st.sampled_from(WHO))
    await fuzz(strategy, example, "http-raw", examples=EXAMPLES * 15)
    await world.assert_serving()


async def test_fuzz_covers_every_public_service_the_gateway_serves(world):
    """Every service the gateway registers (but health and reflection) is one this suite fuzzes."""
    reflection = reflection_pb2_grpc.ServerReflectionStub(world.tenant.channel)

    async def ask():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for answer in reflection.ServerReflectionInfo(ask(), timeout=CALL_TIMEOUT):
        served = {s.name for s in answer.list_services_response.service}
    served -= {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
    assert served == {service.full_name for service in SERVICES}


# Regressions of what this suite found.


@pytest.mark.parametrize(
    "request_of",
    [
        lambda: api.GetSandboxRequest(name="x" * 5000),
        lambda: api.GetSandboxRequest(name="é" * 70_000),
        lambda: api.CreateSandboxRequest(sandbox=sandbox_pb2.Sandbox(labels={"K" * 6000: "v"})),
        lambda: api.ListSandboxesRequest(filter="/a" * 3000),
    ],
    ids=["long-name", "huge-unicode-name", "long-label-key", "long-filter"],
)
async def test_fuzz_found_an_error_quoting_a_huge_request_still_reaches_its_caller(world, request_of):
    """An error quoting what it refused (a 5000-character name) overflowed the 8 KiB of trailers a client accepts:
    the caller got RESOURCE_EXHAUSTED ("received metadata size exceeds soft limit") instead of INVALID_ARGUMENT."""
    request = request_of()
    method = next(m for m in METHODS if m.input_type.full_name == request.DESCRIPTOR.full_name)
    for _ in range(5):  # above 8 KiB a client refuses trailers at random, always above 16 KiB
        outcome = await world.doors.call_grpc(method, request, world.tenant.metadata)
        assert outcome.status == "INVALID_ARGUMENT", outcome.detail[:500]
        assert len(outcome.detail) < 2000


async def test_fuzz_found_a_client_stream_the_relay_ends_early_keeps_its_status(world):
    """The gateway forwards WriteFile and ExecInteractive to the relay while the caller is still sending. When the relay
    ended the stream (a bad message, a failed write, the process exited) with a forwarded message in flight, grpc's
    asyncio client in the gateway reported INTERNAL "Internal error from Core" (grpc/grpc#36066) instead of the relay's
    status, and the gateway passed it on: about one call in three."""
    own, md = world.names[token("own", "sandboxes")], world.tenant.metadata
    header = api.WriteFileRequest(header=api.WriteFileHeader(sandbox=own, path="/tmp/fz-early"))
    writes = {
        "INVALID_ARGUMENT": [header, api.WriteFileRequest(), api.WriteFileRequest(data=b"x")],
        "NOT_FOUND": [
            api.WriteFileRequest(header=api.WriteFileHeader(sandbox=own, path="/no/such/dir/f")),
            *[api.WriteFileRequest(data=b"x" * 65536)] * 20,
        ],
    }
    config = api.ExecInteractiveConfig(sandbox=own, process=api.ProcessConfig(argv=["true"]))
    interactive = [api.ExecInteractiveRequest(config=config), *[api.ExecInteractiveRequest(stdin=b"x" * 1000)] * 50]
    for _ in range(15):
        for status, messages in writes.items():
            outcome = await world.doors.call_grpc(BY_NAME["microvm.sandbox.v1.SandboxService.WriteFile"], messages, md)
            assert outcome.status == status, outcome.detail[:500]
        outcome = await world.doors.call_grpc(
            BY_NAME["microvm.sandbox.v1.SandboxService.ExecInteractive"], interactive, md
        )
        assert outcome.status == "OK" and "exited" in outcome.detail, outcome.detail[:500]
