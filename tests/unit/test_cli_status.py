"""`mvm status`: the gateway's health through the API (exit 0 when SERVING, 1 otherwise); the local services'
part needs the host that runs them (tests/integration/test_stack.py covers `mvm-supervisor status`)."""

from __future__ import annotations

import asyncio
import os
import sys

from tests.etcd import free_port
from tests.inprocess import tenant_caller


async def mvm_status(gateway: str, key: str, state_dir: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mvm_cli.main",
        "--gateway",
        gateway,
        "status",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "MVM_API_KEY": key, "MVM_STATE_DIR": state_dir},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode() + err.decode()


async def test_status_says_whether_the_gateway_serves(installation, tmp_path):
    caller = await tenant_caller(installation, f"status-{installation.node}")
    gateway = await installation.address("gateway")
    code, out = await mvm_status(gateway, caller.key, str(tmp_path))
    assert code == 0 and out == f"gateway {gateway}: SERVING\n", out
    nobody = f"127.0.0.1:{free_port()}"
    code, out = await mvm_status(nobody, caller.key, str(tmp_path))
    assert code == 1 and out.startswith(f"gateway {nobody}: UNREACHABLE (UNAVAILABLE"), out
