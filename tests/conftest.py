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
