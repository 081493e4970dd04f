from __future__ import annotations

import uuid

import pytest

from services.common.registry import etcd_client
from tests.etcd import LocalEtcd


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    """One real etcd for the unit tests of a session; each test works under its own key prefix or ids."""
    server = LocalEtcd(tmp_path_factory.mktemp("etcd"))
    yield server
    server.stop()


@pytest.fixture
async def etcd(etcd_server):
    client = etcd_client([etcd_server.endpoint])
    await client.connect()
    yield client
    await client.close()


@pytest.fixture
def node_name() -> str:
    """A node id of its own per test, so records of different tests never meet."""
    return f"node-{uuid.uuid4().hex[:8]}"
