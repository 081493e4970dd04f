"""VmProcesses: the VMM process of each VM, watched and torn down, and its console drained into a bounded log.

VMM processes are detached from the compute service (VMs outlive a compute restart), so they are watched with
a pidfd, which works for processes that are not our children. One that exits unexpectedly marks its VM FAILED
with the end of its console, and everything it held is released but its console log (read it to learn why).
Each VMM serves its VM's serial console on a socket that a ConsoleDrain copies into the VM's ConsoleLog
(services/compute/console.py: why a socket, and the bound on disk).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import structlog

from microvm.types.v1 import vm_pb2
from microvm.types.v1.vm_pb2 import VmRecord
from services.common.tasks import cancel_and_wait
from services.compute.console import INDEX_NAME, LOG_NAME, ConsoleDrain, ConsoleLog
from services.compute.ledger import VmLedger
from services.compute.network_link import NetworkLink
from services.compute.vmm import VmmDriver

log = structlog.get_logger()
TAIL_BYTES = 4096  # of the console, for messages
LAST_WORDS_SECONDS = 2.0  # a VMM that exited: how long its console's last output may take to be stored


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class VmProcesses:
    def __init__(
        self,
        ledger: VmLedger,
        driver: VmmDriver,
        network: NetworkLink | None,
        console_max_bytes: int = 1 << 20,
        console_keep: int = 1,
    ) -> None:
        self.ledger, self.driver, self.network = ledger, driver, network
        self.console_max_bytes, self.console_keep = console_max_bytes, console_keep
        self._watchers: dict[str, asyncio.Task] = {}
        self._deleting: set[str] = set()
        # By VM directory, which a pool VM keeps when it is handed out under another id.
        self._consoles: dict[Path, ConsoleLog] = {}
        self._drains: dict[Path, asyncio.Task] = {}

    def alive(self, vm: VmRecord) -> bool:
        return bool(vm.pid) and self.driver.owns_process(vm.pid, Path(vm.directory))

    def console(self, vm: VmRecord) -> ConsoleLog:
        """The console log of `vm`; its drain and its readers share one."""
        directory = Path(vm.directory)
        if directory not in self._consoles:
            self._consoles[directory] = ConsoleLog(directory, self.console_max_bytes, self.console_keep)
        return self._consoles[directory]

    def console_tail(self, vm: VmRecord, lines: int = 5) -> str:
        try:
            text = self.console(vm).tail(TAIL_BYTES).decode(errors="replace").strip().splitlines()
        except OSError:
            return "no console output"
        return " | ".join(text[-lines:]) or "no console output"

    def watch(self, vm: VmRecord) -> None:
        """Notices the VMM process of `vm` exiting, and drains its console while it runs."""
        self.unwatch(vm.id)
        directory = Path(vm.directory)
        if directory not in self._drains or self._drains[directory].done():
            drain = ConsoleDrain(self.driver.paths(directory)["console"], self.console(vm), lambda: self.alive(vm))
            self._drains[directory] = asyncio.create_task(drain.run(), name=f"console-{vm.id}")
        self._watchers[vm.id] = asyncio.create_task(self._watch(vm.id, vm.pid), name=f"watch-{vm.id}")

    def unwatch(self, vm_id: str) -> None:
        watcher = self._watchers.pop(vm_id, None)
        if watcher and watcher is not asyncio.current_task():
            watcher.cancel()

    async def _watch(self, vm_id: str, pid: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            fd = None
        if fd is not None:
            exited = loop.create_future()
            loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
            try:
                await exited
            finally:
                loop.remove_reader(fd)
                os.close(fd)
        vm = self.ledger.vms.get(vm_id)
        if (
            vm is None
            or vm.pid != pid
            or vm_id in self._deleting
            or vm.state in (vm_pb2.VM_STATE_STOPPED, vm_pb2.VM_STATE_FAILED)
        ):
            return
        drain = self._drains.get(Path(vm.directory))
        if drain is not None:  # its last words are often why it died
            await asyncio.wait([drain], timeout=LAST_WORDS_SECONDS)
        await self.mark_failed(vm, f"the VMM process exited unexpectedly: {self.console_tail(vm, 3)}")

    async def mark_failed(self, vm: VmRecord, message: str) -> None:
        log.warning("vm_failed", vm=vm.id, message=message)
        await self.destroy(vm, keep_console=True)
        vm.state, vm.pid, vm.failure_message = vm_pb2.VM_STATE_FAILED, 0, message
        await self.ledger.save(vm)

    async def destroy(self, vm: VmRecord, keep_disk: bool = False, keep_console: bool = False) -> None:
        """Stops the VMM process and frees the VM's files (all of them, and its network attachment, unless
        `keep_disk`; all but its console log with `keep_console`)."""
        self._deleting.add(vm.id)
        try:
            self.unwatch(vm.id)
            directory = Path(vm.directory)
            await cancel_and_wait(self._drains.pop(directory, None))
            console = self._consoles.pop(directory, None)
            if console is not None:
                await asyncio.to_thread(console.close)
            if not vm.pid:  # interrupted between starting the VMM and recording its pid
                try:
                    vm.pid = int(self.driver.paths(directory)["pid"].read_text())
                except (OSError, ValueError):
                    pass
            if vm.pid and self.driver.owns_process(vm.pid, directory):
                kill(vm.pid)
                for _ in range(100):
                    if not self.driver.owns_process(vm.pid, directory):
                        break
                    await asyncio.sleep(0.02)
            if vm.ram_shared and vm.ram_path:
                Path(vm.ram_path).unlink(missing_ok=True)  # its own RAM file, never a snapshot's
            if keep_disk:
                for name, path in self.driver.paths(directory).items():
                    if name in ("agent", "qmp", "api", "pid", "console"):
                        path.unlink(missing_ok=True)
            else:
                await asyncio.to_thread(_remove, directory, keep_console)
                if self.network is not None:
                    await self.network.detach(vm.id)
        finally:
            self._deleting.discard(vm.id)

    def close(self) -> None:
        """Stops watching and draining; the VMs keep running for the next compute instance to adopt (their VMMs
        drop console output until it connects)."""
        for task in [*self._watchers.values(), *self._drains.values()]:
            task.cancel()
        self._watchers.clear()
        self._drains.clear()
        for console in self._consoles.values():
            console.close()
        self._consoles.clear()


def _remove(directory: Path, keep_console: bool) -> None:
    if not keep_console:
        shutil.rmtree(directory, ignore_errors=True)
        return
    for entry in directory.iterdir() if directory.exists() else ():
        if entry.name == INDEX_NAME or entry.name.startswith(LOG_NAME):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
