"""A fake TemplateService (plus SandboxService.ListTemplates) on a real grpc.aio server, for the client tests (SDK,
`mvm template`, MCP): it records what a build received (the spec, the size of every context message, the context
as a tar archive) and answers with scripted events (steps running, cached, failing, their output).

It is the gateway's contract as protos/microvm/sandbox/v1/template_service.proto states it, nothing more: the
builder's behaviour is not imitated. Point the same client code at a real gateway for end-to-end tests.
"""

from __future__ import annotations

import asyncio
import io
import tarfile
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from microvm.sandbox.v1 import sandbox_pb2, sandbox_service_pb2_grpc, template_pb2, template_service_pb2_grpc
from microvm.sandbox.v1 import sandbox_service_pb2 as sandbox_api
from microvm.sandbox.v1 import template_service_pb2 as api

STEP = template_pb2.TemplateStepState
BUILD = template_pb2.TemplateBuildState


@dataclass
class ScriptedStep:
    """One step of a scripted build: its text, its output (chunks), and how it ends."""

    text: str
    output: list[bytes] = field(default_factory=list)
    cached: bool = False
    exit_code: int = 0  # non-zero: the step fails, and the build with it


@dataclass
class Script:
    """What the next builds do. `refuse`: (code, reason, message) to refuse the call after the spec, while the
    client may still be sending its context (as the gateway's error interceptor does: `mvm-refused`)."""

    steps: list[ScriptedStep] = field(default_factory=lambda: [ScriptedStep("FROM default")])
    failure_reason: str = "BUILD_STEP_FAILED"
    failure_message: str = "the step exited with a non-zero status"
    refuse: tuple[grpc.StatusCode, str, str] | None = None
    step_delay: float = 0.0


@dataclass
class Received:
    """What one BuildTemplate call got: the spec, the size of each context message, the context's bytes."""

    spec: api.BuildTemplateSpec
    chunk_sizes: list[int]
    context: bytes

    def members(self) -> dict[str, tarfile.TarInfo]:
        """The context's tar members by name."""
        if not self.context:
            return {}
        with tarfile.open(fileobj=io.BytesIO(self.context), mode="r:") as tar:
            return {member.name: member for member in tar.getmembers()}

    def file(self, name: str) -> bytes:
        with tarfile.open(fileobj=io.BytesIO(self.context), mode="r:") as tar:
            extracted = tar.extractfile(name)
            assert extracted is not None, name
            return extracted.read()


def status(code: grpc.StatusCode, message: str, reason: str = "", metadata: dict[str, str] | None = None):
    """A grpc.Status with an ErrorInfo, as the gateway sends them."""
    details = []
    if reason:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="microvm.dev", metadata=metadata or {}))
        details.append(info)
    return rpc_status.to_status(status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details))


def now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


