"""A VM about to serve users (in a template snapshot, or restored into the warm pool) runs the exec path and its
template's ready check once (services/compute/templates.py `warm_up`): under TCG each new VMM process translates
guest code afresh, and a template's server (the code interpreter's kernel) would otherwise pay that on a user's
first request. The guest link is a recording stand-in; what runs in the guest is the point."""

from __future__ import annotations

from types import SimpleNamespace

from microvm.types.v1 import template_pb2
from services.compute.templates import WARM_UP_COMMANDS, TemplateSnapshots


class RecordingGuests:
    def __init__(self, ready_exit: int = 0) -> None:
        self.ran: list[list[str]] = []
        self.identities: list[tuple[str, str]] = []
        self.ready_exit = ready_exit

    async def set_identity(self, vm_id: str, hostname: str) -> None:
        self.identities.append((vm_id, hostname))

    async def run(self, vm_id: str, argv: list[str], timeout: float) -> int:
        self.ran.append(argv)
        return 0 if tuple(argv) in map(tuple, WARM_UP_COMMANDS) else self.ready_exit


def templates_with(config: template_pb2.ImageConfig, guests: RecordingGuests) -> TemplateSnapshots:
    lifecycle = SimpleNamespace(
        settings=SimpleNamespace(), guests=guests, images=SimpleNamespace(config=lambda template: config)
    )
    return TemplateSnapshots(lifecycle, snapshots=None, root=None)


async def test_the_templates_ready_check_runs_after_the_exec_path():
    guests = RecordingGuests()
    config = template_pb2.ImageConfig(ready_argv=["python3", "/opt/mvm-code/mvm_code_ready.py"], workdir="/home/user")
    await templates_with(config, guests).warm_up("pool-1", "code-interpreter")
    assert guests.ran[: len(WARM_UP_COMMANDS)] == [list(argv) for argv in WARM_UP_COMMANDS]
    [check] = guests.ran[len(WARM_UP_COMMANDS) :]
    assert check[-2:] == ["python3", "/opt/mvm-code/mvm_code_ready.py"] and "cd /home/user" in check[2]


async def test_a_template_without_a_ready_check_runs_only_the_exec_path():
    guests = RecordingGuests()
    await templates_with(template_pb2.ImageConfig(), guests).warm_up("pool-1", "default")
    assert guests.ran == [list(argv) for argv in WARM_UP_COMMANDS]


async def test_the_claims_identity_path_is_warmed_too():
    """Under TCG a claim's first round trip (identity, clock, ping) took 81 ms in a pool VM that had only run the
    exec path, 28 ms once the warm-up ran it as well (bench/breakdown.py)."""
    guests = RecordingGuests()
    await templates_with(template_pb2.ImageConfig(), guests).warm_up("pool-1", "default")
    assert guests.identities == [("pool-1", "pool-1")]


async def test_a_failing_check_leaves_the_vm_usable():
    guests = RecordingGuests(ready_exit=1)
    await templates_with(template_pb2.ImageConfig(ready_port=8000), guests).warm_up("pool-1", "web")
    assert len(guests.ran) == len(WARM_UP_COMMANDS) + 1
