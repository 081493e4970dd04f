"""Helpers for tests that talk to real guests through the gateway."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from google.protobuf import duration_pb2

from microvm.sandbox.v1 import sandbox_pb2, sandbox_service_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from mvm_cli.main import connect

CHUNK = 1 << 20


@dataclass
class ExecResult:
    stdout: bytes
    stderr: bytes
    exited: api.ProcessExited
    events: list[str]

    @property
    def exit_code(self) -> int:
        return self.exited.exit_code


class Gateway:
    def __init__(self, address: str, api_key: str) -> None:
        self.api_key = api_key
        self.channel = connect(address, api_key)
        self.stub = sandbox_service_pb2_grpc.SandboxServiceStub(self.channel)

    def create(self, timeout_seconds: int = 0, **fields) -> sandbox_pb2.Sandbox:
        sandbox = sandbox_pb2.Sandbox(**fields)
        if timeout_seconds:
            sandbox.timeout.CopyFrom(duration_pb2.Duration(seconds=timeout_seconds))
        return self.stub.CreateSandbox(api.CreateSandboxRequest(sandbox=sandbox), timeout=180).sandbox

    def delete(self, name: str) -> None:
        self.stub.DeleteSandbox(api.DeleteSandboxRequest(name=name), timeout=60)

    def exec(
        self,
        name: str,
        argv: list[str],
        stdin: bytes = b"",
        timeout: float = 120,
        process_timeout: float = 0,
        **process,
    ) -> ExecResult:
        """Runs argv to completion; `timeout` is the call's deadline, `process_timeout` the guest-side one."""
        if process_timeout:
            process["timeout"] = duration_pb2.Duration(seconds=int(process_timeout))
        stdout, stderr, events = bytearray(), bytearray(), []
        for event in self.stub.Exec(
            api.ExecRequest(sandbox=name, process=api.ProcessConfig(argv=argv, **process), stdin=stdin), timeout=timeout
        ):
            kind = event.WhichOneof("event")
            events.append(kind)
            if kind == "stdout":
                stdout += event.stdout
            elif kind == "stderr":
                stderr += event.stderr
            elif kind == "exited":
                return ExecResult(bytes(stdout), bytes(stderr), event.exited, events)
        raise AssertionError("exec stream ended without an exited event")

    def write_file(self, name: str, path: str, data: bytes, **header) -> api.WriteFileResponse:
        def requests():
            yield api.WriteFileRequest(header=api.WriteFileHeader(sandbox=name, path=path, **header))
            for offset in range(0, len(data), CHUNK):
                yield api.WriteFileRequest(data=data[offset : offset + CHUNK])

        return self.stub.WriteFile(requests(), timeout=300)

    def read_file(self, name: str, path: str) -> bytes:
        return b"".join(r.data for r in self.stub.ReadFile(api.ReadFileRequest(sandbox=name, path=path), timeout=300))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
