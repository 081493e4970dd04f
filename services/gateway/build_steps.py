"""StepRunner: what a build step does inside its builder VM, through the relay of the VM's node (the same public
exec and file methods a sandbox's caller uses, so the guest is driven exactly as in a sandbox).

RUN and package steps run their command with the environment, working directory and user the definition has
set so far; their output is streamed to the build's log. COPY sends the context's files as one tar stream (kept
as symlinks, with their modes) and, with --chown, hands them over with `chown` in the guest (the image's own user
database resolves the names). The host's CA bundle, when the installation trusts it, is written into every
builder VM before its step, so package managers work behind a TLS-intercepting proxy.
"""

from __future__ import annotations

import io
import posixpath
import shlex
import tarfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from google.protobuf import duration_pb2

from images.definition import CopyStep
from microvm.sandbox.v1 import sandbox_service_pb2 as api
from services.common.client_streams import send_until_refused

# Where a builder (and so the template) keeps the host's CA bundle, and what points the usual tools at it.
HOST_CA_PATH = "/etc/ssl/mvm-host-ca.pem"
CA_ENV = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "NODE_EXTRA_CA_CERTS", "CURL_CA_BUNDLE")
CHUNK = 1 << 20


class StepFailed(Exception):
    """A step's command failed: the build ends FAILED with its exit code and the end of its log."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def ca_env() -> dict[str, str]:
    return {name: HOST_CA_PATH for name in CA_ENV}


def copy_archive(context: Path, step: CopyStep) -> bytes:
    """The files a COPY puts into the image as a tar rooted at `/`, as the plan listed them (content checked
    against the plan's digests when it was made; the context does not change during a build)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in step.entries:
            info = tarfile.TarInfo(entry.dest.lstrip("/"))
            info.mode = entry.mode & 0o7777
            if entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif entry.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, entry.target or ""
                tar.addfile(info)
            else:
                source = context / entry.source
                info.size = source.stat().st_size
                with open(source, "rb") as f:
                    tar.addfile(info, f)
    return buffer.getvalue()


class StepRunner:
    def __init__(self, relay, vm_id: str, log: Callable[[bytes], Awaitable[None]], timeout: Callable[[], float]):
        self.relay, self.sandbox, self.log, self.timeout = relay, f"sandboxes/{vm_id}", log, timeout

    async def make_dir(self, path: str) -> None:
        await self.relay.MakeDir(api.MakeDirRequest(sandbox=self.sandbox, path=path, parents=True), timeout=30)

    async def write(self, path: str, data: bytes, mode: int = 0o644) -> None:
        async def messages():
            yield api.WriteFileRequest(
                header=api.WriteFileHeader(sandbox=self.sandbox, path=path, mode=mode, make_parents=True)
            )
            for offset in range(0, len(data), CHUNK):
                yield api.WriteFileRequest(data=data[offset : offset + CHUNK])

        await send_until_refused(lambda requests: self.relay.WriteFile(requests, timeout=120), messages())

    async def run(self, argv, env: dict[str, str], cwd: str, user: str) -> None:
        """Runs a command to its end, its output to the log; StepFailed unless it exits 0."""
        seconds = max(1, int(self.timeout()))
        process = api.ProcessConfig(
            argv=list(argv), env=env, cwd=cwd, user=user, timeout=duration_pb2.Duration(seconds=seconds)
        )
        request = api.ExecRequest(sandbox=self.sandbox, process=process)
        exited = None
        async for event in self.relay.Exec(request, timeout=seconds + 30):
            kind = event.WhichOneof("event")
            if kind in ("stdout", "stderr"):
                await self.log(getattr(event, kind))
            elif kind == "exited":
                exited = event.exited
        if exited is None:
            raise StepFailed(-1, "the command's stream ended without its exit status")
        if exited.timed_out:
            raise StepFailed(-1, f"the command ran past the build's time limit ({seconds}s left)")
        if exited.WhichOneof("status") == "signal":
            raise StepFailed(-exited.signal, f"the command was killed by signal {exited.signal}")
        if exited.exit_code != 0:
            raise StepFailed(exited.exit_code, f"the command exited with code {exited.exit_code}")

    async def copy(self, context: Path, step: CopyStep, user_env: dict[str, str]) -> None:
        archive = copy_archive(context, step)

        async def messages():
            yield api.UploadArchiveRequest(header=api.UploadArchiveHeader(sandbox=self.sandbox, path="/"))
            for offset in range(0, len(archive), CHUNK):
                yield api.UploadArchiveRequest(data=archive[offset : offset + CHUNK])

        reply = await send_until_refused(lambda requests: self.relay.UploadArchive(requests, timeout=600), messages())
        await self.log(f"copied {reply.entries} entries, {reply.bytes} bytes\n".encode())
        if step.chown:
            targets = sorted({top_of(entry.dest, step.dest) for entry in step.entries})
            command = f"chown -R {shlex.quote(step.chown)} -- " + " ".join(shlex.quote(t) for t in targets)
            await self.run(["/bin/sh", "-c", command], user_env, "/", "root")


def top_of(dest: str, copy_dest: str) -> str:
    """The outermost path a COPY made under its destination (what --chown hands over)."""
    if dest == copy_dest or not dest.startswith(copy_dest.rstrip("/") + "/"):
        return dest
    relative = posixpath.relpath(dest, copy_dest)
    return posixpath.join(copy_dest, relative.split("/")[0])
