from __future__ import annotations

import pytest

from tests.stack import LocalStack, start_stack


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
