"""KeyManager `pkcs11`: CA keys generated and used inside a PKCS#11 token (an HSM; SoftHSM2
in tests). The private key never leaves the token: it is made with CKA_SENSITIVE=true and
CKA_EXTRACTABLE=false, and what the datastore stores is a reference to it (token label,
CKA_ID, CKA_LABEL), not key material.

The keys handed to the rest of the CA are subclasses of cryptography's
`EllipticCurvePrivateKey` / `RSAPrivateKey` whose `sign` calls C_Sign. cryptography's
CertificateBuilder and CSR builder call `sign` on such subclasses, and so do PyJWT and
the minter's template path, so minting needs no PKCS#11-specific code:

- ECDSA: CKM_ECDSA over the digest (hashed here with cryptography, or given `Prehashed`);
  the token's raw r||s is DER-encoded with `encode_dss_signature`.
- RSA: CKM_SHA{256,384,512}_RSA_PKCS for PKCS#1 v1.5, CKM_SHA*_RSA_PKCS_PSS for PSS.

Tokens are driven through python-pkcs11, which initialises the module without locking
callbacks; some modules (SoftHSM2 among them) are then not safe for concurrent calls, so
every call into one module is serialised by a lock. The lock is released while the token
works (python-pkcs11 drops the GIL in C calls), so the event loop keeps running.

A retired CA key (revoked, or pruned once everything it signed expired) is destroyed in
the token by `delete`, after its datastore record is gone. Replicas sharing a datastore
share the token too (the JWT key is one token object that every replica loads), so only the
replica that removed the record destroys the objects, and an object already gone is fine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, Self, TypeVar

import pkcs11
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.padding import (
    MGF1,
    PSS,
    AsymmetricPadding,
    PKCS1v15,
    calculate_max_pss_salt_length,
)
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import NoDigestInfo, Prehashed, encode_dss_signature
from pkcs11 import Attribute, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import KeyType as P11KeyType
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from issuer.ca.keys import KeyType, PrivateKey
from issuer.ca.sealing import SealError
from meshid.errors import ConfigError, MeshidError

log = logging.getLogger("meshid.ca.pkcs11")

REFERENCE_VERSION = 1
CKA_ID_BYTES = 16
_T = TypeVar("_T")

_CURVES: dict[KeyType, str] = {KeyType.EC_P256: "secp256r1", KeyType.EC_P384: "secp384r1"}
_RSA_BITS: dict[KeyType, int] = {KeyType.RSA_2048: 2048, KeyType.RSA_3072: 3072}
_RSA_PKCS1: dict[str, Mechanism] = {
    "sha256": Mechanism.SHA256_RSA_PKCS,
    "sha384": Mechanism.SHA384_RSA_PKCS,
    "sha512": Mechanism.SHA512_RSA_PKCS,
}
_RSA_PSS: dict[str, tuple[Mechanism, Mechanism, pkcs11.MGF]] = {
    "sha256": (Mechanism.SHA256_RSA_PKCS_PSS, Mechanism.SHA256, pkcs11.MGF.SHA256),
    "sha384": (Mechanism.SHA384_RSA_PKCS_PSS, Mechanism.SHA384, pkcs11.MGF.SHA384),
    "sha512": (Mechanism.SHA512_RSA_PKCS_PSS, Mechanism.SHA512, pkcs11.MGF.SHA512),
}
# A session that went away (token reset, HSM reconnect) is reopened once and the call retried.
_SESSION_LOST = (p11e.SessionClosed, p11e.SessionHandleInvalid, p11e.DeviceRemoved, p11e.TokenNotPresent)
_NO_EXPORT = "CA key lives in a PKCS#11 token and cannot be exported"


class Pkcs11Error(MeshidError):
    """The token refused an operation, or a key it should hold is missing."""


# ---------------------------------------------------------------------------- token sessions

_MODULE_LOCKS: dict[str, threading.Lock] = {}
_SESSIONS: dict[tuple[str, str], TokenSession] = {}
_REGISTRY_LOCK = threading.Lock()


class TokenSession:
    """One logged-in read/write session on one token, shared by every user in the process.

    Login state belongs to the application, not the session (a second login fails with
    CKR_USER_ALREADY_LOGGED_IN, and closing a session logs all of them out), so the
    session is reference-counted: `acquire` / `release`.
    """

    def __init__(self, module_path: str, token_label: str, pin: str) -> None:
        self.module_path = module_path
        self.token_label = token_label
        self._pin = pin
        self._lock = _MODULE_LOCKS.setdefault(module_path, threading.Lock())
        self._session: Any = None
        self._private: dict[bytes, Any] = {}  # CKA_ID -> private key object of this session
        self._users = 0

    def __repr__(self) -> str:
        return f"TokenSession({self.module_path!r}, {self.token_label!r})"

    @classmethod
    def acquire(cls, module_path: str, token_label: str, pin: str) -> TokenSession:
        with _REGISTRY_LOCK:
            ts = _SESSIONS.get((module_path, token_label))
            if ts is None:
                ts = _SESSIONS[(module_path, token_label)] = cls(module_path, token_label, pin)
            elif ts._pin != pin:
                raise ConfigError(f"PKCS#11 token {token_label!r} is already open with another PIN")
            ts._users += 1
            return ts

    def release(self) -> None:
        with _REGISTRY_LOCK:
            self._users -= 1
            if self._users > 0:
                return
            _SESSIONS.pop((self.module_path, self.token_label), None)
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        session, self._session = self._session, None
        self._private.clear()
        if session is not None:
            try:
                session.close()
            except p11e.PKCS11Error as exc:
                log.debug("closing PKCS#11 session on %s: %r", self.token_label, exc)

    def _open_locked(self) -> Any:
        if self._session is not None:
            return self._session
        try:
            lib = pkcs11.lib(self.module_path)
        except (p11e.PKCS11Error, OSError) as exc:
            raise ConfigError(f"ca.pkcs11.module_path: cannot load {self.module_path}: {exc}") from None
        try:
            token = lib.get_token(token_label=self.token_label)
        except p11e.NoSuchToken:
            raise ConfigError(
                f"ca.pkcs11.token_label: no token labelled {self.token_label!r} in {self.module_path}"
            ) from None
        except p11e.MultipleTokensReturned:
            raise ConfigError(
                f"ca.pkcs11.token_label: several tokens are labelled {self.token_label!r}"
            ) from None
        try:
            self._session = token.open(rw=True, user_pin=self._pin)
        except p11e.PinIncorrect:
            raise ConfigError(f"PKCS#11 token {self.token_label!r}: the user PIN is incorrect") from None
        except p11e.PinLocked:
            raise ConfigError(f"PKCS#11 token {self.token_label!r}: the user PIN is locked") from None
        except p11e.UserAlreadyLoggedIn:
            # Logged in by other code in this process: our session shares that login.
            self._session = token.open(rw=True)
        return self._session

    def call(self, fn: Callable[[Any], _T]) -> _T:
        """Run `fn(session)` under the module lock, reopening a lost session once."""
        with self._lock:
            try:
                return fn(self._open_locked())
            except _SESSION_LOST as exc:
                log.warning(
                    "PKCS#11 session on %s lost (%s); reopening", self.token_label, type(exc).__name__
                )
                self._close_locked()
            return fn(self._open_locked())

    def private_key(self, session: Any, ckid: bytes) -> Any:
        """The private key object with CKA_ID `ckid` (cached per session); call under `call`."""
        obj = self._private.get(ckid)
        if obj is None:
            try:
                obj = session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=ckid)
            except p11e.NoSuchKey:
                raise Pkcs11Error(
                    f"no private key with CKA_ID {ckid.hex()} on token {self.token_label!r}"
                ) from None
            except p11e.MultipleObjectsReturned:
                raise Pkcs11Error(
                    f"several private keys with CKA_ID {ckid.hex()} on token {self.token_label!r}"
                ) from None
            self._private[ckid] = obj
        return obj

    def forget(self, ckid: bytes) -> None:
        """Drop the cached private key object for `ckid` (it is being destroyed); call under `call`."""
        self._private.pop(ckid, None)

    def sign(self, ckid: bytes, data: bytes, mechanism: Mechanism, param: Any = None) -> bytes:
        def run(session: Any) -> bytes:
            key = self.private_key(session, ckid)
            return bytes(key.sign(data, mechanism=mechanism, mechanism_param=param))

        try:
            return self.call(run)
        except p11e.PKCS11Error as exc:
            raise Pkcs11Error(
                f"token {self.token_label!r} refused to sign: {type(exc).__name__} {exc}"
            ) from None


# ---------------------------------------------------------------------------- key objects


def _digest(data: Any, algorithm: Prehashed | hashes.HashAlgorithm) -> bytes:
    """The digest CKM_ECDSA signs: `data` itself when `algorithm` is Prehashed."""
    if isinstance(algorithm, Prehashed):
        if len(data) != algorithm.digest_size:
            raise ValueError(f"prehashed data must be {algorithm.digest_size} bytes")
        return bytes(data)
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


class _TokenHandle:
    """What both key kinds share: a handle to a token object, never its material."""

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        raise TypeError(_NO_EXPORT)

    # A handle, not material: copies refer to the same token object.
    def __copy__(self) -> Self:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        return self

    def __reduce__(self) -> Any:
        raise TypeError("PKCS#11 key handles cannot be pickled")


class Pkcs11EcPrivateKey(_TokenHandle, ec.EllipticCurvePrivateKey):
    """An EC private key held by a token; signs with CKM_ECDSA, cannot be exported."""

    def __init__(
        self, token: TokenSession, ckid: bytes, label: str, public: ec.EllipticCurvePublicKey
    ) -> None:
        self.token = token
        self.ckid = ckid
        self.label = label
        self._public = public

    def __repr__(self) -> str:
        return f"<Pkcs11EcPrivateKey {self._public.curve.name} {self.token.token_label}/{self.label}>"

    def sign(self, data: Any, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise UnsupportedAlgorithm(f"PKCS#11 EC keys sign ECDSA only, not {signature_algorithm!r}")
        if signature_algorithm.deterministic_signing:
            # RFC 6979 needs the private scalar; tokens choose k themselves.
            raise UnsupportedAlgorithm("deterministic ECDSA is not available for PKCS#11 keys")
        digest = _digest(data, signature_algorithm.algorithm)
        raw = self.token.sign(self.ckid, digest, Mechanism.ECDSA)
        half = len(raw) // 2
        return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise UnsupportedAlgorithm("CA keys in a PKCS#11 token are for signing only")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise TypeError(_NO_EXPORT)


class Pkcs11RsaPrivateKey(_TokenHandle, rsa.RSAPrivateKey):
    """An RSA private key held by a token; signs PKCS#1 v1.5 or PSS, cannot be exported."""

    def __init__(self, token: TokenSession, ckid: bytes, label: str, public: rsa.RSAPublicKey) -> None:
        self.token = token
        self.ckid = ckid
        self.label = label
        self._public = public

    def __repr__(self) -> str:
        return f"<Pkcs11RsaPrivateKey {self._public.key_size} {self.token.token_label}/{self.label}>"

    def sign(
        self,
        data: Any,
        padding: AsymmetricPadding,
        algorithm: Prehashed | hashes.HashAlgorithm | NoDigestInfo,
    ) -> bytes:
        if isinstance(algorithm, Prehashed | NoDigestInfo):
            # CKM_RSA_PKCS would need a hand-built DigestInfo; nothing in meshid signs RSA prehashed.
            raise UnsupportedAlgorithm("prehashed RSA signing is not supported for PKCS#11 keys")
        if isinstance(padding, PKCS1v15):
            mech = _RSA_PKCS1.get(algorithm.name)
            if mech is None:
                raise UnsupportedAlgorithm(f"hash {algorithm.name} is not supported for PKCS#11 RSA keys")
            return self.token.sign(self.ckid, bytes(data), mech)
        if isinstance(padding, PSS):
            pss = _RSA_PSS.get(algorithm.name)
            if pss is None:
                raise UnsupportedAlgorithm(f"hash {algorithm.name} is not supported for PKCS#11 RSA keys")
            mech, hash_mech, mgf = pss
            param = (hash_mech, mgf, self._pss_salt_length(padding, algorithm))
            return self.token.sign(self.ckid, bytes(data), mech, param)
        raise UnsupportedAlgorithm(f"padding {padding.name} is not supported for PKCS#11 RSA keys")

    def _pss_salt_length(self, pad: PSS, h: hashes.HashAlgorithm) -> int:
        mgf = MGF1(h)
        # Compared by equality: cryptography keeps the salt length private.
        if pad in (PSS(mgf, PSS.DIGEST_LENGTH), PSS(mgf, h.digest_size)):
            return h.digest_size
        if pad == PSS(mgf, PSS.MAX_LENGTH):
            return calculate_max_pss_salt_length(self._public, h)
        raise UnsupportedAlgorithm(
            "PSS for PKCS#11 keys needs MGF1 with the signing hash and a salt of DIGEST_LENGTH or MAX_LENGTH"
        )

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def decrypt(self, ciphertext: bytes, padding: AsymmetricPadding) -> bytes:
        raise UnsupportedAlgorithm("CA keys in a PKCS#11 token are for signing only")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        raise TypeError(_NO_EXPORT)


