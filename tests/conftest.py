from __future__ import annotations

import asyncio
import linecache

import pytest
import pytest_timeout

from tests.stack import LocalStack, start_stack

_dump_thread_stacks = pytest_timeout.dump_stacks


def _dump_stacks_and_tasks(terminal) -> None:
    """pytest-timeout's dump, and every task of the event loop the test (or its fixture's teardown) was in: a hung
    async test shows only its loop waiting in epoll, and the task that never finished is what to read."""
    _dump_thread_stacks(terminal)
    try:
        loop = asyncio.get_running_loop()  # the timeout's signal handler runs in the loop's thread, inside its select
    except RuntimeError:
        return
    for task in asyncio.all_tasks(loop):
        terminal.sep("~", title=f"asyncio task {task.get_name()}")
        try:
            terminal.write(task_stack(task))
        except Exception as exc:  # the dump must never replace the timeout it reports
            terminal.write(f"(no stack: {exc!r})\n")


def task_stack(task: asyncio.Task) -> str:
    """Where `task` waits, innermost frame last. Not `Task.print_stack`: on 3.11 a suspended frame can report no line
    number, and linecache then raises TypeError, which hid the very hang this dump was for."""
    lines = [f"{task!r}\n"]
    for frame in task.get_stack():
        code = frame.f_code
        lines.append(f'  File "{code.co_filename}", line {frame.f_lineno or "?"}, in {code.co_name}\n')
        if frame.f_lineno:
            source = linecache.getline(code.co_filename, frame.f_lineno, frame.f_globals).strip()
            if source:
                lines.append(f"    {source}\n")
    return "".join(lines)


pytest_timeout.dump_stacks = _dump_stacks_and_tasks


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> LocalStack:
    """One stack (etcd + six services) shared by the integration tests of a session."""
    stack = start_stack(tmp_path_factory.mktemp("stack"))
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def gateway(stack):
    from tests.guests import Gateway

    return Gateway(stack.gateway_address, stack.admin_key)


@pytest.fixture(scope="session")
def sandbox(gateway):
    """One booted guest shared by the tests that only run things in it."""
    sandbox = gateway.create(labels={"suite": "shared"})
    yield sandbox
    gateway.delete(sandbox.name)


@pytest.fixture(scope="session")
def tenants(stack):
    """Tenant A owns a sandbox and a snapshot; tenant B (another developer key) tries to reach them."""
    from microvm.sandbox.v1 import sandbox_service_pb2 as api
    from tests.guests import Gateway
    from tests.integration.test_access import tenant_key

    a = Gateway(stack.gateway_address, tenant_key(stack, "tenant-a"))
    b = Gateway(stack.gateway_address, tenant_key(stack, "tenant-b"))
    # It lives as long as the session does (a whole `make test` outlasts the default timeout).
    sandbox = a.create(labels={"owner": "a"}, timeout_seconds=4 * 3600)
    snapshot = a.stub.CreateSnapshot(api.CreateSnapshotRequest(sandbox=sandbox.name), timeout=300).snapshot
    yield a, b, sandbox, snapshot
    a.delete(sandbox.name)
