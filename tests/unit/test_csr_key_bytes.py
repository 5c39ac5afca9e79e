"""Differential test: the key bytes taken from a CSR equal cryptography's encoding of its key.

csr_key_bytes.p256_key_bytes may only answer for requests whose key it finds at the
position DER fixes; for every other request it must answer None (the minter then encodes
the key). Inputs are randomized over subjects, attributes (so the request crosses the
127/255-byte length boundaries), key types and point forms, with adversarial requests
that carry a canonical P-256 SubjectPublicKeyInfo of *another* key in their subject or
attributes.
"""

from __future__ import annotations

import datetime as dt
import random

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from issuer.ca import minting, template
from issuer.ca.csr_key_bytes import P256_SPKI_HEAD, p256_key_bytes
from meshid.spiffe_id import SpiffeId, TrustDomain

SEED = 20261123
CASES = 250
DER = serialization.Encoding.DER
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


def _spki_of(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(DER, SPKI)


def _random_csr(rng: random.Random, keys: dict[str, list[object]]) -> tuple[bytes, bool]:
    """(CSR DER, whether it has the shape p256_key_bytes must recognise)."""
    kind = rng.choice(["p256"] * 6 + ["p384", "rsa"])
    key = rng.choice(keys[kind])
    builder = x509.CertificateSigningRequestBuilder()
    names: list[x509.NameAttribute] = []
    victim = _spki_of(rng.choice(keys["p256"]))  # type: ignore[arg-type]
    if rng.random() < 0.4:
        names.append(x509.NameAttribute(NameOID.COMMON_NAME, "x" * rng.randint(1, 60)))
    if rng.random() < 0.2:
        # Another key's canonical SPKI inside the subject: must never be taken for the key.
        names.append(
            x509.NameAttribute(NameOID.X500_UNIQUE_IDENTIFIER, victim, x509.name._ASN1Type.BitString)
        )
    builder = builder.subject_name(x509.Name(names))
    for i in range(rng.choice([0, 0, 1, 2, 5])):
        blob = victim if rng.random() < 0.3 else rng.randbytes(rng.randint(0, 300))
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(f"1.3.6.1.4.1.99999.{i}"), blob), critical=False
        )
    if rng.random() < 0.3:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("d" * rng.randint(1, 200) + ".example")]),
            critical=False,
        )
    der = builder.sign(key, hashes.SHA256()).public_bytes(DER)  # type: ignore[arg-type]
    return der, kind == "p256" and not names


def _compressed_p256_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A v1 CSR with an empty subject whose key is a *compressed* P-256 point."""
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    alg = bytes.fromhex("301306072a8648ce3d020106082a8648ce3d030107")
    spki = template.der_tlv(0x30, alg + template.der_tlv(0x03, b"\x00" + point))
    cri = template.der_tlv(0x30, bytes.fromhex("0201003000") + spki + bytes.fromhex("a000"))
    signature = key.sign(cri, ec.ECDSA(hashes.SHA256()))
    sig_alg = bytes.fromhex("300a06082a8648ce3d040302")
    return template.der_tlv(0x30, cri + sig_alg + template.der_tlv(0x03, b"\x00" + signature))


@pytest.fixture(scope="module")
def keys() -> dict[str, list[object]]:
    return {
        "p256": [ec.generate_private_key(ec.SECP256R1()) for _ in range(12)],
        "p384": [ec.generate_private_key(ec.SECP384R1()) for _ in range(3)],
        "rsa": [rsa.generate_private_key(public_exponent=65537, key_size=2048)],
    }


def test_key_bytes_equal_the_encoder_over_randomized_requests(keys: dict[str, list[object]]) -> None:
    rng = random.Random(SEED)
    recognised = sizes_seen = 0
    header_sizes: set[int] = set()
    for _ in range(CASES):
        der, common_shape = _random_csr(rng, keys)
        csr = x509.load_der_x509_csr(der)
        pub = csr.public_key()
        tbs = csr.tbs_certrequest_bytes
        got = p256_key_bytes(tbs)
        if isinstance(pub, ec.EllipticCurvePublicKey):
            expected = template.ec_spki_and_ski(pub)
        else:
            expected = template.rsa_spki_and_ski(pub)  # type: ignore[arg-type]
        if common_shape:
            assert got == expected
            recognised += 1
            header_sizes.add(2 if tbs[1] < 0x80 else 1 + (tbs[1] & 0x7F) + 1)
        else:
            assert got is None or got == expected
        sizes_seen += 1
    assert recognised > CASES // 3
    assert header_sizes == {2, 3, 4}  # short form, one and two length octets all covered


def test_adversarial_and_other_shapes_are_declined(keys: dict[str, list[object]]) -> None:
    p256 = keys["p256"]
    own, other = p256[0], p256[1]
    victim = _spki_of(other)  # type: ignore[arg-type]
    # Another key's SPKI in the subject: declined (the subject is not empty).
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [x509.NameAttribute(NameOID.X500_UNIQUE_IDENTIFIER, victim, x509.name._ASN1Type.BitString)]
            )
        )
        .sign(own, hashes.SHA256())  # type: ignore[arg-type]
    )
    assert p256_key_bytes(csr.tbs_certrequest_bytes) is None
    # In the attributes (after the real key): the real key is found, never the victim's.
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), victim), False
        )
        .sign(own, hashes.SHA256())  # type: ignore[arg-type]
    )
    assert p256_key_bytes(csr.tbs_certrequest_bytes) == template.ec_spki_and_ski(own.public_key())  # type: ignore[attr-defined]
    # A compressed point: declined; the minter encodes the key (uncompressed, as the builder does).
    compressed = x509.load_der_x509_csr(_compressed_p256_csr(own))  # type: ignore[arg-type]
    assert P256_SPKI_HEAD[:-1] not in compressed.tbs_certrequest_bytes
    assert p256_key_bytes(compressed.tbs_certrequest_bytes) is None
    # Truncated or empty input never matches.
    assert p256_key_bytes(b"") is None
    assert p256_key_bytes(csr.tbs_certrequest_bytes[:40]) is None


def test_minted_leaves_carry_the_csr_key_whichever_way_it_was_found(keys: dict[str, list[object]]) -> None:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = minting.self_signed_ca(ca_key, TrustDomain("example.org"), 3600, now)
    minter = minting.X509Minter(ca_key, ca_cert, [])
    assert minter.fast_path
    sid = SpiffeId.parse("spiffe://example.org/w")
    own = keys["p256"][2]
    plain = (
        x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(own, hashes.SHA256())  # type: ignore[arg-type]
    ).public_bytes(DER)
    compressed = _compressed_p256_csr(own)  # type: ignore[arg-type]
    requests = [minting.LeafRequest(plain, sid), minting.LeafRequest(compressed, sid)]
    for der in [
        *minter.mint_batch_der(requests, now),
        *(minter.mint_der_from_csr(r.csr_der, sid, (), 3600, now) for r in requests),
    ]:
        assert isinstance(der, bytes)
        leaf = x509.load_der_x509_certificate(der)
        assert leaf.public_key().public_bytes(DER, SPKI) == _spki_of(own)  # type: ignore[arg-type]
        ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert ski == x509.SubjectKeyIdentifier.from_public_key(own.public_key())  # type: ignore[attr-defined]
        leaf.verify_directly_issued_by(ca_cert)
