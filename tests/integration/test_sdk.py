"""The Python SDK against the real stack: async and sync, processes, files, snapshots, errors."""

from __future__ import annotations

import asyncio

import pytest

from microvm_sandbox import AsyncSandbox, Exited, InvalidArgumentError, NotFoundError, Sandbox, Stdout
from microvm_sandbox.aio import AsyncClient

pytestmark = pytest.mark.guest


def test_async_sandbox_in_one_line(stack):
    async def scenario():
        client = AsyncClient(stack.gateway_address, stack.admin_key)
        async with AsyncSandbox.create(template="default", timeout=300, client=client) as sb:
            result = await sb.exec(["python3", "-c", "print(6*7)"])
            assert (result.stdout, result.exit_code, result.ok) == (b"42\n", 0, True)
            events = [e async for e in sb.exec_stream("echo one; sleep 0.2; echo two")]
            assert [e.data for e in events if isinstance(e, Stdout)] == [b"one\n", b"two\n"]
            assert isinstance(events[-1], Exited) and events[-1].exit_code == 0
            assert (await sb.run_code("python", "import sys; print(sys.version_info[0])")).text == "3\n"
            await sb.write("/root/data/notes.txt", "hello sdk")
            assert await sb.read("/root/data/notes.txt") == b"hello sdk"
            assert [e.path for e in await sb.ls("/root/data")] == ["/root/data/notes.txt"]
            with pytest.raises(NotFoundError) as failure:
                await sb.read("/missing")
            assert failure.value.reason == "NOT_FOUND"
            snapshot = await sb.snapshot(labels={"step": "1"})
            await sb.write("/root/data/notes.txt", "changed")
            restored = await AsyncSandbox.restore(snapshot, client=client)
            try:
                assert await restored.read("/root/data/notes.txt") == b"hello sdk"  # back in time
            finally:
                await restored.kill()
            name = sb.name
        with pytest.raises(NotFoundError):
            await AsyncSandbox.connect(name, client=client)
        await client.close()

    asyncio.run(scenario())


def test_sync_sandbox_mirrors_the_async_one(stack, tmp_path):
    with Sandbox.create(address=stack.gateway_address, api_key=stack.admin_key) as sb:
        assert sb.exec(["echo", "sync"]).stdout == b"sync\n"
        assert [e.data for e in sb.exec_stream(["echo", "streamed"]) if isinstance(e, Stdout)] == [b"streamed\n"]
        (tmp_path / "up.bin").write_bytes(b"\x00\x01" * 1000)
        sb.upload(tmp_path / "up.bin", "/root/up.bin")
        sb.download("/root/up.bin", tmp_path / "down.bin")
        assert (tmp_path / "down.bin").read_bytes() == b"\x00\x01" * 1000
        sb.pause()
        sb.resume()
        clones = sb.fork(2)
        try:
            assert len({c.exec(["hostname"]).stdout for c in clones}) == 2
        finally:
            for clone in clones:
                clone.kill()
        with pytest.raises(InvalidArgumentError):
            sb.run_code("cobol", "DISPLAY 'HI'.")
