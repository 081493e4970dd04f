from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from microvm.auth.v1 import auth_pb2
from services.common.registry import etcd_client
from services.gateway import access
from tests.code_server import add_code_interpreter_image, add_guest_server_image, host_code_server
from tests.desktop_server import host_desktop, missing_tools
from tests.etcd import LocalEtcd
from tests.inprocess import InProcessNode, fake_image_root, start_installation
from tests.unit.e2b_fixtures import e2b_doors


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
def calling_tenant():
    """A tenant of its own per test, set as the caller of the gateway code the test runs (its principal)."""
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    token = access._principal.set(auth_pb2.Principal(id="someone", tenant=tenant))
    yield tenant
    access._principal.reset(token)


@pytest.fixture
def node_name() -> str:
    """A node id of its own per test, so records of different tests never meet."""
    return f"node-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
async def installation(etcd_server):
    """A whole one-node installation (auth required, fake VMM) in the session's event loop for the tests of one
    module (its gateway reaps sandbox records it finds expired: it must not outlive the module that made it);
    the module makes tenants of its own (`tests.inprocess.tenant_caller`)."""
    node = InProcessNode(etcd_server.endpoint, Path(tempfile.mkdtemp(prefix="mvm-installation-")))
    images = fake_image_root(node.state_dir / "images")
    node.settings["compute"] = {"vmm": "fake", "image_cache_dir": str(images), "warm_pool_size": 1}
    await start_installation(node)
    yield node
    await node.stop_all()
    shutil.rmtree(node.state_dir, ignore_errors=True)


CODE_OUTPUT_BOUND = 4 << 20  # a run's output bound in the code server of `code_installation`


@pytest.fixture(scope="module")
async def code_installation(etcd_server):
    """An `installation` whose `code-interpreter` sandboxes reach a real code server on this host (Python kernels;
    one server shared by every sandbox of the module, so contexts are too); `default` sandboxes have none."""
    state_dir = Path(tempfile.mkdtemp(prefix="mvm-code-"))
    with host_code_server(state_dir / "code-server", max_output_bytes=CODE_OUTPUT_BOUND) as socket_path:
        node = InProcessNode(etcd_server.endpoint, state_dir)
        images = fake_image_root(node.state_dir / "images")
        add_code_interpreter_image(images, socket_path)
        node.settings["compute"] = {"vmm": "fake", "image_cache_dir": str(images), "warm_pool_size": 1}
        await start_installation(node)
        node.code_socket = socket_path
        try:
            yield node
        finally:
            await node.stop_all()
    shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
async def desktop_installation(etcd_server):
    """An `installation` whose `desktop` sandboxes reach a real desktop server on this host, on a private Xvfb display
    with openbox (one display for every sandbox of the module); `default` sandboxes have none. Skipped without Xvfb."""
    if missing := missing_tools():
        pytest.skip(f"the desktop tests need {', '.join(missing)} (make apt)")
    state_dir = Path(tempfile.mkdtemp(prefix="mvm-desktop-"))
    with host_desktop(state_dir / "desktop") as (socket_path, display_env):
        node = InProcessNode(etcd_server.endpoint, state_dir)
        images = fake_image_root(node.state_dir / "images")
        add_guest_server_image(images, "desktop", {"/run/mvm-desktop.sock": socket_path})
        # E2B's `desktop` (tests/unit/test_e2b_desktop_sdk.py): processes on the same host display, no server
        add_guest_server_image(images, "e2b-desktop", {})
        node.settings["compute"] = {"vmm": "fake", "image_cache_dir": str(images), "warm_pool_size": 1}
        await start_installation(node)
        node.desktop_socket, node.display_env = socket_path, display_env
        try:
            yield node
        finally:
            await node.stop_all()
    shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="module")
async def doors(installation):
    """The `installation`'s two E2B doors, with the e2b SDK's environment pointed at them for tenant alice
    (tests/unit/e2b_fixtures.py). A module with another installation defines its own `doors`."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        async for found in e2b_doors(installation, monkeypatch):
            yield found
