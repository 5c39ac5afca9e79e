"""x509pop node attestation: the node proves possession of a key whose certificate
chains to a configured CA, by signing a server nonce.

Selectors as SPIRE spells them: `x509pop:subject:cn:<cn>`, `x509pop:ca:fingerprint:<sha1>`
(one per CA certificate in the verified chain), `x509pop:serialnumber:<hex>`.
Agent ID: `spiffe://<td>/meshid/agent/x509pop/<sha1 fingerprint of the leaf>`.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509 import verification

from attestors.node.base import AttestationRequest, AttestationResult, Challenge, agent_id
from meshid.errors import AttestationError, ConfigError
from meshid.selector import Selector
from meshid.spiffe_id import TrustDomain

log = logging.getLogger("meshid.attestors.x509pop")

NAME = "x509pop"
MAX_CHAIN = 5
NONCE_BYTES = 32


def _fingerprint(cert: x509.Certificate) -> str:
    # SHA-1 fingerprints are identifiers here (as in SPIRE), not a security boundary.
    return cert.fingerprint(hashes.SHA1()).hex()


def sign_challenge(key: PrivateKeyTypes, nonce: bytes) -> bytes:
    """Agent side: prove possession of the node key."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(nonce, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(
            nonce, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256()
        )
    raise AttestationError("unsupported node key type")


def _check_node_key(leaf: x509.Certificate) -> None:
    """Refuse, before any challenge, a node certificate whose key is not meant for signing
    (as SPIRE: keyUsage present with digitalSignature) or of a type the proof cannot use.
    A CA certificate (keyCertSign only) or a key-encipherment-only certificate was accepted,
    and an Ed25519/DSA node got a challenge it could never answer."""
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    except ValueError:  # a duplicate or malformed extension
        raise AttestationError("node certificate has malformed extensions") from None
    if usage is None or not usage.digital_signature:
        raise AttestationError("node certificate's key usage does not include digitalSignature")
    try:
        pub = leaf.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise AttestationError("node certificate's public key cannot be loaded") from None
    if not isinstance(pub, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise AttestationError("unsupported node key type (x509pop needs an EC or RSA key)")


def payload_for(chain: Sequence[x509.Certificate]) -> dict[str, list[str]]:
    return {"chain": [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in chain]}


class X509PopAttestor:
    name = NAME

    def __init__(
        self,
        ca_bundle_path: str,
        path_template: str = "fingerprint",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if path_template not in ("fingerprint", "subject_cn"):
            raise ConfigError("node_attestors.x509pop.agent_path_template: fingerprint or subject_cn")
        self._bundle_path = Path(ca_bundle_path)
        self._template = path_template
        self._clock = clock
        # The CAs as last loaded, and the file version they came from: a rotated bundle file is
        # picked up, and one that cannot be read keeps the last good CAs (an attesting node
        # was told the server's own read error, file path included).
        self._loaded: tuple[tuple[int, int, int], list[x509.Certificate]] | None = None
        self._load_error = ""
        self._roots()  # fail at start-up, not on first attestation

    def _roots(self) -> list[x509.Certificate]:
        try:
            st = self._bundle_path.stat()
            version = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._loaded is not None and self._loaded[0] == version:
                return self._loaded[1]
            roots = x509.load_pem_x509_certificates(self._bundle_path.read_bytes())
        except (OSError, ValueError) as exc:
            problem = f"node_attestors.x509pop.ca_bundle_path: cannot load CAs: {exc}"
            if self._loaded is None:
                raise ConfigError(problem) from None
            if problem != self._load_error:
                log.warning("%s; keeping the CAs loaded before", problem)
            self._load_error = problem
            return self._loaded[1]
        if self._loaded is not None:
            log.info("node_attestors.x509pop.ca_bundle_path: %d CA(s) loaded from the changed file",
                     len(roots))
        self._loaded, self._load_error = (version, roots), ""
        return roots

    def _chain(self, request: AttestationRequest) -> list[x509.Certificate]:
        raw = request.payload.get("chain")
        if not isinstance(raw, list) or not raw or len(raw) > MAX_CHAIN:
            raise AttestationError(f"x509pop payload needs a chain of 1..{MAX_CHAIN} certificates")
        try:
            return [x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in raw]
        except (ValueError, TypeError):
            raise AttestationError("x509pop chain holds a malformed certificate") from None

    async def challenge(self, request: AttestationRequest) -> Challenge | None:
        chain = self._chain(request)
        _check_node_key(chain[0])
        self._verify(chain)
        return Challenge(secrets.token_bytes(NONCE_BYTES), {"chain": request.payload["chain"]})

    def _verify(self, chain: list[x509.Certificate]) -> list[x509.Certificate]:
        now = dt.datetime.fromtimestamp(self._clock(), dt.UTC)
        store = verification.Store(self._roots())
        verifier = (
            verification.PolicyBuilder()
            .store(store)
            .time(now)
            .extension_policies(
                ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=verification.ExtensionPolicy.permit_all(),
            )
            .build_client_verifier()
        )
        try:
            verified = verifier.verify(chain[0], chain[1:])
        except verification.VerificationError as exc:
            raise AttestationError(f"node certificate does not chain to a trusted CA: {exc}") from None
        return list(verified.chain)

    async def attest(
        self, request: AttestationRequest, trust_domain: TrustDomain, challenge: Challenge | None
    ) -> AttestationResult:
        if challenge is None or request.challenge_response is None:
            raise AttestationError("x509pop requires a signed challenge")
        if challenge.state.get("chain") != request.payload.get("chain"):
            raise AttestationError("x509pop chain changed between challenge and response")
        chain = self._chain(request)
        _check_node_key(chain[0])
        verified = self._verify(chain)
        leaf = chain[0]
        pub = leaf.public_key()
        try:
            if isinstance(pub, ec.EllipticCurvePublicKey):
                pub.verify(request.challenge_response, challenge.nonce, ec.ECDSA(hashes.SHA256()))
            elif isinstance(pub, rsa.RSAPublicKey):
                pub.verify(
                    request.challenge_response,
                    challenge.nonce,
                    padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                    hashes.SHA256(),
                )
            else:
                raise AttestationError("unsupported node key type")
        except InvalidSignature:
            raise AttestationError("x509pop challenge signature is invalid") from None
        selectors: list[Selector] = [Selector(NAME, f"serialnumber:{leaf.serial_number:x}")]
        cns = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else ""
        if cn:
            selectors.append(Selector(NAME, f"subject:cn:{cn}"))
        for ca in verified[1:]:
            selectors.append(Selector(NAME, f"ca:fingerprint:{_fingerprint(ca)}"))
        if self._template == "subject_cn" and cn:
            aid = agent_id(trust_domain, NAME, cn)
        else:
            aid = agent_id(trust_domain, NAME, _fingerprint(leaf))
        return AttestationResult(aid, tuple(sorted(set(selectors))), can_reattest=True)