class FakeTemplateService(template_service_pb2_grpc.TemplateServiceServicer):
    def __init__(self) -> None:
        self.script = Script()
        self.received: list[Received] = []
        self.templates: dict[str, template_pb2.Template] = {
            "templates/default": template_pb2.Template(name="templates/default", builtin=True, warm=True)
        }
        self.builds: dict[str, list[template_pb2.TemplateBuild]] = {}  # template -> builds, newest first
        self.events: dict[str, list[api.BuildTemplateResponse]] = {}  # build -> its events, in order
        self.logs: dict[str, bytes] = {}
        self.in_use: set[str] = set()
        self.deleted: list[tuple[str, bool]] = []
        self.drained = 0  # context bytes read after refusing a build

    # --- building ---
    async def BuildTemplate(self, request_iterator, context):
        first = await anext(aiter(request_iterator))
        spec = first.spec
        if self.script.refuse is not None:
            code, reason, message = self.script.refuse
            await context.send_initial_metadata((("mvm-refused", "1"),))
            async for request in request_iterator:  # read what the client still sends, until it half-closes
                self.drained += len(request.context)
            await context.abort_with_status(status(code, message, reason))
        sizes, data = [], bytearray()
        async for message in request_iterator:
            sizes.append(len(message.context))
            data += message.context
        self.received.append(Received(spec, sizes, bytes(data)))
        template = self.templates.setdefault(spec.template, template_pb2.Template(name=spec.template))
        number = sum(len(builds) for builds in self.builds.values()) + 1
        build = template_pb2.TemplateBuild(
            name=f"{spec.template}/builds/b{number}",
            state=BUILD.TEMPLATE_BUILD_STATE_QUEUED,
            tags=list(spec.tags) or ["latest"],
            source="dockerfile" if spec.dockerfile else "recipe",
            definition=spec.dockerfile or spec.recipe,
            create_time=now(),
            steps=[
                template_pb2.TemplateBuildStep(index=i, text=s.text, state=STEP.TEMPLATE_STEP_STATE_PENDING)
                for i, s in enumerate(self.script.steps)
            ],
        )
        self.builds.setdefault(spec.template, []).insert(0, build)
        events = self.events.setdefault(build.name, [])
        log = bytearray()
        for event in self._run(build, log):
            events.append(event)
            yield event
            if self.script.step_delay:
                await asyncio.sleep(self.script.step_delay)
        self.logs[build.name] = bytes(log[-(64 << 10) :])
        if build.state == BUILD.TEMPLATE_BUILD_STATE_SUCCEEDED:
            for tag in build.tags:
                template.tags[tag] = build.name.rsplit("/", 1)[1]

    def _run(self, build: template_pb2.TemplateBuild, log: bytearray):
        yield api.BuildTemplateResponse(build=build)
        build.state = BUILD.TEMPLATE_BUILD_STATE_BUILDING
        failed = False
        for index, scripted in enumerate(self.script.steps):
            step = build.steps[index]
            if scripted.cached:
                step.state = STEP.TEMPLATE_STEP_STATE_CACHED
                yield api.BuildTemplateResponse(step=step)
                continue
            step.state = STEP.TEMPLATE_STEP_STATE_RUNNING
            yield api.BuildTemplateResponse(step=step)
            for chunk in scripted.output:
                log += chunk
                yield api.BuildTemplateResponse(log=api.BuildLog(step=index, data=chunk))
            step.duration_ms = 1500
            if scripted.exit_code:
                step.state, step.exit_code = STEP.TEMPLATE_STEP_STATE_FAILED, scripted.exit_code
                yield api.BuildTemplateResponse(step=step)
                failed = True
                break
            step.state = STEP.TEMPLATE_STEP_STATE_DONE
            yield api.BuildTemplateResponse(step=step)
        build.end_time.CopyFrom(now())
        if failed:
            build.state = BUILD.TEMPLATE_BUILD_STATE_FAILED
            build.failure_reason, build.failure_message = self.script.failure_reason, self.script.failure_message
        else:
            build.state = BUILD.TEMPLATE_BUILD_STATE_SUCCEEDED
        yield api.BuildTemplateResponse(build=build)

    async def WatchTemplateBuild(self, request, context):
        if request.name not in self.events:
            await context.abort_with_status(self._not_found(request.name))
        for event in self.events[request.name]:
            kind = event.WhichOneof("event")
            yield api.WatchTemplateBuildResponse(**{kind: getattr(event, kind)})

    # --- builds ---
    def _build(self, name: str) -> template_pb2.TemplateBuild | None:
        template = name.split("/builds/")[0]
        return next((b for b in self.builds.get(template, []) if b.name == name), None)

    def _not_found(self, name: str):
        return status(
            grpc.StatusCode.NOT_FOUND, f"{name} does not exist", "TEMPLATE_NOT_FOUND", {"template": name.split("/")[1]}
        )

    async def GetTemplateBuild(self, request, context):
        build = self._build(request.name)
        if build is None:
            await context.abort_with_status(self._not_found(request.name))
        return api.GetTemplateBuildResponse(build=build)

    async def ListTemplateBuilds(self, request, context):
        if request.parent not in self.templates:
            await context.abort_with_status(self._not_found(request.parent))
        builds = self.builds.get(request.parent, [])
        start = int(request.page_token or 0)
        size = request.page_size or 50
        page = builds[start : start + size]
        token = str(start + size) if start + size < len(builds) else ""
        return api.ListTemplateBuildsResponse(builds=page, next_page_token=token)

    async def GetTemplateBuildLog(self, request, context):
        if self._build(request.name) is None:
            await context.abort_with_status(self._not_found(request.name))
        return api.GetTemplateBuildLogResponse(data=self.logs.get(request.name, b""))

    # --- templates ---
    async def GetTemplate(self, request, context):
        if request.name not in self.templates:
            await context.abort_with_status(self._not_found(request.name))
        return api.GetTemplateResponse(template=self.templates[request.name])

    async def CreateTemplate(self, request, context):
        if request.template.name in self.templates:
            await context.abort_with_status(status(grpc.StatusCode.ALREADY_EXISTS, "exists", "TEMPLATE_EXISTS"))
        self.templates[request.template.name] = request.template
        return api.CreateTemplateResponse(template=request.template)

    async def UpdateTemplate(self, request, context):
        found = self.templates[request.template.name]
        for path in request.update_mask.paths:
            setattr(found, path, getattr(request.template, path))
        return api.UpdateTemplateResponse(template=found)

    async def DeleteTemplate(self, request, context):
        if request.name not in self.templates:
            await context.abort_with_status(self._not_found(request.name))
        if request.name in self.in_use and not request.force:
            await context.abort_with_status(
                status(grpc.StatusCode.FAILED_PRECONDITION, "sandboxes use it", "TEMPLATE_IN_USE")
            )
        self.deleted.append((request.name, request.force))
        del self.templates[request.name]
        self.builds.pop(request.name, None)
        return api.DeleteTemplateResponse()


