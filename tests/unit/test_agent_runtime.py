"""The agent's own runtime (images/runtime.py): self-contained, started through its own loader, and invisible to
the processes the agent starts. Runs the bundle on this host (no guest): the guest proof is
tests/integration/test_archive_base_guest.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from images.builder import INIT_SCRIPT
from images.runtime import AGENT_DIR, LOADER, RUNTIME_DIR, build_agent_runtime, runtime_command
from microvm.agent.v1 import agent_pb2
from services.relay.agent_channel import AgentChannel, AgentTarget

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def bundle() -> Path:
    return build_agent_runtime()


def test_every_library_the_runtime_loads_comes_from_the_bundle(bundle):
    lib = bundle / RUNTIME_DIR / "lib"
    upb = sorted((bundle / AGENT_DIR / "google" / "_upb").glob("*.so"))
    assert upb, "protobuf's C implementation is not in the bundle"
    elves = [bundle / RUNTIME_DIR / "bin" / "python3", *sorted((lib / "python3.11" / "lib-dynload").glob("*.so")), *upb]
    assert len(elves) > 5, elves
    for elf in elves:
        # The bundle's loader lists what it would map for `elf` with only the bundle's library path.
        listing = subprocess.run(
            [str(lib / LOADER), "--library-path", str(lib), "--list", str(elf)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        paths = [line.split("=>")[1].split("(")[0].strip() for line in listing.splitlines() if "=>" in line]
        assert paths or "statically linked" in listing, (elf.name, listing)  # an extension that needs no library
        assert all(path.startswith(str(lib) + "/") for path in paths), (elf.name, listing)


def test_the_bundled_agent_decodes_frames_with_protobufs_c_implementation(bundle):
    probe = (
        f"import sys; sys.path.insert(0, {str(bundle / AGENT_DIR)!r}); "
        "from microvm.agent.v1 import agent_pb2; from google.protobuf.internal import api_implementation; "
        "print(api_implementation.Type(), type(agent_pb2.Frame).__module__)"
    )
    out = subprocess.run([*runtime_command(bundle), "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["upb", "google._upb._message"], out


def test_runtime_holds_only_the_stdlib_the_agent_needs(bundle):
    stdlib = bundle / RUNTIME_DIR / "lib" / "python3.11"
    for needed in ("os.py", "asyncio", "encodings", "json", "ctypes", "subprocess.py", "tarfile.py", "gzip.py"):
        assert (stdlib / needed).exists(), needed
    for pruned in ("test", "idlelib", "tkinter", "ensurepip", "lib2to3", "unittest", "pydoc_data", "ssl.py"):
        assert not (stdlib / pruned).exists(), pruned
    assert not [p for p in bundle.rglob("*") if p.is_dir() and p.name in ("test", "tests", "idle_test")]
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert size < 48 << 20, f"the runtime grew to {size >> 20} MiB"


def test_initramfs_starts_the_bundled_runtime_through_its_loader_else_the_image_python():
    assert f"runtime=/{RUNTIME_DIR}\n" in INIT_SCRIPT
    assert f"$runtime/lib/{LOADER} --library-path $runtime/lib" in INIT_SCRIPT
    assert f"$runtime/bin/python3 -I -S -X frozen_modules=on /{AGENT_DIR}/agent.py" in INIT_SCRIPT
    assert INIT_SCRIPT.rstrip().endswith(f"/usr/bin/python3 -I -S -X frozen_modules=on /{AGENT_DIR}/agent.py")
    # Nothing that the agent's processes would inherit.
    for variable in ("LD_LIBRARY_PATH", "LD_PRELOAD", "PYTHONHOME", "PYTHONPATH", "export"):
        assert variable not in INIT_SCRIPT


async def run(channel: AgentChannel, argv: list[str]) -> bytes:
    stream = channel.open_stream()
    await stream.send(exec_start=agent_pb2.ExecStart(argv=argv))
    output = bytearray()
    while True:
        frame = await stream.receive(timeout=30)
        kind = frame.WhichOneof("body")
        if kind == "output":
            output += frame.output.data
            await stream.grant(len(frame.output.data))
        elif kind == "exec_exited":
            await stream.close(cancel=False)
            assert frame.exec_exited.exit_code == 0, (argv, bytes(output))
            return bytes(output)
        elif kind == "error":
            raise AssertionError(frame.error.message)


async def test_agent_on_its_runtime_leaks_nothing_into_the_processes_it_starts(bundle, tmp_path):
    socket_path = str(tmp_path / "agent.sock")
    start = f"import sys; sys.path.insert(0, {str(bundle / AGENT_DIR)!r}); from microvm_agent.main import main; main()"
    agent = subprocess.Popen(
        [*runtime_command(bundle), "-c", start, "--unix", socket_path],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},  # as the kernel gives PID 1: no PYTHON*, no LD_*
    )
    try:
        for _ in range(500):
            if os.path.exists(socket_path) or agent.poll() is not None:
                break
            await asyncio.sleep(0.02)
        channel = AgentChannel(AgentTarget("host", socket_path))
        await channel.connect(5)
        await channel.wait_until_answering(10)
        try:
            maps = Path(f"/proc/{agent.pid}/maps").read_text()
            assert str(bundle / RUNTIME_DIR / "lib" / "libc.so.6") in maps  # the agent runs on the bundle's libc
            environment = (await run(channel, ["env"])).decode()
            assert not [line for line in environment.splitlines() if line.startswith(("LD_", "PYTHON"))], environment
            child_maps = (await run(channel, ["cat", "/proc/self/maps"])).decode()
            assert str(bundle) not in child_maps  # the image's programs load the image's libraries
            # A python the processes start is the host's own, with its own prefix and stdlib.
            prefix = await run(channel, [sys.executable, "-c", "import sys, json; print(sys.prefix, json.__file__)"])
            assert str(bundle).encode() not in prefix
        finally:
            await channel.close()
    finally:
        agent.kill()
        agent.wait()


def test_the_agent_finds_the_image_loader_it_prefetches(tmp_path):
    from microvm_agent.system import elf_interpreter

    assert elf_interpreter(os.path.realpath("/usr/bin/python3")) == "/lib64/ld-linux-x86-64.so.2"
    assert elf_interpreter("/bin/busybox") is None  # static (busybox-static)
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    assert elf_interpreter(str(script)) is None
    assert elf_interpreter(str(tmp_path / "missing")) is None
