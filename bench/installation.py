"""The running installation (`make up`) as the template benches see it (bench/code.py, bench/desktop.py): raw gRPC
through its gateway with the admin key, sandboxes of one template, and why a bench cannot run when it cannot."""

from __future__ import annotations

import os
import time

import grpc

from microvm.sandbox.v1 import sandbox_service_pb2 as api
from microvm.sandbox.v1 import sandbox_service_pb2_grpc
from microvm_sandbox.client import default_api_key
from microvm_sandbox.errors import SandboxError

GATEWAY = os.environ.get("MVM_GATEWAY", "127.0.0.1:50051")


class Installation:
    def __init__(self, template: str) -> None:
        self.template = template
        self.channel = grpc.insecure_channel(GATEWAY)
        self.metadata = (("authorization", f"Bearer {default_api_key()}"),)
        self.sandboxes = sandbox_service_pb2_grpc.SandboxServiceStub(self.channel)

    def create(self) -> str:
        request = api.CreateSandboxRequest(sandbox=dict(template=self.template))
        return self.sandboxes.CreateSandbox(request, metadata=self.metadata, timeout=600).sandbox.name

    def delete(self, name: str) -> None:
        self.sandboxes.DeleteSandbox(api.DeleteSandboxRequest(name=name), metadata=self.metadata, timeout=120)

    def exec(self, name: str, argv: list[str]) -> tuple[float, float]:
        """Seconds until the first output byte, and until `exited`."""
        started, first = time.perf_counter(), None
        request = api.ExecRequest(sandbox=name, process=api.ProcessConfig(argv=argv))
        for event in self.sandboxes.Exec(request, metadata=self.metadata, timeout=300):
            if event.stdout and first is None:
                first = time.perf_counter() - started
        return first or 0.0, time.perf_counter() - started


def unavailable(template: str) -> str:
    """Why a bench of `template` cannot run here ("" when it can): no running installation, or no build of it."""
    try:
        installation = Installation(template)
        reply = installation.sandboxes.ListTemplates(
            api.ListTemplatesRequest(), metadata=installation.metadata, timeout=10
        )
    except (grpc.RpcError, OSError, SandboxError) as error:
        said = error.details() if isinstance(error, grpc.RpcError) else str(error)
        return f"no running installation at {GATEWAY} (`make up`): {said}"
    if not any(t.name.split("/")[-1] == template for t in reply.templates):
        return f"the {template} template is not built on the installation: run `make templates`"
    return ""
