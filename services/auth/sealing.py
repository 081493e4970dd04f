"""Token-signing keys are sealed before they go to etcd.

Whoever reads etcd (a backup, a node's certificate, a mistake in a firewall) must not be able to mint tokens, so
a signing key's private half is stored encrypted (AES-256-GCM, the key id as associated data) with a
key-encryption key that is never in etcd: a 32-byte file readable by auth alone, `<pki>/token-kek.key` by default
(`auth.token_kek_file`). Every auth replica needs the same file, as every service needs the same CA: it is copied
with the PKI from the host that made it (`python -m services.common.pki DIR` makes it with the certificates). A
replica with a different file cannot open the keys and says so at once instead of signing with keys of its own.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from services.common.errors import FailedPrecondition
from services.common.pki import KEK_BYTES

NONCE_BYTES = 12


@dataclass(frozen=True)
class Sealer:
    key: bytes

    @classmethod
    def load(cls, path: Path) -> Sealer:
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            raise FailedPrecondition(
                f"no token key-encryption key at {path}: copy it from the host whose auth made the signing keys "
                "(it travels with the PKI), or create one for a new installation with python -m services.common.pki",
                reason="TOKEN_KEK_MISSING",
            ) from None
        if len(key) != KEK_BYTES:
            raise FailedPrecondition(f"{path} must hold exactly {KEK_BYTES} bytes", reason="TOKEN_KEK_INVALID")
        if path.stat().st_mode & 0o077:
            raise FailedPrecondition(
                f"{path} is readable by others than its owner: chmod 600 it", reason="TOKEN_KEK_EXPOSED"
            )
        return cls(key)

    @property
    def key_id(self) -> str:
        """Names the key without revealing it, so a record says which key sealed it."""
        return hashlib.sha256(b"microvm token kek\0" + self.key).hexdigest()[:16]

    def seal(self, kid: str, secret: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + AESGCM(self.key).encrypt(nonce, secret, kid.encode())

    def open(self, kid: str, sealed: bytes, sealed_with: str) -> bytes:
        if sealed_with != self.key_id:
            raise FailedPrecondition(
                f"signing key {kid} was sealed with key-encryption key {sealed_with}, this auth has {self.key_id}: "
                "every auth replica needs the same token-kek.key",
                reason="TOKEN_KEK_MISMATCH",
            )
        try:
            return AESGCM(self.key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], kid.encode())
        except InvalidTag:
            raise FailedPrecondition(
                f"signing key {kid} does not open: its record was altered", reason="SIGNING_KEY_CORRUPT"
            ) from None
