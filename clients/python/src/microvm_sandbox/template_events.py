"""The events of a template build as the SDK hands them out: `AsyncBuildStream` (the call's events, for `async
for`), `BuildProgress` (what they said so far, and the build's outcome), and the request side of BuildTemplate
(the spec, then the context's tar chunks, stopping at once when the server refuses the call)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from microvm.sandbox.v1 import template_pb2, template_service_pb2
from microvm.sandbox.v1 import template_service_pb2 as api
from microvm_sandbox.errors import TemplateBuildFailed, UnavailableError, from_rpc_error
from microvm_sandbox.template import Context
from microvm_sandbox.template_context import context_chunks
from microvm_sandbox.transfer import REFUSED_KEY

BuildEvent = template_pb2.TemplateBuild | template_pb2.TemplateBuildStep | template_service_pb2.BuildLog
TAIL_BYTES = 64 << 10  # output kept of each step, for the error of a failed one
ENDED = (template_pb2.TEMPLATE_BUILD_STATE_SUCCEEDED, template_pb2.TEMPLATE_BUILD_STATE_FAILED)


def build_event(message: Any) -> BuildEvent | None:
    """The event a BuildTemplateResponse or WatchTemplateBuildResponse carries (None: one this SDK does not know)."""
    kind = message.WhichOneof("event")
    return getattr(message, kind) if kind in ("build", "step", "log") else None  # keepalives carry nothing


class BuildProgress:
    """What a build's events said so far: the build (`build`), its steps by index (`steps`), each step's newest
    output (`tail(index)`, up to 64 KiB). `result()` is the build once it ended well, else raises."""

    def __init__(self) -> None:
        self.build: template_pb2.TemplateBuild | None = None
        self.steps: dict[int, template_pb2.TemplateBuildStep] = {}
        self._tails: dict[int, bytearray] = {}

    def add(self, event: BuildEvent) -> None:
        if isinstance(event, template_pb2.TemplateBuild):
            self.build = event
            for step in event.steps:
                self.steps[step.index] = step
        elif isinstance(event, template_pb2.TemplateBuildStep):
            self.steps[event.index] = event
        elif isinstance(event, template_service_pb2.BuildLog):
            tail = self._tails.setdefault(event.step, bytearray())
            tail += event.data
            del tail[:-TAIL_BYTES]

    def tail(self, step: int) -> bytes:
        """The newest output of step `step` the events carried (up to 64 KiB)."""
        return bytes(self._tails.get(step, b""))

    @property
    def ended(self) -> bool:
        return self.build is not None and self.build.state in ENDED

    def failed_step(self) -> template_pb2.TemplateBuildStep | None:
        """The step that failed, if one did."""
        failed = [s for s in self.steps.values() if s.state == template_pb2.TEMPLATE_STEP_STATE_FAILED]
        return min(failed, key=lambda step: step.index) if failed else None

    def result(self) -> template_pb2.TemplateBuild:
        """The build when it SUCCEEDED; TemplateBuildFailed (with the failed step and its output) when it FAILED;
        UnavailableError when the events stopped before it ended (it goes on: `templates.watch(name)`)."""
        if self.build is None or not self.ended:
            name = self.build.name if self.build is not None else ""
            raise UnavailableError(
                f"the build's events stopped before it ended{f': follow {name} with watch()' if name else ''}",
                code="UNAVAILABLE",
                reason="BUILD_STREAM_ENDED",
                metadata={"build": name} if name else {},
            )
        if self.build.state == template_pb2.TEMPLATE_BUILD_STATE_FAILED:
            step = self.failed_step()
            raise TemplateBuildFailed(self.build, step, self.tail(step.index) if step is not None else b"")
        return self.build


class AsyncBuildStream:
    """The events of one build (`TemplateBuild`, `TemplateBuildStep`, `BuildLog`), for `async for`; `build` is
    the newest build record seen. Stopping early (break, `aclose()`, leaving `async with`) cancels the call; the
    build itself goes on on the server (`templates.watch(name)` follows it again)."""

    def __init__(self, start: Callable[[], Any], sent: BuildSender | None = None) -> None:
        self._start, self._sent = start, sent
        self._call: Any = None
        self._responses: Any = None
        self._finished = False
        self.build: template_pb2.TemplateBuild | None = None

    def __aiter__(self) -> AsyncBuildStream:
        return self

    async def __anext__(self) -> BuildEvent:
        if self._finished:
            raise StopAsyncIteration
        if self._call is None:
            self._call = self._start()
            self._responses = self._call.__aiter__()
            if self._sent is not None:
                self._sent.watch(self._call)
        try:
            while True:
                event = build_event(await self._responses.__anext__())
                if event is not None:
                    if isinstance(event, template_pb2.TemplateBuild):
                        self.build = event
                    return event
        except StopAsyncIteration:
            self._end()
            raise
        except asyncio.CancelledError:
            self._end()
            task = asyncio.current_task()
            if self._sent is None or self._sent.error is None or (task is not None and task.cancelling()):
                raise
            raise self._sent.error from None  # grpc cancels a call whose requests fail: say why
        except grpc.aio.AioRpcError as error:
            self._end()
            if self._sent is not None and self._sent.error is not None:
                raise self._sent.error from None
            raise from_rpc_error(error) from None

    def _end(self) -> None:
        self._finished = True
        if self._sent is not None:
            self._sent.stop()

    def cancel(self) -> None:
        """Stops following (the build goes on). Safe to call twice."""
        self._end()
        if self._call is not None and not self._call.done():
            self._call.cancel()

    async def aclose(self) -> None:
        """Same as `cancel()`."""
        self.cancel()

    async def __aenter__(self) -> AsyncBuildStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class BuildSender:
    """The request side of BuildTemplate: the spec, then the context's chunks until they end, the call ends, or
    the server says it refused the call (initial metadata `mvm-refused`): then it half-closes at once."""

    def __init__(self, spec: api.BuildTemplateSpec, context: Context | None) -> None:
        self.spec, self.context = spec, context
        self.stopped = asyncio.Event()
        self.error: BaseException | None = None
        self._watcher: asyncio.Future[None] | None = None

    async def requests(self) -> AsyncIterator[api.BuildTemplateRequest]:
        yield api.BuildTemplateRequest(spec=self.spec)
        if self.context is None:
            return
        try:
            async with contextlib.aclosing(context_chunks(self.context)) as chunks:
                async for chunk in chunks:
                    if self.stopped.is_set():
                        return
                    yield api.BuildTemplateRequest(context=chunk)
        except Exception as error:  # grpc only cancels the call: keep the cause for the caller
            self.error = error
            raise

    def watch(self, call: Any) -> None:
        async def refused() -> None:
            with contextlib.suppress(Exception):
                if any(key == REFUSED_KEY for key, _ in (await call.initial_metadata() or ())):
                    self.stopped.set()

        self._watcher = asyncio.ensure_future(refused())

    def stop(self) -> None:
        self.stopped.set()
        if self._watcher is not None:
            self._watcher.cancel()
