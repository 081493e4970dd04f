"""deploy/e2b/nginx.conf, the reverse proxy of the E2B SDKs' domain form: nginx accepts it (`nginx -t`) and, run on a
free port with a throwaway certificate in front of an in-process installation, routes `api.<domain>` to the control
plane and `<port>-<sandbox id>.<domain>` to the sandbox's port. Skipped where nginx is not installed."""

from __future__ import annotations

import asyncio
import datetime
import shutil
import subprocess
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.etcd import free_port

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed"),
]
CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "e2b" / "nginx.conf"
DOMAIN = "e2b.test"


def certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"*.{DOMAIN}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "fullchain.pem", directory / "privkey.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def rendered(directory: Path, port: int, api: str, sandbox: str) -> Path:
    """The shipped config with only what a test must change: addresses, certificate, domain, and nginx's own files
    under `directory` (so it runs unprivileged beside anything else)."""
    cert, key = certificate(directory)
    text = CONFIG.read_text()
    for old, new in (
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{port} ssl http2;"),
        ("/etc/ssl/e2b/fullchain.pem", str(cert)),
        ("/etc/ssl/e2b/privkey.pem", str(key)),
        ("http://127.0.0.1:3000", f"http://{api}"),
        ("http://127.0.0.1:3001", f"http://{sandbox}"),
        ("e2b.example.com", DOMAIN),
    ):
        assert old in text, old
        text = text.replace(old, new)
    own_files = "".join(
        f"    {name}_temp_path {directory / name};\n" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("http {\n", f"http {{\n    access_log off;\n{own_files}", 1)
    text = f"pid {directory / 'nginx.pid'};\nerror_log {directory / 'error.log'};\n" + text
    path = directory / "nginx.conf"
    path.write_text(text)
    return path


@pytest.fixture
async def proxy(doors, tmp_path):
    """nginx on a free port with the rendered config; its https base URL."""
    port = free_port()
    config = rendered(tmp_path, port, doors.api.removeprefix("http://"), doors.sandbox.removeprefix("http://"))
    checked = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-c", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    process = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(config), "-g", "daemon off;"])
    try:
        while True:  # ready once it accepts connections (or it exited: its error log says why)
            assert process.poll() is None, (tmp_path / "error.log").read_text()
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        yield f"https://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
async def guest_server():
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"guest saw {request.path}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port
    await runner.cleanup()


async def test_the_domain_form_routes_through_nginx(doors, proxy, guest_server):
    api = {"Host": f"api.{DOMAIN}", "X-API-Key": doors.alice.key}
    body = {"templateID": "base", "timeout": 60}
    async with doors.http.post(proxy + "/v2/sandboxes", json=body, headers=api, ssl=False) as response:
        assert response.status == 201, await response.text()
        created = await response.json()
    sandbox, token = created["sandboxID"], created["envdAccessToken"]
    try:
        headers = {"Host": f"{guest_server}-{sandbox}.{DOMAIN}", "X-Access-Token": token}
        async with doors.http.get(proxy + "/through/nginx", headers=headers, ssl=False) as response:
            assert (response.status, await response.text()) == (200, "guest saw /through/nginx")
        async with doors.http.get(proxy + f"/sandboxes/{sandbox}", headers=api, ssl=False) as response:
            assert response.status == 200 and (await response.json())["sandboxID"] == sandbox
    finally:
        async with doors.http.delete(proxy + f"/sandboxes/{sandbox}", headers=api, ssl=False) as response:
            assert response.status == 204
