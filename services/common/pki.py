"""The installation's own certificate authority: mutual TLS between services.

The supervisor creates, once, under `<state_dir>/pki/`: a CA, and a key + certificate per service kind plus
`operator` (for the supervisor and tools), etcd's server certificate, and `token-kek.key` (auth's key-encryption
key, services/auth/sealing.py). etcd and the internal services (compute, relay, network, snapshot, auth) accept
only clients presenting a certificate from this CA; a call without one fails the TLS handshake. The public
gateway port stays plain on loopback and authenticates callers with bearer credentials instead.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# "etcd" is etcd's own server certificate: etcd accepts only clients with a certificate of this CA.
IDENTITIES = ("gateway", "compute", "relay", "network", "snapshot", "auth", "operator", "etcd")
# Every service certificate names this host: callers check it instead of the address they dialled, so a
# service on any host and address is verified as "issued by this installation's CA".
SERVICE_NAME = "microvm.internal"
# Client channel options that go with it.
TLS_CHANNEL_OPTIONS = [("grpc.ssl_target_name_override", SERVICE_NAME)]
VALID_DAYS = 3650
# Seals the token-signing keys auth keeps in etcd (services/auth/sealing.py); copied to auth's hosts only.
KEK_FILE = "token-kek.key"
KEK_BYTES = 32


@dataclass(frozen=True)
class Identity:
    ca: bytes
    key: bytes
    certificate: bytes

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.certificate)], root_certificates=self.ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.certificate
        )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ensure_pki(directory: Path) -> None:
    """Creates the CA and every identity that is missing; existing ones are kept. A host given a copy of the PKI
    without the CA's key (every host but the one that made it, docs/deploy.md) issues nothing: it has what it
    needs, and the token key-encryption key is made only where the CA was."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.UTC)
    if (directory / "ca.crt").exists() and not (directory / "ca.key").exists():
        return
    if not (directory / "ca.crt").exists():
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "microvm-sandbox local CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(directory / "ca.key", _pem_key(ca_key))
        (directory / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    for kind in IDENTITIES:
        if (directory / f"{kind}.crt").exists() and _names_service(directory / f"{kind}.crt"):
            continue
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"microvm-{kind}")]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(SERVICE_NAME),
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(directory / f"{kind}.key", _pem_key(key))
        (directory / f"{kind}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    create_kek(directory / KEK_FILE)


def create_kek(path: Path) -> bool:
    """Writes a new key-encryption key (mode 0600) unless one exists; True when it made one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(KEK_BYTES))
    return True


def _names_service(path: Path) -> bool:
    """Certificates from before SERVICE_NAME lack it: they are issued again (same CA)."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return SERVICE_NAME in names.get_values_for_type(x509.DNSName)


def load_identity(directory: Path, kind: str) -> Identity:
    try:
        return Identity(
            ca=(directory / "ca.crt").read_bytes(),
            key=(directory / f"{kind}.key").read_bytes(),
            certificate=(directory / f"{kind}.crt").read_bytes(),
        )
    except FileNotFoundError as exc:
        from services.common.config import ConfigError

        raise ConfigError(
            f"no service certificate for {kind} in {directory} (the supervisor creates them; "
            f"or set internal_tls: false): {exc.filename}"
        ) from None


if __name__ == "__main__":  # `python -m services.common.pki DIR`: the installation's CA and certificates, once
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m services.common.pki DIR  (creates what is missing; keeps what exists)")
    ensure_pki(Path(sys.argv[1]))
    print(
        f"PKI in {sys.argv[1]}: ca.crt, a key + certificate per service kind, for etcd and for the operator, and "
        "token-kek.key (auth's hosts only)"
    )
