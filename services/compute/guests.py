"""GuestLink: compute's way to its guests, through the node's relay (which owns every agent channel)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import structlog

from microvm.relay.v1 import relay_pb2, relay_pb2_grpc
from services.common import deadlines
from services.common.errors import DeadlineExceeded, FailedPrecondition, ServiceError, Unavailable

log = structlog.get_logger()


def unavailable(error: BaseException) -> bool:
    return isinstance(error, Unavailable) or (
        isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.UNAVAILABLE
    )


class GuestLink:
    def __init__(self, context, node: str) -> None:
        self.context = context
        self.node = node

    async def _call(self, method: str, request, timeout: float, idempotent: bool = True):
        # The relay restarting is back within a second or two; a call it never saw is always safe to repeat.
        return await self.context.call_newest(
            "relay",
            self.node,
            relay_pb2_grpc.GuestControlServiceStub,
            method,
            request,
            timeout=timeout,
            retry_for=deadlines.RESTART_WAIT,
            **({"retryable": unavailable} if idempotent else {}),
        )

    async def facts(self, vm_id: str, timeout: float) -> relay_pb2.WaitForAgentResponse:
        """What the running guest's agent says of itself (uptime, memory): one ping."""
        request = relay_pb2.WaitForAgentRequest(vm_id=vm_id, timeout_ms=max(1, int(timeout * 1000)))
        return await self._call("WaitForAgent", request, timeout=timeout + deadlines.QUICK)

    async def wait_for_agent(
        self, vm_id: str, timeout: float, alive: Callable[[], bool], describe: Callable[[], str]
    ) -> None:
        """Returns once the VM's agent answers. FAILED_PRECONDITION when the VMM dies first (with the end of its
        console), DEADLINE_EXCEEDED after `timeout`."""
        call = asyncio.ensure_future(
            self._call(
                "WaitForAgent",
                relay_pb2.WaitForAgentRequest(vm_id=vm_id, timeout_ms=int(timeout * 1000)),
                timeout=timeout + deadlines.QUICK,
                idempotent=False,
            )
        )
        try:
            while not call.done():
                await asyncio.wait([call], timeout=0.25)
                if not call.done() and not alive():
                    raise FailedPrecondition(f"VM {vm_id} died while booting: {describe()}", reason="VM_BOOT_FAILED")
            try:
                call.result()
            except (Unavailable, grpc.aio.AioRpcError) as exc:
                if not alive():
                    raise FailedPrecondition(
                        f"VM {vm_id} died while booting: {describe()}", reason="VM_BOOT_FAILED"
                    ) from None
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise
                raise DeadlineExceeded(
                    f"the agent of VM {vm_id} did not answer within {timeout:.0f}s: {describe()}",
                    reason="VM_BOOT_TIMEOUT",
                ) from None
        finally:
            call.cancel()

    async def configure_network(self, vm_id: str) -> None:
        await self._call("ConfigureNetwork", relay_pb2.ConfigureNetworkRequest(vm_id=vm_id), deadlines.GUEST)

    async def set_identity(self, vm_id: str, hostname: str, confirm_later: bool = False) -> None:
        request = relay_pb2.SetGuestIdentityRequest(vm_id=vm_id, hostname=hostname, confirm_later=confirm_later)
        await self._call("SetGuestIdentity", request, deadlines.GUEST)

    async def sync_clock(self, vm_id: str) -> relay_pb2.SyncGuestClockResponse:
        return await self._call("SyncGuestClock", relay_pb2.SyncGuestClockRequest(vm_id=vm_id), deadlines.GUEST)

    async def run(self, vm_id: str, argv: list[str], timeout: float) -> int:
        reply = await self._call(
            "RunCommand",
            relay_pb2.RunCommandRequest(vm_id=vm_id, argv=argv, timeout_ms=int(timeout * 1000)),
            timeout + deadlines.QUICK,
            idempotent=False,
        )
        return reply.exit_code

    async def close(self, vm_id: str) -> None:
        """Best effort: the relay also closes a channel when the VM's record goes."""
        try:
            await self._call("CloseChannel", relay_pb2.CloseChannelRequest(vm_id=vm_id), deadlines.QUICK)
        except (grpc.aio.AioRpcError, ServiceError) as exc:
            log.info("relay_close_channel_failed", vm=vm_id, error=str(exc))
