"""CA key types, key generation and the KeyManager plug-in interface.

A KeyManager makes CA keys and turns them into something the datastore may hold: the
disk manager seals PKCS#8 under the master secret's KEK; the PKCS#11 manager returns a
reference to a key that stays in the token, and destroys it once the CA retires the key.
Plaintext keys never leave process memory.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from enum import StrEnum
from typing import Any, Protocol, TypeAlias

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from issuer.ca.sealing import KeySealer, SealError
from meshid.errors import ConfigError

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

KEY_ID_LENGTH = 32
_PRIVATE_KEY_TYPES = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    dsa.DSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


class KeyType(StrEnum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"

    @classmethod
    def parse(cls, text: str) -> KeyType:
        try:
            return cls(text.strip().lower()) if isinstance(text, str) else cls(text)
        except ValueError:
            valid = ", ".join(k.value for k in cls)
            raise ConfigError(f"unknown key type {text!r}; valid key types: {valid}") from None


DEFAULT_KEY_TYPE = KeyType.EC_P256


def generate_private_key(kt: KeyType) -> PrivateKey:
    if kt is KeyType.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if kt is KeyType.EC_P384:
        return ec.generate_private_key(ec.SECP384R1())
    if kt is KeyType.RSA_2048:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kt is KeyType.RSA_3072:
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise ConfigError(f"unsupported key type {kt!r}")


def key_type_of(key: PrivateKeyTypes | PublicKeyTypes) -> KeyType:
    """The KeyType of a loaded key; ConfigError for keys meshid does not use as CA keys."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return KeyType.EC_P256
        if isinstance(key.curve, ec.SECP384R1):
            return KeyType.EC_P384
        raise ConfigError(f"unsupported EC curve {key.curve.name} (use P-256 or P-384)")
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if key.key_size == 2048:
            return KeyType.RSA_2048
        if key.key_size == 3072:
            return KeyType.RSA_3072
        raise ConfigError(f"unsupported RSA key size {key.key_size} (use 2048 or 3072)")
    raise ConfigError(f"unsupported key algorithm {type(key).__name__}")


_RSA_JWT_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")


def jwt_alg_for(key: PrivateKeyTypes | PublicKeyTypes, rsa_alg: str = "RS256") -> str:
    """The JWS `alg` for a JWT signing key: ES256 (P-256), ES384 (P-384), RS256 for RSA
    unless `rsa_alg` asks for another RSA algorithm (e.g. PS256)."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return "ES256"
        if isinstance(key.curve, ec.SECP384R1):
            return "ES384"
        if isinstance(key.curve, ec.SECP521R1):
            return "ES512"
        raise ConfigError(f"no JWT algorithm for EC curve {key.curve.name}")
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        if rsa_alg not in _RSA_JWT_ALGS:
            raise ConfigError(
                f"JWT algorithm {rsa_alg!r} is not valid for RSA keys; use one of {', '.join(_RSA_JWT_ALGS)}"
            )
        return rsa_alg
    raise ConfigError(f"no JWT algorithm for {type(key).__name__} keys")


def spki_der(key: PrivateKeyTypes | PublicKeyTypes) -> bytes:
    """SubjectPublicKeyInfo DER of a key (the public half of a private key)."""
    # Any: cryptography's key unions include key kinds (DH, X25519, ML-KEM) without SPKI typing.
    pub: Any = key.public_key() if isinstance(key, _PRIVATE_KEY_TYPES) else key
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id_for(key: PrivateKeyTypes | PublicKeyTypes) -> str:
    """Short stable id of a key: base64url(SHA-256(SubjectPublicKeyInfo)), first 32 characters.

    Used as JWT `kid` and CA key id: same key, same id, on every replica.
    """
    digest = hashlib.sha256(spki_der(key)).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")[:KEY_ID_LENGTH]


class KeyManager(Protocol):
    """Makes CA keys and converts them to and from what the datastore stores."""

    name: str
    # Whether a signature waits on a device (an HSM, perhaps over the network, its module
    # lock held while it generates a key): then every signing runs on the signing thread,
    # not only large batches, so the event loop never waits on the device.
    signs_on_device: bool

    async def generate(self, key_id: str, key_type: KeyType) -> tuple[PrivateKey, bytes]:
        """A new key and its stored form bound to `key_id`."""
        ...

    async def seal(self, key_id: str, key: PrivateKeyTypes) -> bytes:
        """The stored form of an existing key bound to `key_id` (ids derived from the key
        itself are only known after generation)."""
        ...

    async def load(self, key_id: str, sealed: bytes) -> PrivateKey:
        """The key back from its stored form; SealError when it cannot be opened."""
        ...

    async def delete(self, key_id: str) -> None:
        """Destroy whatever the manager holds for `key_id` outside the datastore. Called only
        after the datastore record is gone (revoked or retired). A key that is already gone
        is not an error (a retry, or another replica that retired it first); a manager that
        cannot destroy the key raises, and the caller logs and carries on."""
        ...


class DiskKeyManager:
    """Keys live in the datastore as PKCS#8 DER sealed under the master secret's KEK,
    with the key id as associated data."""

    name = "disk"
    signs_on_device = False

    def __init__(self, sealer: KeySealer) -> None:
        self._sealer = sealer

    def __repr__(self) -> str:
        return "DiskKeyManager()"

    async def generate(self, key_id: str, key_type: KeyType) -> tuple[PrivateKey, bytes]:
        key_type = KeyType.parse(key_type)
        if key_type in (KeyType.RSA_2048, KeyType.RSA_3072):
            # RSA generation takes 50 ms to seconds: keep it off the event loop.
            key = await asyncio.get_running_loop().run_in_executor(None, generate_private_key, key_type)
        else:
            key = generate_private_key(key_type)
        return key, self._seal(key_id, key)

    async def seal(self, key_id: str, key: PrivateKeyTypes) -> bytes:
        return self._seal(key_id, key)

    async def load(self, key_id: str, sealed: bytes) -> PrivateKey:
        try:
            der = self._sealer.unseal(sealed, key_id.encode())
        except SealError as exc:
            # Name the key, as every other load error does: one datastore holds several
            # replicas' keys, and "master secret does not match" alone does not say which.
            raise SealError(f"CA key {key_id}: {exc}") from None
        return _load_pkcs8(der, key_id)

    async def delete(self, key_id: str) -> None:
        # The sealed blob in the datastore record is the only copy; deleting the record destroyed it.
        return None

    def _seal(self, key_id: str, key: PrivateKeyTypes) -> bytes:
        der = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return self._sealer.seal(der, key_id.encode())


def _load_pkcs8(der: bytes, key_id: str) -> PrivateKey:
    try:
        key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError) as exc:
        raise SealError(f"CA key {key_id}: decrypted data is not a PKCS#8 private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise SealError(f"CA key {key_id}: unsupported key algorithm {type(key).__name__}")
    return key


def rewrap(sealed: bytes, old_sealer: KeySealer, new_sealer: KeySealer, key_id: str) -> bytes:
    """Re-seal one stored key under a new master secret (`meshid server rewrap`).

    Raises SealError (and changes nothing) when `old_sealer` does not open the blob.
    """
    aad = key_id.encode()
    return new_sealer.seal(old_sealer.unseal(sealed, aad), aad)
