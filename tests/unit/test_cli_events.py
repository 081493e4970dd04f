"""`mvm events` and `mvm webhooks` (clients/cli/mvm_cli/events.py) against a whole installation (fake VMM): what the
terminal shows, the cursor to resume from, `-f` following live, and exit statuses."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid

import pytest

from microvm_sandbox import AsyncClient, AsyncSandbox
from mvm_cli.main import parse, run
from tests.inprocess import tenant_caller

pytestmark = pytest.mark.timeout(120)
# A service's log line, wherever it starts: the services log from this process's loop thread while mvm prints from
# another, so one may land in the middle of a line mvm is printing (between its text and its newline).
SERVICE_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[[^\n]*\n?")


def without_service_logs(text: str) -> str:
    """What mvm printed, without the lines the installation's services (in this process) logged meanwhile."""
    return SERVICE_LOG_LINE.sub("", text)


@pytest.fixture(scope="module")
async def key(installation):
    return (await tenant_caller(installation, f"cliev-{uuid.uuid4().hex[:8]}")).key


@pytest.fixture
async def mvm(installation, key, monkeypatch, capfd):
    gateway = await installation.address("gateway")
    monkeypatch.setenv("MVM_API_KEY", key)

    async def call(*argv: str) -> tuple[int, str, str]:
        capfd.readouterr()
        status = await asyncio.to_thread(run, ["--gateway", gateway, *argv])
        out, err = capfd.readouterr()
        return status, without_service_logs(out), without_service_logs(err)

    call.gateway = gateway
    return call


def test_the_command_lines_parse():
    args = parse(["events", "-f", "--since", "12.0", "--type", "created", "--type", "failed", "--label", "a=b"])
    assert (args.follow, args.since, args.type, args.label) == (True, "12.0", ["created", "failed"], ["a=b"])
    assert parse(["webhooks"]).handler.__name__ == "webhooks_command"
    create = parse(["webhooks", "create", "https://x.example.com/h", "--type", "expired", "--description", "ci"])
    assert (create.action, create.url, create.type, create.description) == (
        "create",
        "https://x.example.com/h",
        ["expired"],
        "ci",
    )
    with pytest.raises(SystemExit):
        parse(["events", "--type", "exploded"])


async def test_events_since_a_cursor_then_the_cursor_to_resume_from(mvm, installation, key):
    status, cursor, _ = await mvm("events", "--cursor")
    assert status == 0 and cursor.strip().isdigit()
    async with AsyncClient(mvm.gateway, key) as client:
        sandbox = await AsyncSandbox.create(labels={"via": "cli"}, client=client)
        await sandbox.kill()
    status, out, err = await mvm("events", "--since", cursor.strip())
    lines = out.splitlines()
    assert status == 0 and lines[0].split() == ["CURSOR", "TIME", "TYPE", "SANDBOX", "STATE", "DETAILS"]
    assert [line.split()[2] for line in lines[1:]] == ["created", "started", "deleted"]
    assert all(sandbox.id in line for line in lines[1:]) and "via=cli" in lines[1]
    resume, last = err.strip().rsplit(" ", 1)[1], lines[-1].split()[0]
    assert int(resume.split(".")[0]) >= int(last.split(".")[0])  # at the last event, or past it
    status, out, _ = await mvm("events", "--since", cursor.strip(), "--json", "--type", "deleted")
    (event,) = [json.loads(line) for line in out.splitlines()]
    assert (event["type"], event["sandbox"], event["cursor"]) == ("deleted", sandbox.name, last)
    status, out, err = await mvm("events", "--since", "nonsense")
    assert status == 1 and "INVALID_ARGUMENT" in err and "cursor" in err


async def test_events_follow_prints_each_event_as_it_happens(mvm, key):
    env = dict(os.environ, MVM_API_KEY=key, PYTHONUNBUFFERED="1")
    follower = subprocess.Popen(
        [sys.executable, "-m", "mvm_cli.main", "--gateway", mvm.gateway, "events", "-f", "--json"],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        await asyncio.sleep(2)  # the watch is in place
        async with AsyncClient(mvm.gateway, key) as client:
            sandbox = await AsyncSandbox.create(client=client)
            line = await asyncio.wait_for(asyncio.to_thread(follower.stdout.readline), 30)
            await sandbox.kill()
        assert json.loads(line)["type"] == "created" and json.loads(line)["sandbox"] == sandbox.name
        assert follower.poll() is None  # still following
    finally:
        follower.terminate()
        follower.wait(10)


async def test_webhooks_create_list_deliveries_and_delete(mvm):
    status, out, err = await mvm("webhooks", "create", "https://hooks.example.com/mvm", "--type", "failed")
    assert status == 0 and "shown only now" in err
    ident = out.split()[1]
    assert out.split()[2:] == ["secret", out.split()[3]] and out.split()[3].startswith("whsec_")
    status, out, _ = await mvm("webhooks")
    assert status == 0 and ident in out and "https://hooks.example.com/mvm" in out and "failed" in out
    status, out, _ = await mvm("webhooks", "list", "-q")
    assert out.split() == [ident]
    status, out, _ = await mvm("webhooks", "deliveries", ident)
    assert status == 0 and out.split() == ["TIME", "EVENT", "SANDBOX", "STATE", "ATTEMPTS", "HTTP", "ERROR"]
    status, out, _ = await mvm("webhooks", "delete", ident)
    assert status == 0 and out.strip() == f"deleted {ident}"
    status, _, err = await mvm("webhooks", "delete", ident)
    assert status == 2 and "does not exist" in err
    status, _, err = await mvm("webhooks", "create", "ftp://hooks.example.com/x")
    assert status == 1 and "http:// or https://" in err
