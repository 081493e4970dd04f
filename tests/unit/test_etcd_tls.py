"""etcd admits only holders of a certificate of the installation's CA: a plain client, a TLS client without a
certificate and one with a certificate of another CA are all refused; a service's own certificate gets in."""

from __future__ import annotations

import aetcd
import pytest

from services.common.pki import ensure_pki, load_identity
from services.common.registry import etcd_client
from tests.etcd import LocalEtcd

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory):
    pki = tmp_path_factory.mktemp("pki")
    ensure_pki(pki)
    server = LocalEtcd(tmp_path_factory.mktemp("etcd-tls"), pki=pki)
    server.pki = pki
    yield server
    server.stop()


async def reads(client) -> bool:
    """True when the client wrote and read a key; False when etcd refused the connection (the TLS handshake)."""
    try:
        await client.connect()
        await client.put(b"/microvm/tls-probe", b"x")
        return (await client.get(b"/microvm/tls-probe")).value == b"x"
    except aetcd.exceptions.ConnectionFailedError:
        return False
    finally:
        await client.close()


async def test_a_service_certificate_of_the_installation_gets_in(tls_etcd):
    assert await reads(etcd_client([tls_etcd.endpoint], timeout=3, identity=load_identity(tls_etcd.pki, "auth")))


async def test_a_plain_client_is_refused(tls_etcd):
    assert not await reads(etcd_client([tls_etcd.endpoint], timeout=3))


async def test_a_certificate_of_another_ca_is_refused(tls_etcd, tmp_path):
    ensure_pki(tmp_path / "other")
    stranger = load_identity(tmp_path / "other", "operator")
    assert not await reads(etcd_client([tls_etcd.endpoint], timeout=3, identity=stranger))


async def test_tls_without_a_client_certificate_is_refused(tls_etcd):
    from dataclasses import replace

    anonymous = replace(load_identity(tls_etcd.pki, "operator"), key=None, certificate=None)
    assert not await reads(etcd_client([tls_etcd.endpoint], timeout=3, identity=anonymous))


def test_a_host_given_the_pki_without_the_ca_key_starts_without_issuing_anything(tmp_path):
    """Every host but the one that made the PKI gets it without ca.key (docs/deploy.md): its supervisor must start."""
    import shutil

    ensure_pki(tmp_path / "made")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "made", copy)
    (copy / "ca.key").unlink()
    (copy / "token-kek.key").unlink()  # it goes to auth's hosts only
    before = sorted(p.name for p in copy.iterdir())
    ensure_pki(copy)
    assert sorted(p.name for p in copy.iterdir()) == before
    assert load_identity(copy, "compute").certificate == (tmp_path / "made" / "compute.crt").read_bytes()
