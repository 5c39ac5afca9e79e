"""CA private keys at rest: AES-256-GCM under a key-encryption key (KEK) derived from the
operator's master secret with HKDF-SHA256.

Sealed blob format, version 1 (all of it is authenticated):

    0x01 | nonce (12 random bytes) | ciphertext | GCM tag (16 bytes)

The version byte is bound into the GCM associated data together with the caller's `aad`
(the CA key id), so a blob can neither be re-labelled as another format version nor moved
to another key record.
"""

from __future__ import annotations

import logging
import os
import stat

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshid.errors import ConfigError, MeshidError

MIN_SECRET_BYTES = 16
KEK_INFO = b"meshid ca key encryption v1"
# The salt is fixed per blob format: the KEK must be reproducible from the master secret
# alone, and a new format gets a new salt (and version byte) so KEKs never collide.
_SALT_V1 = b"meshid/sealed-key/v1"
_VERSION_V1 = 0x01
_NONCE_BYTES = 12
_TAG_BYTES = 16

_MISMATCH = "master secret does not match (key could not be decrypted)"

log = logging.getLogger("meshid.ca")


def warn_if_others_can_read(fd: int, path: str, what: str) -> None:
    """Log a warning when a secret file (open as `fd`) is readable by users other than its
    owner and group: group access is left alone (Kubernetes mounts secrets 0440 for fsGroup)."""
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & 0o004:
        log.warning("%s %s is readable by every user on this host (mode %04o): chmod 0600 (or 0400) it",
                    what, path, mode)


class SealError(MeshidError):
    """A sealed key could not be opened: wrong master secret, tampering, or a bad blob."""


def load_master_secret(file: str | None, env_var: str | None) -> bytes:
    """Read the master secret from `file` if configured, otherwise from the environment variable.

    A trailing newline in the file or variable is dropped (editors and `echo` add one).
    Error messages name where the secret was looked for, never its value.
    """
    if file:
        try:
            with open(file, "rb") as fh:
                secret = fh.read()
                warn_if_others_can_read(fh.fileno(), file, "master secret file")
        except OSError as exc:
            raise ConfigError(
                f"master secret file {file}: cannot read it ({exc.strerror or exc.__class__.__name__})"
            ) from None
        return _check_secret(secret.rstrip(b"\r\n"), f"master secret file {file}")
    if env_var:
        value = os.environ.get(env_var)
        if value is None:
            raise ConfigError(
                f"no master secret: environment variable {env_var} is not set and no "
                "master_secret_file is configured"
            )
        return _check_secret(value.rstrip("\r\n").encode(), f"environment variable {env_var}")
    raise ConfigError("no master secret configured: set master_secret_file or master_secret_env")


def _check_secret(secret: bytes, where: str) -> bytes:
    if not secret:
        raise ConfigError(f"master secret from {where} is empty")
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"master secret from {where} is too short ({len(secret)} bytes; at least {MIN_SECRET_BYTES} "
            "required, e.g. `head -c 32 /dev/urandom | base64`)"
        )
    return secret


class KeySealer:
    """Seals and unseals CA private keys under the KEK derived from one master secret.

    Only the derived AEAD object is kept; the master secret itself is not stored.
    """

    __slots__ = ("_aead",)

    def __init__(self, master_secret: bytes) -> None:
        if not isinstance(master_secret, bytes | bytearray) or len(master_secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"master secret must be at least {MIN_SECRET_BYTES} bytes")
        kek = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT_V1, info=KEK_INFO).derive(
            bytes(master_secret)
        )
        self._aead = AESGCM(kek)

    def __repr__(self) -> str:
        return "KeySealer(<redacted>)"

    def __reduce__(self) -> tuple[object, ...]:
        # Pickling would copy key material into whatever stores the pickle.
        raise TypeError("KeySealer cannot be pickled")

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        header = bytes([_VERSION_V1])
        nonce = os.urandom(_NONCE_BYTES)  # random 96-bit nonce: far below the 2^32-message bound
        return header + nonce + self._aead.encrypt(nonce, plaintext, header + aad)

    def unseal(self, blob: bytes, aad: bytes) -> bytes:
        if not blob:
            raise SealError("sealed key is empty")
        if blob[0] != _VERSION_V1:
            raise SealError(f"sealed key has unknown format version {blob[0]}")
        if len(blob) < 1 + _NONCE_BYTES + _TAG_BYTES:
            raise SealError("sealed key is truncated")
        nonce = blob[1 : 1 + _NONCE_BYTES]
        try:
            return self._aead.decrypt(nonce, blob[1 + _NONCE_BYTES :], blob[:1] + aad)
        except InvalidTag:
            # One message for every cause: GCM cannot tell a wrong key from tampering.
            raise SealError(_MISMATCH) from None
