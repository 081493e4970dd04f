"""The E2B SDK's Template builder (`Template.build`) on the control plane, translated onto our BuildTemplate.

The SDK asks for a build (`POST /v3/templates`: a name, tags, CPUs, memory), uploads each COPY's files as a tar
to the URL `GET /templates/{id}/files/{hash}` gives it, starts the build (`POST /v2/templates/{id}/builds/{build}`:
base, steps, start and ready commands) and polls `GET /templates/{id}/builds/{build}/status` for its logs and end.
Here the uploads are merged into one build context, the steps become a recipe (template_recipe.py), and one
BuildTemplate stream runs the build with the caller's credential; its events become E2B's log entries and status.

A build in progress lives in the memory of the gateway that was asked (the SDK talks to one address), keyed by a
random build id and checked against the caller's tenant on every request (another tenant's is 404). An upload URL
carries a random one-use secret instead of a credential, as E2B's presigned URLs do; uploads are bounded by
`gateway.template_context_max_bytes` and spooled to the gateway's state directory, removed when the build ends.
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
import tarfile
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
from aiohttp import web

from microvm.sandbox.v1 import template_pb2, template_service_pb2, template_service_pb2_grpc
from services.gateway.e2b import shapes, template_recipe
from services.gateway.e2b.shapes import E2bError

log = structlog.get_logger()
CHUNK = 1 << 20
PAGE = 100  # log entries per status answer, as E2B's
KEPT = 200  # builds remembered by a gateway: the oldest finished ones go first


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Build:
    template: str
    build_id: str
    tenant: str
    metadata: tuple
    tags: list[str]
    resources: dict[str, int]
    spool: Path
    uploads: dict[str, Path] = field(default_factory=dict)  # files hash -> its tar
    status: str = "waiting"
    entries: list[dict] = field(default_factory=list)
    reason: str = ""
    task: asyncio.Task | None = None

    def log(self, message: str, level: str = "info") -> None:
        self.entries.append({"timestamp": _now(), "level": level, "message": message})


class TemplateBuilds:
    def __init__(self, plane) -> None:
        self.plane = plane  # ControlPlane: credentials, the loopback channel
        self.builds: dict[str, Build] = {}
        self.upload_urls: dict[str, tuple[str, str]] = {}  # secret -> (build id, files hash)
        self.root = Path(tempfile.gettempdir()) / "mvm-e2b-template-uploads"

    def add(self, app: web.Application) -> None:
        app.router.add_route("POST", "/v3/templates", self.request_build)
        app.router.add_route("GET", "/templates/{template}/files/{hash}", self.upload_link)
        app.router.add_route("PUT", "/e2b-uploads/{secret}", self.upload)
        app.router.add_route("POST", "/v2/templates/{template}/builds/{build}", self.start)
        app.router.add_route("GET", "/templates/{template}/builds/{build}/status", self.status)

    async def _tenant(self, metadata) -> str:
        principal = await self.plane.authenticate(dict(metadata).get("authorization", "")[len("Bearer ") :])
        return principal.tenant if principal is not None else ""

    async def _build(self, request: web.Request, template: str, build_id: str | None = None) -> Build:
        """The caller's build of `template` (its newest when no id is given); 404 for anyone else's."""
        tenant = await self._tenant(self.plane.metadata(request))
        found = [
            b
            for b in self.builds.values()
            if b.template == template and b.tenant == tenant and build_id in (None, b.build_id)
        ]
        if not found:
            raise E2bError(404, f"template build {build_id or template} not found")
        return found[-1]

    async def request_build(self, request: web.Request) -> web.Response:
        metadata = self.plane.metadata(request)
        body = await self.plane.body(request)
        name, _, tag = str(body.get("name") or body.get("alias") or "").partition(":")
        if not name:
            raise E2bError(400, "name is required")
        tags = [t for t in [tag, *(body.get("tags") or [])] if t]
        resources = {}
        for key, ours in (("cpuCount", "vcpus"), ("memoryMB", "memory_mib")):
            if body.get(key) is not None:
                resources[ours] = shapes.seconds(body[key], key)  # a whole number of at least 1
        self._forget_old()
        build_id = str(uuid.uuid4())
        spool = self.root / build_id
        spool.mkdir(parents=True, exist_ok=True)
        build = Build(name, build_id, await self._tenant(metadata), metadata, tags, resources, spool)
        self.builds[build_id] = build
        answer = {"templateID": name, "buildID": build_id, "public": False, "names": [name], "tags": tags}
        return web.json_response({**answer, "aliases": [name]}, status=202)

    def _forget_old(self) -> None:
        finished = [b for b in self.builds.values() if b.task is not None and b.task.done()]
        for build in finished[: max(0, len(self.builds) - KEPT + 1)]:
            del self.builds[build.build_id]

    async def upload_link(self, request: web.Request) -> web.Response:
        build = await self._build(request, request.match_info["template"])
        files = request.match_info["hash"]
        if files in build.uploads:
            return web.json_response({"present": True}, status=201)
        secret = secrets.token_urlsafe(32)
        self.upload_urls[secret] = (build.build_id, files)
        scheme = request.headers.get("X-Forwarded-Proto", request.scheme)
        return web.json_response(
            {"present": False, "url": f"{scheme}://{request.host}/e2b-uploads/{secret}"}, status=201
        )

    async def upload(self, request: web.Request) -> web.Response:
        build_id, files = self.upload_urls.pop(request.match_info["secret"], (None, None))
        build = self.builds.get(build_id or "")
        if build is None:
            raise E2bError(404, "this upload URL is not valid (each is good for one upload)")
        limit = self.plane.settings.template_context_max_bytes
        path, size = build.spool / f"{len(build.uploads)}.tar", 0
        with path.open("wb") as spooled:
            async for chunk in request.content.iter_chunked(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise E2bError(413, f"the upload is larger than the build context limit ({limit} bytes)")
                spooled.write(chunk)
        build.uploads[files] = path
        return web.Response(status=200)

    async def start(self, request: web.Request) -> web.Response:
        build = await self._build(request, request.match_info["template"], request.match_info["build"])
        body = await self.plane.body(request)
        if build.task is not None:
            raise E2bError(409, f"build {build.build_id} was started already")
        missing = [
            s.get("filesHash")
            for s in body.get("steps") or []
            if isinstance(s, dict) and s.get("filesHash") not in (None, *build.uploads)
        ]
        if missing:
            raise E2bError(400, f"the files of {len(missing)} COPY step(s) were not uploaded")
        spec = template_service_pb2.BuildTemplateSpec(
            template=f"templates/{build.template}",
            recipe=template_recipe.recipe(body, build.resources),
            tags=build.tags,
            no_cache=bool(body.get("force")),
        )
        build.status = "building"
        build.task = asyncio.create_task(self._run(build, spec), name=f"e2b-build-{build.build_id}")
        return web.Response(status=202)

    async def _run(self, build: Build, spec) -> None:
        stub = template_service_pb2_grpc.TemplateServiceStub(self.plane.loopback.channel)

        async def requests():
            yield template_service_pb2.BuildTemplateRequest(spec=spec)
            context = build.spool / "context.tar"
            await asyncio.to_thread(merge_context, list(build.uploads.values()), context)
            with context.open("rb") as merged:
                while chunk := await asyncio.to_thread(merged.read, CHUNK):
                    yield template_service_pb2.BuildTemplateRequest(context=chunk)

        try:
            async for event in stub.BuildTemplate(requests(), metadata=build.metadata):
                kind = event.WhichOneof("event")
                if kind == "log":
                    for line in event.log.data.decode(errors="replace").splitlines():
                        build.log(line)
                elif kind == "step":
                    step = event.step
                    state = template_pb2.TemplateStepState.Name(step.state).removeprefix("TEMPLATE_STEP_STATE_")
                    build.log(f"step {step.index}: {step.text} [{state.lower()}]")
                elif kind == "build" and event.build.state == template_pb2.TEMPLATE_BUILD_STATE_SUCCEEDED:
                    build.status = "ready"
                elif kind == "build" and event.build.state == template_pb2.TEMPLATE_BUILD_STATE_FAILED:
                    build.status, build.reason = "error", event.build.failure_message or event.build.failure_reason
            if build.status == "building":
                build.status, build.reason = "error", "the build ended without a result"
        except grpc.aio.AioRpcError as error:
            build.status, build.reason = "error", error.details() or error.code().name
        except Exception as error:  # a build's failure is its status, never a crashed task
            log.exception("e2b_template_build_failed", build=build.build_id)
            build.status, build.reason = "error", f"{type(error).__name__}: {error}"
        finally:
            if build.status == "error":
                build.log(build.reason, level="error")
            for path in build.spool.iterdir():
                path.unlink(missing_ok=True)
            build.spool.rmdir()

    async def status(self, request: web.Request) -> web.Response:
        build = await self._build(request, request.match_info["template"], request.match_info["build"])
        try:
            offset = max(0, int(request.query.get("logsOffset", "0")))
        except ValueError:
            raise E2bError(400, "logsOffset must be a number") from None
        entries = build.entries[offset : offset + PAGE]
        answer = {
            "templateID": build.template,
            "buildID": build.build_id,
            "status": build.status,
            "logs": [e["message"] for e in entries],
            "logEntries": entries,
        }
        if build.status == "error":
            answer["reason"] = {"message": build.reason}
        return web.json_response(answer)


def merge_context(archives: list[Path], target: Path) -> None:
    """One tar at `target` of every uploaded archive's entries (gzip or not: tarfile tells), each path once: the COPY
    sources all come from the same context directory, so an entry in two uploads is the same file."""
    seen = set()
    with tarfile.open(target, mode="w") as merged:
        for path in archives:
            with tarfile.open(path, mode="r:*") as upload:
                for member in upload:
                    if member.name in seen:
                        continue
                    seen.add(member.name)
                    merged.addfile(member, upload.extractfile(member) if member.isfile() else None)