class FakeSandboxService(sandbox_service_pb2_grpc.SandboxServiceServicer):
    """ListTemplates (the fake's templates) and CreateSandbox (records the request; the sandbox names the build its
    `template[:tag]` names in the fake, RUNNING at once)."""

    def __init__(self, templates: FakeTemplateService) -> None:
        self.templates = templates
        self.created: list[sandbox_api.CreateSandboxRequest] = []

    async def ListTemplates(self, request, context):
        return sandbox_api.ListTemplatesResponse(templates=list(self.templates.templates.values()))

    async def CreateSandbox(self, request, context):
        self.created.append(request)
        name, _, tag = request.sandbox.template.partition(":")
        template = self.templates.templates.get(f"templates/{name}")
        if template is None or (not template.builtin and (tag or "latest") not in template.tags):
            await context.abort_with_status(
                status(grpc.StatusCode.NOT_FOUND, f"template {request.sandbox.template!r}", "TEMPLATE_NOT_FOUND")
            )
        sandbox = sandbox_pb2.Sandbox()
        sandbox.CopyFrom(request.sandbox)
        sandbox.name, sandbox.state = f"sandboxes/sbx-{len(self.created)}", sandbox_pb2.SANDBOX_STATE_RUNNING
        if not template.builtin:
            sandbox.template_build = f"templates/{name}/builds/{template.tags[tag or 'latest']}"
        return sandbox_api.CreateSandboxResponse(sandbox=sandbox)


async def start_fake_gateway() -> tuple[grpc.aio.Server, str, FakeTemplateService]:
    """A grpc.aio server on 127.0.0.1 (a free port) serving the fakes: (server, address, the template service; its
    `sandboxes` is the sandbox service)."""
    service = FakeTemplateService()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 << 20)])
    template_service_pb2_grpc.add_TemplateServiceServicer_to_server(service, server)
    service.sandboxes = FakeSandboxService(service)
    sandbox_service_pb2_grpc.add_SandboxServiceServicer_to_server(service.sandboxes, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}", service
