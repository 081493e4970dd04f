"""What a handler of E2B in-sandbox traffic gets: the request already resolved to one of the caller's sandboxes.

sandbox_traffic.py resolves `E2b-Sandbox-Id`, `E2b-Sandbox-Port` and the credential (`X-Access-Token`, or
`X-API-Key`) of each request, answers E2B's error shapes for what it refuses, and hands the rest to the handler of
the port: envd.py (49983), code_interpreter.py (49999), or the HTTP forward for any other port. A handler calls our
public gRPC API (`microvm.sandbox.v1`) on `channel` with `metadata`, so authentication, the tenant wall, quotas and
audit are the gateway's as for any other call.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class SandboxCall:
    sandbox: str  # our sandbox id, as the E2B SDK knows it (`sandboxID`)
    port: int  # the E2b-Sandbox-Port the request was sent to
    metadata: tuple[tuple[str, str], ...]  # the caller's credential for the gateway's gRPC API
    channel: grpc.aio.Channel  # the gateway's own gRPC server, over loopback
