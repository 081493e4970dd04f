"""`mvm code` and `mvm code-context`: their parsing, then the commands themselves as processes of their own against an
in-process installation whose `code-interpreter` sandboxes reach a real code server with Python kernels."""

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

pytestmark = pytest.mark.timeout(180)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- parsing ------------------------------------------------------------------------------------------------
def test_code_takes_a_file_or_inline_code_and_its_options():
    args = parse(["code", "sbx-1", "plot.py", "--language", "python", "--context", "c1", "--timeout", "2m"])
    assert (args.id, args.file, args.source, args.language, args.context, args.run_timeout) == (
        "sbx-1",
        "plot.py",
        None,
        "python",
        "c1",
        120,
    )
    inline = parse(["code", "sbx-1", "-c", "1 + 1", "--out", "plots", "--json"])
    assert (inline.file, inline.source, inline.out, inline.json) == (None, "1 + 1", "plots", True)
    assert parse(["code-context", "rm", "sbx-1", "a", "b"]).contexts == ["a", "b"]
    assert parse(["code-context", "create", "sbx-1", "-e", "K=V"]).env == ["K=V"]
    with pytest.raises(SystemExit):
        parse(["code-context", "sbx-1"])


# --- against an installation --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
async def sandbox(code_installation):
    caller = await tenant_caller(code_installation, f"clicode-{code_installation.node}")
    gateway = await code_installation.address("gateway")
    client = AsyncClient(gateway, caller.key)
    sandbox = await AsyncSandbox.create("code-interpreter", client=client)
    sandbox.gateway, sandbox.key = gateway, caller.key
    yield sandbox
    await sandbox.kill()
    await client.close()


async def mvm(sandbox, *argv: str, stdin: bytes = b"", cwd: str | None = None) -> tuple[int, str, str]:
    """`mvm ARGV` as a process of its own, against the installation's gateway."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mvm_cli.main",
        "--gateway",
        sandbox.gateway,
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "MVM_API_KEY": sandbox.key},
        cwd=cwd,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), 120)
    return process.returncode, out.decode(), err.decode()


async def test_code_keeps_state_prints_output_and_the_value(sandbox):
    status, out, err = await mvm(
        sandbox, "code", sandbox.id, "-c", "import sys\ncount = 41\nprint('err', file=sys.stderr)"
    )
    assert (status, out, err) == (0, "", "err\n")
    status, out, _ = await mvm(sandbox, "code", sandbox.id, "-", stdin=b"print('hi')\ncount + 1\n")
    assert (status, out) == (0, "hi\n42\n")


async def test_code_saves_a_plot_as_a_png_and_prints_its_path(sandbox, tmp_path):
    script = tmp_path / "plot.py"
    script.write_text("import matplotlib.pyplot as plt\nplt.plot([1, 2], [3, 4])\nplt.show()\n")
    status, out, err = await mvm(sandbox, "code", sandbox.id, str(script), "--out", "plots", cwd=str(tmp_path))
    assert status == 0, err
    [path] = out.split()
    assert path.startswith("plots/") and path.endswith(".png")
    assert (tmp_path / path).read_bytes().startswith(PNG_SIGNATURE)


async def test_code_prints_the_traceback_and_fails_when_the_code_raises(sandbox):
    status, out, err = await mvm(sandbox, "code", sandbox.id, "-c", "raise ValueError('bad input')")
    assert status == 1 and out == ""
    assert "ValueError" in err and "bad input" in err
    status, out, _ = await mvm(sandbox, "code", sandbox.id, "--json", "-c", "1 / 0")
    execution = json.loads(out)
    assert status == 1 and execution["status"] == "error" and execution["error"]["name"] == "ZeroDivisionError"


async def test_code_contexts_are_created_listed_used_and_deleted(sandbox):
    status, out, _ = await mvm(sandbox, "code-context", "create", sandbox.id, "--env", "WHO=cli")
    context = out.strip()
    assert status == 0 and context
    status, out, _ = await mvm(sandbox, "code", sandbox.id, "--context", context, "-c", "import os; os.environ['WHO']")
    assert (status, out) == (0, "'cli'\n")
    status, out, _ = await mvm(sandbox, "code-context", "ls", sandbox.id, "--json")
    listed = json.loads(out)
    assert context in [c["id"] for c in listed["contexts"]] and "python" in listed["languages"]
    status, out, _ = await mvm(sandbox, "code-context", "rm", sandbox.id, context)
    assert (status, out) == (0, f"deleted {context}\n")
    status, _, err = await mvm(sandbox, "code", sandbox.id, "--context", context, "-c", "1")
    assert status == 2 and context in err  # NOT_FOUND: something named does not exist
