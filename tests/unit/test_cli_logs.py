"""`mvm logs`: a service's JSON log on this host (tail, filters, follow) and a sandbox's console through the API
(an in-process installation: the fake VMM's console is its agent's stdout, which a guest command can write to)."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from microvm_sandbox import AsyncSandbox
from microvm_sandbox.aio import AsyncClient
from mvm_cli.main import parse
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(120)


async def mvm_process(*argv: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mvm_cli.main",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )


def line(**fields) -> str:
    return json.dumps({"event": "x", **fields}) + "\n"


def test_a_service_or_a_sandbox_is_named_not_both():
    assert parse(["logs", "gateway", "-f"]).follow and parse(["logs", "--sandbox", "sbx-1"]).sandbox == "sbx-1"
    with pytest.raises(SystemExit):
        parse(["logs", "no-such-service"])


async def test_service_logs_tail_filter_and_follow(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    written = [line(n=i, sandbox="sbx-a" if i % 2 else "sbx-b", trace_id=f"t{i}") for i in range(10)]
    (logs / "gateway.log").write_text("".join(written) + "Traceback (not JSON)\n")
    env = {"MVM_STATE_DIR": str(tmp_path)}

    process = await mvm_process("logs", "gateway", "--tail", "3", env=env)
    out, err = await process.communicate()
    assert process.returncode == 0, err
    assert out.decode() == "".join(written[8:]) + "Traceback (not JSON)\n"

    process = await mvm_process("logs", "gateway", "--sandbox-id", "sbx-a", "--tail", "2", env=env)
    out, _ = await process.communicate()
    assert [json.loads(text)["n"] for text in out.decode().splitlines()] == [7, 9]

    process = await mvm_process("logs", "gateway", "--trace", "t4", env=env)
    assert [json.loads(text)["n"] for text in (await process.communicate())[0].decode().splitlines()] == [4]

    follower = await mvm_process("logs", "gateway", "-f", "--tail", "0", "--sandbox-id", "sbx-b", env=env)
    try:
        # Lines appended until it shows one: those written before it reached the end are in its (empty) tail.
        next_line = asyncio.ensure_future(follower.stdout.readline())
        for n in range(100, 400, 2):
            with open(logs / "gateway.log", "a") as log:
                log.write(line(n=n, sandbox="sbx-a") + line(n=n + 1, sandbox="sbx-b"))
            done, _ = await asyncio.wait([next_line], timeout=0.2)
            if done:
                break
        followed = json.loads(await asyncio.wait_for(next_line, 30))
        assert followed["sandbox"] == "sbx-b" and followed["n"] % 2 == 1
    finally:
        follower.terminate()
        await follower.wait()

    process = await mvm_process("logs", "relay", env=env)
    _, err = await process.communicate()
    assert process.returncode != 0 and "no log of relay" in err.decode()


async def test_a_sandboxs_console_tail_and_follow(installation):
    caller = await tenant_caller(installation, f"logs-{installation.node}")
    client = AsyncClient(await installation.address("gateway"), caller.key)
    sandbox = await AsyncSandbox.create(client=client)
    env = {"MVM_API_KEY": caller.key}
    gateway = ["--gateway", client.address]
    try:
        await sandbox.commands.run("echo first-line >> /proc/$PPID/fd/1")
        process = await mvm_process(*gateway, "logs", "--sandbox", sandbox.id, "--tail", "200", env=env)
        out, err = await process.communicate()
        assert process.returncode == 0, err
        assert b"first-line" in out
        follower = await mvm_process(*gateway, "logs", "--sandbox", sandbox.id, "-f", "--tail", "0", env=env)
        try:
            # Written until it shows: what the guest wrote before the follower found the console's end is behind it.
            seen, chunk = b"", asyncio.ensure_future(follower.stdout.read(4096))
            for _ in range(100):
                await sandbox.commands.run("echo later-line >> /proc/$PPID/fd/1")
                done, _ = await asyncio.wait([chunk], timeout=0.3)
                if done:
                    break
            seen = await asyncio.wait_for(chunk, 30)
            assert b"later-line" in seen and b"first-line" not in seen
        finally:
            follower.terminate()
            await follower.wait()
    finally:
        await sandbox.kill()
        await client.close()
