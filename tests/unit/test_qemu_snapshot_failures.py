"""A snapshot that fails never leaves a running VM stopped: QemuDriver.snapshot against a stand-in QMP server whose
migration fails (a full disk, a VMM that refuses), as the real one reports it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from microvm.types.v1.vm_pb2 import VmRecord
from services.common.errors import FailedPrecondition
from services.compute.qemu import QemuDriver

pytestmark = pytest.mark.timeout(30)


class StandInQmp:
    """Answers QMP as a running qemu would, except that every migration fails."""

    def __init__(self, socket: Path) -> None:
        self.socket, self.commands = socket, []

    async def start(self) -> asyncio.AbstractServer:
        return await asyncio.start_unix_server(self.serve, str(self.socket))

    async def serve(self, reader, writer) -> None:
        writer.write(b'{"QMP": {"version": {}, "capabilities": []}}\n')
        while line := await reader.readline():
            command = json.loads(line)["execute"]
            self.commands.append(command)
            reply = {
                "query-status": {"running": True, "status": "running"},
                "query-migrate": {"status": "failed", "error-desc": "Unable to write to command: No space left"},
            }.get(command, {})
            writer.write(json.dumps({"return": reply}).encode() + b"\n")
            await writer.drain()
        writer.close()


async def test_a_running_vm_whose_memory_cannot_be_saved_is_running_again_after(tmp_path):
    qmp = StandInQmp(QemuDriver.paths(tmp_path)["qmp"])
    server = await qmp.start()
    try:
        vm = VmRecord(id="vm-1", directory=str(tmp_path))
        with pytest.raises(FailedPrecondition, match="migration failed"):
            await QemuDriver.__new__(QemuDriver).snapshot(vm, tmp_path / "out", tmp_path / "base.ext4")
    finally:
        server.close()
    assert qmp.commands.index("stop") < qmp.commands.index("migrate") < qmp.commands.index("cont")