Pkcs11PrivateKey = Pkcs11EcPrivateKey | Pkcs11RsaPrivateKey


def _public_key_of(session: Any, ckid: bytes) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """The public half stored beside the private key, as a cryptography key."""
    try:
        pub = session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=ckid)
    except (p11e.NoSuchKey, p11e.MultipleObjectsReturned) as exc:
        raise Pkcs11Error(
            f"public key with CKA_ID {ckid.hex()} not found on the token ({type(exc).__name__})"
        ) from None
    if pub.key_type == P11KeyType.EC:
        loaded = serialization.load_der_public_key(encode_ec_public_key(pub))
    elif pub.key_type == P11KeyType.RSA:
        loaded = rsa.RSAPublicNumbers(
            int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big"),
            int.from_bytes(pub[Attribute.MODULUS], "big"),
        ).public_key()
    else:
        raise Pkcs11Error(f"key with CKA_ID {ckid.hex()} is {pub.key_type.name}, not EC or RSA")
    if not isinstance(loaded, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise Pkcs11Error(f"key with CKA_ID {ckid.hex()} has an unsupported public key")
    return loaded


def _key_object(token: TokenSession, ckid: bytes, label: str, public: Any) -> PrivateKey:
    if isinstance(public, ec.EllipticCurvePublicKey):
        return Pkcs11EcPrivateKey(token, ckid, label, public)
    return Pkcs11RsaPrivateKey(token, ckid, label, public)


# ---------------------------------------------------------------------------- key manager


class Pkcs11KeyManager:
    """KeyManager whose keys stay in a PKCS#11 token; the datastore holds references."""

    name = "pkcs11"
    signs_on_device = True

    def __init__(
        self, module_path: str, token_label: str, pin: str, key_label_prefix: str = "meshid-"
    ) -> None:
        if not module_path or not token_label:
            raise ConfigError("ca.pkcs11: module_path and token_label are required")
        self.module_path = module_path
        self.token_label = token_label
        self.key_label_prefix = key_label_prefix
        self._pin = pin
        self._token: TokenSession | None = None
        # key id -> (CKA_ID, CKA_LABEL) of keys generated, sealed or loaded here: what `delete`
        # destroys. The label alone may be stale (relabelling is best effort).
        self._objects: dict[str, tuple[bytes, str]] = {}

    @classmethod
    def from_env(
        cls, module_path: str, token_label: str, pin_env: str, key_label_prefix: str = "meshid-"
    ) -> Pkcs11KeyManager:
        """A manager whose user PIN is read from the environment variable `pin_env`."""
        pin = os.environ.get(pin_env) if pin_env else None
        if not pin:
            raise ConfigError(f"ca.pkcs11.pin_env: environment variable {pin_env or '(unset)'} holds no PIN")
        return cls(module_path, token_label, pin.rstrip("\r\n"), key_label_prefix)

    def __repr__(self) -> str:
        return f"Pkcs11KeyManager({self.module_path!r}, {self.token_label!r})"

    @property
    def token(self) -> TokenSession:
        if self._token is None:
            self._token = TokenSession.acquire(self.module_path, self.token_label, self._pin)
        return self._token

    async def close(self) -> None:
        token, self._token = self._token, None
        if token is not None:
            await asyncio.to_thread(token.release)

    # -- KeyManager --------------------------------------------------------------------

    async def generate(self, key_id: str, key_type: KeyType) -> tuple[PrivateKey, bytes]:
        key_type = KeyType.parse(key_type)
        # Token calls block (RSA generation for seconds): keep them off the event loop.
        key = await asyncio.to_thread(self._generate, key_id, key_type)
        self._remember(key_id, key)
        return key, self._reference(key_id, key)

    async def seal(self, key_id: str, key: PrivateKeyTypes) -> bytes:
        if not isinstance(key, Pkcs11EcPrivateKey | Pkcs11RsaPrivateKey) or key.token is not self.token:
            raise SealError(
                "key_manager pkcs11 stores only keys it generated in its token "
                "(software keys are never imported)"
            )
        await asyncio.to_thread(self._relabel, key, self.key_label_prefix + key_id)
        self._remember(key_id, key)
        return self._reference(key_id, key)

    async def load(self, key_id: str, sealed: bytes) -> PrivateKey:
        ref = self._parse_reference(key_id, sealed)
        ckid = bytes.fromhex(ref["ckid"])
        try:
            key = await asyncio.to_thread(self._load, ckid, str(ref.get("label", "")))
        except Pkcs11Error as exc:
            raise SealError(f"CA key {key_id}: {exc}") from None
        self._remember(key_id, key)
        return key

    async def delete(self, key_id: str) -> None:
        """Destroy the key's private and public objects in the token: found by CKA_ID when
        this manager generated, sealed or loaded the key, else by label (another replica's
        key). Nothing to destroy is not an error; a token error raises Pkcs11Error."""
        ckid, label = self._objects.get(key_id, (None, self.key_label_prefix + key_id))
        # Token calls block: keep them off the event loop.
        destroyed = await asyncio.to_thread(self._delete, key_id, ckid, label)
        self._objects.pop(key_id, None)
        if destroyed:
            log.info(
                "destroyed CA key %s (%d objects) in PKCS#11 token %s", key_id, destroyed, self.token_label
            )
        else:
            log.debug("CA key %s is not in PKCS#11 token %s: already destroyed", key_id, self.token_label)

    def _remember(self, key_id: str, key: PrivateKey) -> None:
        assert isinstance(key, Pkcs11EcPrivateKey | Pkcs11RsaPrivateKey)
        # Sealing renames a freshly generated key: drop the name it was generated under.
        for other in [k for k, (ckid, _) in self._objects.items() if ckid == key.ckid]:
            del self._objects[other]
        self._objects[key_id] = (key.ckid, key.label)

    # -- token work (worker thread) -------------------------------------------------------

    def _generate(self, key_id: str, key_type: KeyType) -> PrivateKey:
        ckid = os.urandom(CKA_ID_BYTES)
        label = self.key_label_prefix + key_id
        private_template = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
        }
        common: dict[str, Any] = {
            "id": ckid,
            "label": label,
            "store": True,
            "capabilities": MechanismFlag.SIGN | MechanismFlag.VERIFY,
            "private_template": private_template,
            "public_template": {Attribute.TOKEN: True},
        }

        def run(session: Any) -> Any:
            if key_type in _CURVES:
                params = session.create_domain_parameters(
                    P11KeyType.EC,
                    {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVES[key_type])},
                    local=True,
                )
                params.generate_keypair(**common)
            else:
                session.generate_keypair(P11KeyType.RSA, _RSA_BITS[key_type], **common)
            return _public_key_of(session, ckid)

        try:
            public = self.token.call(run)
        except p11e.PKCS11Error as exc:
            raise Pkcs11Error(
                f"token {self.token_label!r} could not generate a {key_type} key: {type(exc).__name__} {exc}"
            ) from None
        log.info("generated %s key %s in PKCS#11 token %s", key_type, label, self.token_label)
        return _key_object(self.token, ckid, label, public)

    def _relabel(self, key: Pkcs11EcPrivateKey | Pkcs11RsaPrivateKey, label: str) -> None:
        """Name the token objects after the final key id, so operators can find them."""
        if key.label == label:
            return

        def run(session: Any) -> None:
            for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                session.get_key(object_class=cls, id=key.ckid)[Attribute.LABEL] = label

        try:
            self.token.call(run)
            key.label = label
        except p11e.PKCS11Error as exc:
            # Cosmetic: the reference finds the key by CKA_ID, and some HSMs freeze labels.
            log.info("could not relabel PKCS#11 key %s as %s: %s", key.label, label, type(exc).__name__)

    def _delete(self, key_id: str, ckid: bytes | None, label: str) -> int:
        """Destroy the key pair's objects; how many there were (0: already gone)."""
        match = {Attribute.ID: ckid} if ckid is not None else {Attribute.LABEL: label}

        def run(session: Any) -> int:
            found = [
                obj
                for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)
                for obj in session.get_objects({Attribute.CLASS: cls, **match})  # search ends before destroy
            ]
            destroyed = 0
            for obj in found:
                if obj.object_class == ObjectClass.PRIVATE_KEY:
                    self.token.forget(ckid if ckid is not None else bytes(obj[Attribute.ID]))
                try:
                    obj.destroy()
                    destroyed += 1
                except (p11e.ObjectHandleInvalid, p11e.KeyHandleInvalid):
                    pass  # destroyed meanwhile by another replica sharing the token
            return destroyed

        try:
            return self.token.call(run)
        except p11e.PKCS11Error as exc:
            raise Pkcs11Error(
                f"token {self.token_label!r} could not destroy CA key {key_id} "
                f"({'CKA_ID ' + ckid.hex() if ckid is not None else 'label ' + label}): "
                f"{type(exc).__name__} {exc}"
            ) from None

    def _load(self, ckid: bytes, label: str) -> PrivateKey:
        def run(session: Any) -> Any:
            self.token.private_key(session, ckid)  # present and usable, not just its public half
            return _public_key_of(session, ckid)

        try:
            public = self.token.call(run)
        except p11e.PKCS11Error as exc:
            raise Pkcs11Error(f"token {self.token_label!r}: {type(exc).__name__} {exc}") from None
        return _key_object(self.token, ckid, label, public)

    # -- references -------------------------------------------------------------------------

    def _reference(self, key_id: str, key: PrivateKey) -> bytes:
        assert isinstance(key, Pkcs11EcPrivateKey | Pkcs11RsaPrivateKey)
        ref = {
            "v": REFERENCE_VERSION,
            "manager": self.name,
            "key_id": key_id,
            "token": self.token_label,
            "ckid": key.ckid.hex(),
            "label": key.label,
        }
        return json.dumps(ref, sort_keys=True, separators=(",", ":")).encode()

    def _parse_reference(self, key_id: str, sealed: bytes) -> dict[str, Any]:
        try:
            ref = json.loads(sealed)
        except (ValueError, UnicodeDecodeError):
            ref = None
        if not isinstance(ref, dict) or ref.get("manager") != self.name:
            raise SealError(
                f"CA key {key_id} is not a PKCS#11 reference (was it stored by key_manager disk?)"
            )
        if ref.get("v") != REFERENCE_VERSION:
            raise SealError(f"CA key {key_id}: unknown PKCS#11 reference version {ref.get('v')!r}")
        # Bound to its record like a sealed blob is: a reference moved to another key id is refused.
        if ref.get("key_id") != key_id:
            raise SealError(f"CA key {key_id}: the stored reference belongs to {ref.get('key_id')!r}")
        if ref.get("token") != self.token_label:
            raise SealError(
                f"CA key {key_id} is in token {ref.get('token')!r}, but ca.pkcs11.token_label "
                f"is {self.token_label!r}"
            )
        ckid = ref.get("ckid")
        if not isinstance(ckid, str) or not ckid:
            raise SealError(f"CA key {key_id}: PKCS#11 reference has no CKA_ID")
        try:
            bytes.fromhex(ckid)
        except ValueError:
            raise SealError(f"CA key {key_id}: PKCS#11 reference has a malformed CKA_ID") from None
        return ref
