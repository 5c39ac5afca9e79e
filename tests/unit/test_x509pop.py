"""x509pop node attestation (attestors/node/x509pop.py) against hostile node certificates:
refused before a challenge is issued when SPIRE would refuse them."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from attestors.node.base import AttestationRequest
from attestors.node.x509pop import X509PopAttestor, payload_for, sign_challenge
from meshid.errors import AttestationError
from meshid.spiffe_id import TrustDomain
from meshid.tls import pem_chain

TD = TrustDomain("example.org")
NOW = dt.datetime.now(dt.UTC)


def _usage(digital_signature: bool = False, key_encipherment: bool = False, cert_sign: bool = False
           ) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature, False, key_encipherment, False, False, cert_sign, cert_sign,
                         False, False)


def _cert(cn: str, pub: Any, issuer_key: Any, issuer: x509.Name, usage: x509.KeyUsage | None,
          ca: bool = False) -> x509.Certificate:
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])).issuer_name(issuer)
         .public_key(pub).serial_number(x509.random_serial_number())
         .not_valid_before(NOW - dt.timedelta(hours=1)).not_valid_after(NOW + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
    else:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False)
    if usage is not None:
        b = b.add_extension(usage, critical=True)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture
def pki(tmp_path: Path) -> tuple[X509PopAttestor, x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node ca")])
    ca = _cert("node ca", ca_key.public_key(), ca_key, name, _usage(cert_sign=True), ca=True)
    (tmp_path / "ca.pem").write_bytes(pem_chain([ca]))
    return X509PopAttestor(str(tmp_path / "ca.pem")), ca, ca_key


async def _attest(attestor: X509PopAttestor, chain: list[x509.Certificate], key: Any) -> str:
    req = AttestationRequest("x509pop", payload_for(chain), "10.0.0.1")
    challenge = await attestor.challenge(req)
    assert challenge is not None
    result = await attestor.attest(replace(req, challenge_response=sign_challenge(key, challenge.nonce)),
                                   TD, challenge)
    return str(result.agent_id)


async def test_a_node_certificate_for_signing_attests(pki: Any) -> None:
    attestor, ca, ca_key = pki
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("node-1", key.public_key(), ca_key, ca.subject, _usage(digital_signature=True))
    assert (await _attest(attestor, [leaf], key)).startswith("spiffe://example.org/meshid/agent/x509pop/")


@pytest.mark.parametrize("usage", [None, _usage(key_encipherment=True), _usage(cert_sign=True)],
                         ids=["no-key-usage", "key-encipherment-only", "cert-sign-only"])
async def test_a_certificate_not_meant_for_signing_gets_no_challenge(pki: Any, usage: Any) -> None:
    """SPIRE refuses a node certificate whose keyUsage lacks digitalSignature before it
    challenges; meshid accepted any (the node CA's own certificate as a node, say)."""
    attestor, ca, ca_key = pki
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("node-1", key.public_key(), ca_key, ca.subject, usage)
    with pytest.raises(AttestationError, match="digitalSignature"):
        await attestor.challenge(AttestationRequest("x509pop", payload_for([leaf]), "10.0.0.1"))


async def test_the_node_ca_itself_is_not_a_node(pki: Any) -> None:
    attestor, ca, ca_key = pki
    with pytest.raises(AttestationError, match="digitalSignature"):
        await _attest(attestor, [ca], ca_key)


async def test_a_key_the_proof_cannot_use_gets_no_challenge(pki: Any) -> None:
    """An Ed25519 node key was challenged, then refused at the answer: a round trip (and a
    session held for a minute) for an attestation that could not succeed."""
    attestor, ca, ca_key = pki
    leaf = _cert("node-1", ed25519.Ed25519PrivateKey.generate().public_key(), ca_key, ca.subject,
                 _usage(digital_signature=True))
    with pytest.raises(AttestationError, match="unsupported node key type"):
        await attestor.challenge(AttestationRequest("x509pop", payload_for([leaf]), "10.0.0.1"))


async def test_the_ca_bundle_file_is_followed_and_a_bad_one_keeps_the_last_good(
    pki: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rotated CA file is picked up; one that cannot be read keeps the CAs loaded before
    (the attesting node was told the server's read error, with the file's path)."""
    attestor, ca, ca_key = pki
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("node-1", key.public_key(), ca_key, ca.subject, _usage(digital_signature=True))
    bundle = tmp_path / "ca.pem"
    for broken in (b"not a PEM", None):
        if broken is None:
            bundle.unlink()
        else:
            bundle.write_bytes(broken)
        with caplog.at_level(logging.WARNING, "meshid.attestors.x509pop"):
            assert (await _attest(attestor, [leaf], key)).startswith("spiffe://example.org/")
        assert "keeping the CAs loaded before" in caplog.text

    other_key = ec.generate_private_key(ec.SECP256R1())
    other_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "next node ca")])
    other = _cert("next node ca", other_key.public_key(), other_key, other_name, _usage(cert_sign=True),
                  ca=True)
    bundle.write_bytes(pem_chain([other]))
    with pytest.raises(AttestationError, match="does not chain"):
        await _attest(attestor, [leaf], key)
    next_leaf = _cert("node-2", key.public_key(), other_key, other.subject, _usage(digital_signature=True))
    assert (await _attest(attestor, [next_leaf], key)).startswith("spiffe://example.org/")
