"""A guest booted from an image archive with no Python at all: the Alpine-like musl base of tests/musl_base.py,
published by images/oci.py with the default image's kernel and initramfs, served by a stack whose only image it is.
Exec and files go through the normal API; the agent runs on its own runtime (images/runtime.py)."""

from __future__ import annotations

import hashlib
import os

import pytest

from images.builder import BuiltImage
from images.oci import publish_archive_image
from images.runtime import LOADER, RUNTIME_DIR
from tests import musl_base
from tests.guests import Gateway
from tests.stack import start_stack

pytestmark = [pytest.mark.guest, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def musl_gateway(tmp_path_factory):
    assert not musl_base.missing_tools(), f"missing {musl_base.missing_tools()}: run `make deps`"
    kernel_from = BuiltImage.load("default")  # `make images`: one kernel and initramfs serve every template
    root = tmp_path_factory.mktemp("musl-base")
    archive = musl_base.oci_archive(musl_base.oci_layout(root / "layout"), root / "musl.oci.tar")
    images = root / "images"
    publish_archive_image(archive, "oci-archive", "musl", images, kernel_from)
    stack = start_stack(
        root / "stack",
        {"compute": {"image_cache_dir": str(images), "warm_pool_size": 0, "template_snapshots": False}},
    )
    try:
        yield Gateway(stack.gateway_address, stack.admin_key)
    finally:
        stack.stop()


def test_a_musl_base_without_python_runs_exec_and_files_on_the_agents_own_runtime(musl_gateway):
    gateway = musl_gateway
    sandbox = gateway.create(template="musl")
    try:
        # The image's own userland: busybox's sh, musl's loader, and no python anywhere.
        system = gateway.exec(sandbox.name, ["sh", "-c", "cat /etc/os-release; command -v python3 python || echo none"])
        assert system.exit_code == 0 and b"ID=alpine" in system.stdout and system.stdout.endswith(b"none\n")
        musl = gateway.exec(sandbox.name, ["/lib/ld-musl-x86_64.so.1"])  # musl's loader, given no program: its usage
        assert b"musl libc (x86_64)" in musl.stderr

        # PID 1 is the agent on the bundled loader and python; nothing of it reaches the processes it starts.
        agent = gateway.exec(sandbox.name, ["cat", "/proc/1/cmdline"]).stdout.split(b"\0")
        assert agent[:3] == [f"/{RUNTIME_DIR}/lib/{LOADER}".encode(), b"--library-path", f"/{RUNTIME_DIR}/lib".encode()]
        environment = gateway.exec(sandbox.name, ["env"]).stdout.decode()
        assert not [line for line in environment.splitlines() if line.startswith(("LD_", "PYTHON"))], environment

        # Files through the API, checked by the image's own tools.
        data = os.urandom(3 << 20)
        gateway.write_file(sandbox.name, "/root/blob", data)
        assert gateway.read_file(sandbox.name, "/root/blob") == data
        digest = gateway.exec(sandbox.name, ["sha256sum", "/root/blob"]).stdout.split()[0].decode()
        assert digest == hashlib.sha256(data).hexdigest()

        # The layers' whiteouts as the guest sees them.
        listing = gateway.exec(sandbox.name, ["sh", "-c", "ls /var/cache/old; ls /etc/doomed.conf 2>&1; cat /srv/*"])
        assert listing.stdout.startswith(b"fresh\n") and listing.stdout.endswith(b"kept\n")
        assert b"No such file" in listing.stdout
    finally:
        gateway.delete(sandbox.name)
