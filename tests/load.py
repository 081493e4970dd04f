"""Mixed load against a real local stack, for the standing suites (tests/standing): chaos (every process of the
stack killed in turn under this load) and soak (this load for minutes while resources are sampled, tests/soak.py).

`Workload` runs `workers` concurrent clients through the gateway with the admin key, each on a channel of its own.
A client's cycle: create a sandbox (a client-chosen id, so a retried create is idempotent), exec in it (a short
command, a streamed one, one that spans a second), write a file and read it back, read back a file of an older
sandbox, now and then snapshot one and delete its previous snapshot, and delete its oldest sandbox beyond `keep`.
Calls that fail UNAVAILABLE or DEADLINE_EXCEEDED are retried with back-off and counted; everything the stack
acknowledged is remembered, and `verify` checks at the end that it is all still there, through the API and in
etcd. What counts as lost is in `Tally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import duration_pb2

from microvm.sandbox.v1 import sandbox_pb2, sandbox_service_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.records import SANDBOXES, SNAPSHOTS, Records
from tests.inprocess import fake_image_root
from tests.stack import LocalStack, start_stack
from tests.tally import BROKEN, TRANSIENT, Tally

CALL_TIMEOUT = 30.0  # seconds, each call's deadline
RETRY_FOR = 90.0  # seconds a call is retried through transient failures before it counts as failed


def load_stack(state_dir: Path, vmm: str = "fake", **extra) -> LocalStack:
    """A stack for load: the fake VMM (every path above the VMM is the real one) with a fake image cache, or a real
    VMM (`vmm` auto/qemu/cloud-hypervisor) on the images built in $MVM_CACHE_DIR."""
    compute = {"vmm": vmm, "warm_pool_size": 1}
    if vmm == "fake":
        compute["image_cache_dir"] = str(fake_image_root(state_dir / "images"))
    return start_stack(state_dir, {"compute": compute, **extra})


@contextlib.asynccontextmanager
async def running_stack(vmm: str = "fake"):
    """`load_stack` in a short state dir of its own (the unix sockets of its VMs must fit 107 bytes), stopped at
    the end; the state dir (logs, etcd) is removed unless the test failed."""
    state_dir = Path(tempfile.mkdtemp(prefix="mvm-load-", dir="/tmp"))
    stack = await asyncio.to_thread(load_stack, state_dir, vmm)
    try:
        yield stack
    except BaseException:
        print(f"\nthe stack's state and logs are kept in {state_dir}")
        raise
    finally:
        await asyncio.to_thread(stack.stop)
    # Only once the stack has stopped: its stop finds the VMs compute left running by their pid files in there.
    shutil.rmtree(state_dir, ignore_errors=True)


@dataclass
class Owned:
    """A sandbox the load created and the stack acknowledged, with what it wrote there."""

    name: str
    files: dict[str, bytes] = field(default_factory=dict)  # path -> sha256 of the acknowledged content


class GiveUp(Exception):
    """A call failed in a way the cycle cannot go on from (already counted)."""


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class Workload:
    def __init__(self, stack: LocalStack, tally: Tally, workers: int = 4, keep: int = 2, lifetime: int = 3600):
        self.stack = stack
        self.tally = tally
        self.workers = workers
        self.keep = keep
        self.lifetime = lifetime  # seconds before a sandbox would expire: longer than any run
        self.run_id = secrets.token_hex(3)
        self.owned: dict[str, Owned] = {}  # acknowledged and not deleted
        self.snapshots: set[str] = set()  # acknowledged and not deleted
        self.kill_windows: list[tuple[float, float]] = []  # (start, end) monotonic; end inf while open
        self.metadata = (("authorization", f"Bearer {stack.admin_key}"),)
        self.cycles = 0

    # -- kill windows: transient failures inside one are expected ------------------------------------------

    def window_open(self) -> None:
        self.kill_windows.append((time.monotonic(), float("inf")))

    def window_close(self, grace: float = 5.0) -> None:
        start, _ = self.kill_windows[-1]
        self.kill_windows[-1] = (start, time.monotonic() + grace)

    def _in_kill_window(self, at: float) -> bool:
        return any(start <= at <= end for start, end in self.kill_windows)

    # -- calls ------------------------------------------------------------------------------------------

    def _failed(self, op: str, exc: grpc.aio.AioRpcError) -> None:
        code = exc.code()
        self.tally.failed[f"{op}:{code.name}"] += 1
        if code in BROKEN:
            self.tally.broken[f"{op}:{code.name}"] += 1
            self.tally.finding(f"{op} answered {code.name}: {exc.details()}")

    async def _retrying(self, op: str, attempt, accept=()):
        """`attempt()` until it succeeds; transient failures are retried with back-off for RETRY_FOR seconds. A
        status in `accept` is returned as the exception instead of raised (e.g. NOT_FOUND of a retried delete)."""
        delay, deadline, attempts = 0.1, time.monotonic() + RETRY_FOR, 0
        while True:
            attempts += 1
            try:
                result = await attempt()
                self.tally.operations[op] += 1
                return result
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code in accept:
                    self.tally.operations[op] += 1
                    return exc
                if code in TRANSIENT and time.monotonic() < deadline:
                    self.tally.transient[f"{op}:{code.name}"] += 1
                    if not self._in_kill_window(time.monotonic()):
                        self.tally.transient_outside_kills[f"{op}:{code.name}"] += 1
                    await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                    delay = min(delay * 2, 2.0)
                    continue
                self._failed(op, exc)
                raise GiveUp(op) from exc

    async def create(self, stub, sandbox_id: str) -> Owned | None:
        name = f"sandboxes/{sandbox_id}"
        request = api.CreateSandboxRequest(
            sandbox=sandbox_pb2.Sandbox(
                labels={"load": self.run_id}, timeout=duration_pb2.Duration(seconds=self.lifetime)
            ),
            sandbox_id=sandbox_id,
        )
        answer = await self._retrying(
            "create",
            lambda: stub.CreateSandbox(request, metadata=self.metadata, timeout=CALL_TIMEOUT),
            accept=(grpc.StatusCode.ALREADY_EXISTS,),
        )
        if isinstance(answer, grpc.aio.AioRpcError):
            # An earlier attempt got through: the sandbox is ours once it reads RUNNING.
            sandbox = await self.settled(stub, name)
            if sandbox is None or sandbox.state != sandbox_pb2.SANDBOX_STATE_RUNNING:
                self.tally.creates_not_acknowledged += 1
                self.tally.finding(
                    f"create of {name} retried through a failure left it "
                    f"{sandbox_pb2.SandboxState.Name(sandbox.state) if sandbox else 'absent'}"
                )
                if sandbox is not None:
                    await self.delete(stub, name, acknowledged=False)
                return None
        owned = Owned(name)
        self.owned[name] = owned
        return owned

    async def settled(self, stub, name: str, timeout: float = 30.0) -> sandbox_pb2.Sandbox | None:
        """The sandbox once it is no longer CREATING/UNAVAILABLE/MIGRATING (None: it does not exist)."""
        deadline = time.monotonic() + timeout
        while True:
            answer = await self._retrying(
                "get",
                lambda: stub.GetSandbox(api.GetSandboxRequest(name=name), metadata=self.metadata, timeout=CALL_TIMEOUT),
                accept=(grpc.StatusCode.NOT_FOUND,),
            )
            if isinstance(answer, grpc.aio.AioRpcError):
                return None
            state = answer.sandbox.state
            settling = (
                sandbox_pb2.SANDBOX_STATE_CREATING,
                sandbox_pb2.SANDBOX_STATE_UNAVAILABLE,
                sandbox_pb2.SANDBOX_STATE_MIGRATING,
            )
            if state not in settling or time.monotonic() > deadline:
                return answer.sandbox
            await asyncio.sleep(0.5)

    async def delete(self, stub, name: str, acknowledged: bool = True) -> None:
        first = True

        async def attempt():
            nonlocal first
            try:
                return await stub.DeleteSandbox(
                    api.DeleteSandboxRequest(name=name), metadata=self.metadata, timeout=CALL_TIMEOUT
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND and first and acknowledged:
                    self.tally.sandboxes_lost += 1
                    self.tally.finding(f"{name} was acknowledged and never deleted, but its delete found nothing")
                raise
            finally:
                first = False

        await self._retrying("delete", attempt, accept=(grpc.StatusCode.NOT_FOUND,))
        self.owned.pop(name, None)

    async def exec(self, stub, name: str, argv: list[str], expect: bytes) -> None:
        """Runs argv; its stream must end with `exited` (or a status), its output must be `expect`."""

        async def attempt():
            call = stub.Exec(
                api.ExecRequest(sandbox=name, process=api.ProcessConfig(argv=argv)),
                metadata=self.metadata,
                timeout=CALL_TIMEOUT,
            )
            stdout, exited = bytearray(), None
            try:
                async for event in call:
                    kind = event.WhichOneof("event")
                    if kind == "stdout":
                        stdout += event.stdout
                    elif kind == "exited":
                        exited = event.exited
            except grpc.aio.AioRpcError as exc:
                if exc.code() in BROKEN:
                    self.tally.streams_without_status += 1
                raise
            if exited is None:
                self.tally.streams_without_status += 1
                self.tally.finding(f"exec {argv[:3]} in {name}: stream ended OK without an exited event")
                return None
            if exited.WhichOneof("status") != "exit_code" or exited.exit_code != 0 or bytes(stdout) != expect:
                self.tally.outputs_wrong += 1
                self.tally.finding(
                    f"exec {argv[:3]} in {name}: {str(exited).strip()} with {len(stdout)} bytes of stdout"
                )
            return exited

        await self._retrying("exec", attempt)

    async def write(self, stub, owned: Owned, path: str, data: bytes) -> None:
        def requests():
            yield api.WriteFileRequest(header=api.WriteFileHeader(sandbox=owned.name, path=path))
            for offset in range(0, len(data), 256 << 10):
                yield api.WriteFileRequest(data=data[offset : offset + (256 << 10)])

        # A write retried after a failure rewrites the whole file: what was acknowledged last is what must read back.
        owned.files.pop(path, None)
        await self._retrying("write", lambda: stub.WriteFile(requests(), metadata=self.metadata, timeout=CALL_TIMEOUT))
        owned.files[path] = _digest(data)

    async def read(self, stub, owned: Owned, path: str) -> bool:
        """Whether `path` reads back as acknowledged (a difference counts as a lost record)."""

        async def attempt():
            chunks = []
            try:
                async for reply in stub.ReadFile(
                    api.ReadFileRequest(sandbox=owned.name, path=path), metadata=self.metadata, timeout=CALL_TIMEOUT
                ):
                    chunks.append(reply.data)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in BROKEN:
                    self.tally.streams_without_status += 1
                raise
            return b"".join(chunks)

        try:
            data = await self._retrying("read", attempt)
        except GiveUp as failure:
            cause = failure.__cause__
            if isinstance(cause, grpc.aio.AioRpcError) and cause.code() == grpc.StatusCode.NOT_FOUND:
                data = None
            else:
                raise
        if data is None or _digest(data) != owned.files.get(path):
            self.tally.records_lost += 1
            self.tally.finding(
                f"{owned.name}:{path} reads back {'nothing' if data is None else f'{len(data)} other bytes'}"
            )
            return False
        return True

    async def snapshot(self, stub, owned: Owned) -> str:
        reply = await self._retrying(
            "snapshot",
            lambda: stub.CreateSnapshot(
                api.CreateSnapshotRequest(sandbox=owned.name, labels={"load": self.run_id}),
                metadata=self.metadata,
                timeout=CALL_TIMEOUT,
            ),
        )
        self.snapshots.add(reply.snapshot.name)
        return reply.snapshot.name

    async def delete_snapshot(self, stub, name: str) -> None:
        await self._retrying(
            "delete_snapshot",
            lambda: stub.DeleteSnapshot(
                api.DeleteSnapshotRequest(name=name), metadata=self.metadata, timeout=CALL_TIMEOUT
            ),
            accept=(grpc.StatusCode.NOT_FOUND,),
        )
        self.snapshots.discard(name)

    # -- the clients ------------------------------------------------------------------------------------

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(
            self.stack.gateway_address,
            options=[("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)],
        )

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._client(index, stop) for index in range(self.workers)))

    async def _client(self, index: int, stop: asyncio.Event) -> None:
        rng = random.Random(f"{self.run_id}-{index}")
        async with self.channel() as channel:
            stub = sandbox_service_pb2_grpc.SandboxServiceStub(channel)
            mine: list[Owned] = []
            snapshot: str | None = None
            cycle = 0
            while not stop.is_set():
                cycle += 1
                try:
                    snapshot = await self._cycle(stub, rng, index, cycle, mine, snapshot)
                except GiveUp:
                    await asyncio.sleep(0.5)  # counted; the next cycle starts afresh
                mine[:] = [owned for owned in mine if owned.name in self.owned]
                self.cycles += 1

    async def _cycle(self, stub, rng, index, cycle, mine, snapshot):
        owned = await self.create(stub, f"l{self.run_id}-{index}-{cycle}")
        if owned is None:
            return snapshot
        mine.append(owned)
        token = secrets.token_hex(4)
        await self.exec(stub, owned.name, ["echo", token], f"{token}\n".encode())
        await self.exec(stub, owned.name, ["seq", "1", "20000"], "".join(f"{i}\n" for i in range(1, 20001)).encode())
        await self.exec(stub, owned.name, ["sh", "-c", "echo a; sleep 1; echo b"], b"a\nb\n")
        data = os.urandom(rng.randrange(1 << 10, 512 << 10))
        await self.write(stub, owned, "/root/load.bin", data)
        await self.read(stub, owned, "/root/load.bin")
        older = [o for o in mine if o is not owned and o.files]
        if older:
            other = rng.choice(older)
            await self.read(stub, other, rng.choice(list(other.files)))
        if cycle % 3 == 0:
            taken = await self.snapshot(stub, owned)
            if snapshot:
                await self.delete_snapshot(stub, snapshot)
            snapshot = taken
        while len(mine) > self.keep:
            await self.delete(stub, mine.pop(0).name)
        return snapshot

    # -- the end ----------------------------------------------------------------------------------------

    async def verify(self) -> None:
        """Everything acknowledged and not deleted is still there: sandboxes RUNNING (API and etcd), their files
        with the acknowledged content, snapshots READY (API and etcd)."""
        sandbox_keys, snapshot_keys = await self._etcd_names()
        async with self.channel() as channel:
            stub = sandbox_service_pb2_grpc.SandboxServiceStub(channel)
            for owned in list(self.owned.values()):
                sandbox = await self.settled(stub, owned.name)
                if sandbox is None or sandbox.state != sandbox_pb2.SANDBOX_STATE_RUNNING:
                    state = sandbox_pb2.SandboxState.Name(sandbox.state) if sandbox else "NOT_FOUND"
                    self.tally.sandboxes_lost += 1
                    self.tally.finding(f"{owned.name} was acknowledged and not deleted, reads {state}")
                    continue
                if owned.name.split("/")[1] not in sandbox_keys:
                    self.tally.records_lost += 1
                    self.tally.finding(f"{owned.name} reads RUNNING but has no record in etcd")
                for path in owned.files:
                    await self.read(stub, owned, path)
                token = secrets.token_hex(4)
                await self.exec(stub, owned.name, ["echo", token], f"{token}\n".encode())
            for name in sorted(self.snapshots):
                answer = await self._retrying(
                    "get_snapshot",
                    lambda name=name: stub.GetSnapshot(
                        api.GetSnapshotRequest(name=name), metadata=self.metadata, timeout=CALL_TIMEOUT
                    ),
                    accept=(grpc.StatusCode.NOT_FOUND,),
                )
                ready = not isinstance(answer, grpc.aio.AioRpcError) and (
                    answer.snapshot.state == sandbox_pb2.SNAPSHOT_STATE_READY
                )
                if not ready or name.split("/")[1] not in snapshot_keys:
                    self.tally.records_lost += 1
                    self.tally.finding(
                        f"{name} was acknowledged and not deleted: ready={ready} in etcd="
                        f"{name.split('/')[1] in snapshot_keys}"
                    )

    async def _etcd_names(self) -> tuple[set[str], set[str]]:
        """The names of the sandboxes recorded in etcd (as their tenant knows them: a record's `name`, or its id for
        records without one) and the ids of the snapshots."""
        client = self.stack.etcd_client()
        await client.connect()
        try:
            sandboxes = await Records(client).list(SANDBOXES)
            snapshots = await client.get_prefix(SNAPSHOTS.scope(), keys_only=True)
        finally:
            await client.close()
        return (
            {stored.message.name or stored.message.id for stored in sandboxes},
            {kv.key.decode().rsplit("/", 1)[1] for kv in snapshots},
        )

    async def cleanup(self) -> None:
        """Deletes every sandbox and snapshot of this load (also ones a retried call made that it never saw)."""
        async with self.channel() as channel:
            stub = sandbox_service_pb2_grpc.SandboxServiceStub(channel)
            listed = await self._retrying(
                "list",
                lambda: stub.ListSandboxes(
                    api.ListSandboxesRequest(filter=f"labels.load={self.run_id}", page_size=1000),
                    metadata=self.metadata,
                    timeout=CALL_TIMEOUT,
                ),
            )
            for name in {*self.owned, *(s.name for s in listed.sandboxes)}:
                await self.delete(stub, name, acknowledged=name in self.owned)
            snapshots = await self._retrying(
                "list_snapshots",
                lambda: stub.ListSnapshots(
                    api.ListSnapshotsRequest(page_size=1000), metadata=self.metadata, timeout=CALL_TIMEOUT
                ),
            )
            for name in {
                *self.snapshots,
                *(s.name for s in snapshots.snapshots if s.labels.get("load") == self.run_id),
            }:
                await self.delete_snapshot(stub, name)
