"""Workload and agent keys are generated on the node and never sent anywhere; only CSRs leave."""

from __future__ import annotations

from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from meshid.certs import authority_key_id, spki_der, subject_key_id
from meshid.errors import MeshidError
from meshid.spiffe_id import SpiffeId
from meshid.tls import spiffe_id_of_cert


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


# Workload SVID key types, by the agent's `workload_x509_svid_key_type` (SPIRE's option of the
# same name; it offers rsa-2048 and ec-p256). The server accepts all of these in CSRs.
WORKLOAD_KEY_TYPES: dict[str, Callable[[], PrivateKeyTypes]] = {
    "ec-p256": new_key,
    "ec-p384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "rsa-2048": lambda: rsa.generate_private_key(65537, 2048),
    "rsa-4096": lambda: rsa.generate_private_key(65537, 4096),
}


def slow_to_generate(key_type: str) -> bool:
    """RSA keys take ~50 ms (2048 bits; 13-112 ms measured) to ~300 ms (4096) each: they are
    made on a thread, not on the event loop that serves the workloads."""
    return key_type.startswith("rsa-")


def csr_for(key: PrivateKeyTypes) -> bytes:
    # The server takes only the public key from a CSR; names come from the entry.
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.DER)


def pkcs8_der(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def chain_der(chain: list[x509.Certificate] | tuple[x509.Certificate, ...]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in chain)


__all__ = [
    "WORKLOAD_KEY_TYPES", "authority_key_id", "chain_der", "csr_for", "new_key", "pkcs8_der",
    "slow_to_generate", "subject_key_id",
]


def issued_svid_problem(
    leaf: x509.Certificate, key: PrivateKeyTypes, now: float
) -> tuple[str, SpiffeId | None]:
    """Why the server's `leaf` cannot be an SVID over our `key` at `now`, or "" and the
    SPIFFE ID it names (the caller checks that ID is the one asked for)."""
    if spki_der(leaf.public_key()) != spki_der(key.public_key()):
        return "for a different key", None
    if leaf.not_valid_after_utc.timestamp() <= now:
        return "that has already expired", None
    try:
        return "", spiffe_id_of_cert(leaf)
    except MeshidError as exc:
        return f"without a usable SPIFFE ID ({exc})", None
