"""X509-SVIDs, CA certificates and JWT-SVIDs against the SPIFFE rules (SPEC-PROTOCOLS §2)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from issuer.ca import keys, minting, template
from issuer.ca.minting import InvalidCsrError, SigningError, X509Minter
from meshid.errors import InvalidSpiffeIdError, MeshidError
from meshid.spiffe_id import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
WORKLOAD = SpiffeId.parse("spiffe://example.org/ns/prod/sa/web")
NOW = dt.datetime(2031, 3, 4, 5, 6, 7, 891011, tzinfo=dt.UTC)
NOW_S = NOW.replace(microsecond=0)
DER = serialization.Encoding.DER


def _csr(key, *, subject=None, sans=None, hash_alg=None, rsa_padding=None) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return b.sign(key, None).public_bytes(DER)
    kwargs = {"rsa_padding": rsa_padding} if rsa_padding is not None else {}
    return b.sign(key, hash_alg or hashes.SHA256(), **kwargs).public_bytes(DER)


@pytest.fixture(scope="module")
def ca_key():
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ca_cert(ca_key):
    return minting.self_signed_ca(ca_key, TD, 24 * 3600, NOW - dt.timedelta(hours=1))


@pytest.fixture(scope="module")
def minter(ca_key, ca_cert):
    m = X509Minter(ca_key, ca_cert, [])
    assert m.fast_path
    return m


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _ext(cert, cls):
    return cert.extensions.get_extension_for_class(cls)


def _check_leaf(cert, ca_cert, spiffe_id, dns=(), rsa_leaf=False):
    """Every SPEC §2 X509-SVID rule."""
    cert.verify_directly_issued_by(ca_cert)
    assert cert.version is x509.Version.v3
    san = _ext(cert, x509.SubjectAlternativeName)
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [str(spiffe_id)]
    assert san.value.get_values_for_type(x509.DNSName) == list(dns)
    assert len(list(san.value)) == 1 + len(dns)
    # Subject is empty, so the SAN must be critical.
    assert cert.subject == x509.Name([])
    assert san.critical
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False and bc.value.path_length is None
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert ku.value.key_encipherment is rsa_leaf
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    assert not ku.value.content_commitment and not ku.value.data_encipherment
    eku = _ext(cert, x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    ski = _ext(cert, x509.SubjectKeyIdentifier)
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    aki = _ext(cert, x509.AuthorityKeyIdentifier)
    assert aki.value.key_identifier == _ext(ca_cert, x509.SubjectKeyIdentifier).value.digest
    assert cert.issuer == ca_cert.subject
    assert 0 < cert.serial_number < 2**127
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc


# --------------------------------------------------------------------------- X509-SVIDs


def test_leaf_follows_spec(minter, ca_cert):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = minter.mint_from_csr(_csr(key), WORKLOAD, [], 3600, NOW)
    _check_leaf(cert, ca_cert, WORKLOAD)
    assert cert.public_key() == key.public_key()
    assert cert.not_valid_before_utc == NOW_S - dt.timedelta(seconds=10)
    assert cert.not_valid_after_utc == NOW_S + dt.timedelta(seconds=3600)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)


def test_leaf_with_dns_names_and_rsa_key(minter, ca_cert, rsa_key):
    dns = ["web.example.org", "web"]
    cert = minter.mint_from_csr(_csr(rsa_key), WORKLOAD, dns, 600, NOW)
    _check_leaf(cert, ca_cert, WORKLOAD, dns, rsa_leaf=True)


@pytest.mark.parametrize("curve", [ec.SECP384R1(), ec.SECP521R1()])
def test_leaf_other_curves(minter, ca_cert, curve):
    key = ec.generate_private_key(curve)
    cert = minter.mint_from_csr(_csr(key, hash_alg=hashes.SHA384()), WORKLOAD, [], 600, NOW)
    _check_leaf(cert, ca_cert, WORKLOAD)
    assert cert.public_key() == key.public_key()


def test_lifetime_clamped_to_ca_not_after(minter, ca_cert):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = minter.mint_from_csr(_csr(key), WORKLOAD, [], 10 * 24 * 3600, NOW)
    assert cert.not_valid_after_utc == ca_cert.not_valid_after_utc
    assert cert.not_valid_before_utc == NOW_S - dt.timedelta(seconds=minting.BACKDATE_SECONDS)


def test_not_before_never_precedes_ca(ca_key):
    ca = minting.self_signed_ca(ca_key, TD, 3600, NOW)
    cert = X509Minter(ca_key, ca).mint_from_public_key(
        ec.generate_private_key(ec.SECP256R1()).public_key(), WORKLOAD, [], 60, NOW
    )
    assert cert.not_valid_before_utc == ca.not_valid_before_utc


def test_naive_now_is_utc(minter):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = minter.mint_from_csr(_csr(key), WORKLOAD, [], 60, NOW.replace(tzinfo=None))
    assert cert.not_valid_before_utc == NOW_S - dt.timedelta(seconds=10)


def test_csr_names_are_ignored(minter, ca_cert):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = _csr(
        key,
        subject=x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "admin"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil"),
            ]
        ),
        sans=[
            x509.UniformResourceIdentifier("spiffe://example.org/admin"),
            x509.UniformResourceIdentifier("spiffe://evil.org/x"),
            x509.DNSName("evil.example.com"),
        ],
    )
    cert = minter.mint_from_csr(csr, WORKLOAD, [], 60, NOW)
    _check_leaf(cert, ca_cert, WORKLOAD)
    assert cert.subject == x509.Name([])


def test_every_serial_differs(minter):
    key = ec.generate_private_key(ec.SECP256R1())
    csr = _csr(key)
    serials = {minter.mint_from_csr(csr, WORKLOAD, [], 60, NOW).serial_number for _ in range(300)}
    assert len(serials) == 300


def test_bad_csr_signature_refused(minter):
    csr = bytearray(_csr(ec.generate_private_key(ec.SECP256R1())))
    csr[-1] ^= 0x01  # last byte of the ECDSA signature's s value
    with pytest.raises(InvalidCsrError, match="signature is not valid") as exc:
        minter.mint_from_csr(bytes(csr), WORKLOAD, [], 60, NOW)
    assert isinstance(exc.value, MeshidError)


def test_bad_rsa_csr_signature_refused(minter, rsa_key):
    csr = bytearray(_csr(rsa_key))
    csr[-5] ^= 0x80
    with pytest.raises(InvalidCsrError, match="signature is not valid"):
        minter.mint_from_csr(bytes(csr), WORKLOAD, [], 60, NOW)


@pytest.mark.parametrize("garbage", [b"", b"\x00", b"not a csr at all", b"\x30\x82\xff\xff" + b"\x00" * 10])
def test_garbage_der_refused(minter, garbage):
    with pytest.raises(InvalidCsrError, match="not a valid DER"):
        minter.mint_from_csr(garbage, WORKLOAD, [], 60, NOW)


def test_truncated_and_pem_csr_refused(minter):
    csr = _csr(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(InvalidCsrError):
        minter.mint_from_csr(csr[:-10], WORKLOAD, [], 60, NOW)
    pem = x509.load_der_x509_csr(csr).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidCsrError):
        minter.mint_from_csr(pem, WORKLOAD, [], 60, NOW)
    with pytest.raises(InvalidCsrError, match="larger than"):
        minter.mint_from_csr(b"\x30" * (minting.MAX_CSR_BYTES + 1), WORKLOAD, [], 60, NOW)


def test_unsupported_keys_refused(minter):
    with pytest.raises(InvalidCsrError, match="unsupported key type"):
        minter.mint_from_csr(_csr(ed25519.Ed25519PrivateKey.generate()), WORKLOAD, [], 60, NOW)
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(InvalidCsrError, match="1024 bits"):
        minter.mint_from_csr(_csr(small), WORKLOAD, [], 60, NOW)
    with pytest.raises(InvalidCsrError, match="curve"):
        minter.mint_from_csr(_csr(ec.generate_private_key(ec.SECP256K1())), WORKLOAD, [], 60, NOW)


def test_weak_csr_hash_refused(minter, tmp_path):
    # cryptography will not sign with SHA-1, so the openssl CLI makes the request.
    key = ec.generate_private_key(ec.SECP256R1())
    key_file = tmp_path / "k.pem"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    out = tmp_path / "sha1.csr"
    cmd = [
        "openssl",
        "req",
        "-new",
        "-key",
        str(key_file),
        "-sha1",
        "-subj",
        "/CN=x",
        "-outform",
        "DER",
        "-out",
        str(out),
    ]
    if shutil.which("openssl") is None or subprocess.run(cmd, capture_output=True).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("openssl cannot make a SHA-1 CSR here")  # CI must run this test
        pytest.skip("openssl cannot make a SHA-1 CSR here")
    with pytest.raises(InvalidCsrError, match="not accepted"):
        minter.mint_from_csr(out.read_bytes(), WORKLOAD, [], 60, NOW)


def test_rsa_pss_csr_accepted(minter, ca_cert, rsa_key):
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    cert = minter.mint_from_csr(_csr(rsa_key, rsa_padding=pss), WORKLOAD, [], 60, NOW)
    _check_leaf(cert, ca_cert, WORKLOAD, rsa_leaf=True)


_SHA256_OID_DER = bytes.fromhex("0609608648016503040201")  # 2.16.840.1.101.3.4.2.1


def test_rsa_pss_csr_with_unknown_hash_is_invalid_csr(minter, rsa_key):
    """PSS parameters naming a hash cryptography does not know raised UnsupportedAlgorithm
    (not a ValueError): a 500 with a traceback from the unauthenticated attest call, and a
    whole sign batch lost to one such CSR. It is an InvalidCsrError, for that CSR alone."""
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    good = _csr(rsa_key, rsa_padding=pss)
    # The algorithm identifier is outside the signed part: 2.16.840.1.101.3.4.2.99 is no hash.
    bad = good.replace(_SHA256_OID_DER, _SHA256_OID_DER[:-1] + b"\x63")
    assert bad != good
    with pytest.raises(InvalidCsrError, match="PSS"):
        minting.load_csr_public_key(bad)
    with pytest.raises(InvalidCsrError, match="PSS"):
        minter.mint_from_csr(bad, WORKLOAD, [], 60, NOW)
    for fast in (True, False):
        m = minter if fast else X509Minter(minter.ca_key, minter.ca_cert, fast_path=False)
        out = m.mint_batch_der([minting.LeafRequest(good, WORKLOAD), minting.LeafRequest(bad, WORKLOAD)], NOW)
        assert isinstance(out[0], bytes) and isinstance(out[1], InvalidCsrError)


def test_identity_checks(minter):
    pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(InvalidSpiffeIdError, match="trust domain"):
        minter.mint_from_public_key(pub, "spiffe://other.org/w", [], 60, NOW)
    with pytest.raises(InvalidSpiffeIdError, match="no path"):
        minter.mint_from_public_key(pub, TD.id, [], 60, NOW)
    with pytest.raises(InvalidSpiffeIdError):
        minter.mint_from_public_key(pub, "spiffe://example.org/a//b", [], 60, NOW)
    with pytest.raises(ValueError, match="ASCII"):
        minter.mint_from_public_key(pub, WORKLOAD, ["bücher.example"], 60, NOW)
    with pytest.raises(ValueError, match="ttl"):
        minter.mint_from_public_key(pub, WORKLOAD, [], 0, NOW)
    with pytest.raises(TypeError):
        minter.mint_from_public_key(pub, WORKLOAD, [], 60)


def test_string_id_accepted(minter, ca_cert):
    pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    cert = minter.mint_from_public_key(pub, str(WORKLOAD), ("a.example",), 60, NOW)
    _check_leaf(cert, ca_cert, WORKLOAD, ["a.example"])


def test_expired_ca_refuses(minter, ca_cert):
    pub = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(SigningError, match="expired"):
        minter.mint_from_public_key(pub, WORKLOAD, [], 60, ca_cert.not_valid_after_utc)


def test_ca_own_key_refused(minter, ca_key):
    with pytest.raises(SigningError, match="own key"):
        minter.mint_from_public_key(ca_key.public_key(), WORKLOAD, [], 60, NOW)


def test_mismatched_ca_key_refused(ca_cert):
    with pytest.raises(SigningError, match="does not match"):
        X509Minter(ec.generate_private_key(ec.SECP256R1()), ca_cert)


@pytest.mark.parametrize("kt", list(keys.KeyType))
def test_fast_path_and_builder_agree_for_every_ca_type(kt, rsa_key):
    ca_key = keys.generate_private_key(kt)
    ca = minting.self_signed_ca(ca_key, TD, 3600, NOW)
    fast, slow = X509Minter(ca_key, ca), X509Minter(ca_key, ca, fast_path=False)
    assert fast.fast_path and not slow.fast_path
    for leaf_key in (ec.generate_private_key(ec.SECP256R1()), rsa_key):
        csr = _csr(leaf_key)
        a = fast.mint_from_csr(csr, WORKLOAD, ["x.example"], 600, NOW)
        b = slow.mint_from_csr(csr, WORKLOAD, ["x.example"], 600, NOW)
        for cert in (a, b):
            _check_leaf(cert, ca, WORKLOAD, ["x.example"], rsa_leaf=leaf_key is rsa_key)
        # Same certificate apart from serial and signature.
        assert list(a.extensions) == list(b.extensions)
        assert (a.not_valid_before_utc, a.not_valid_after_utc) == (
            b.not_valid_before_utc,
            b.not_valid_after_utc,
        )
        assert a.signature_algorithm_oid == b.signature_algorithm_oid


def test_a_self_signed_ca_is_left_out_of_svid_chains(ca_key, ca_cert):
    """SPEC §1: x509_svid is the leaf then intermediates. A self-signed CA is a root (it is
    in the bundle); SPIRE sends the leaf alone then. A CA under an upstream stays in, even
    when the upstream is a root (no upstream chain)."""
    from issuer.ca.slots import LoadedKey, svid_chain

    m = X509Minter(ca_key, ca_cert, [])
    assert m.chain_der_parts == ()
    workload_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = m.mint_der_from_public_key(workload_key, WORKLOAD, [], 60, NOW)
    assert m.chain_der(der) == der
    leaf = x509.load_der_x509_certificate(der)
    assert list(svid_chain(LoadedKey(None, ca_key, ca_cert), leaf)) == [leaf]  # type: ignore[arg-type]

    root_key = ec.generate_private_key(ec.SECP256R1())
    root = minting.self_signed_ca(root_key, TD, 7200, NOW - dt.timedelta(hours=1))
    under_root = minting.mint_ca_cert(ca_key.public_key(), TD, root_key, 3600, NOW, root)
    assert X509Minter(ca_key, under_root, []).chain_der_parts == (under_root.public_bytes(DER),)
    assert list(svid_chain(LoadedKey(None, ca_key, under_root), leaf)) == [leaf, under_root]  # type: ignore[arg-type]


def test_chain_der(minter, ca_cert):
    upstream = minting.self_signed_ca(ec.generate_private_key(ec.SECP256R1()), TD, 3600, NOW)
    m = X509Minter(minter.ca_key, ca_cert, [upstream])
    der = m.mint_der_from_public_key(
        ec.generate_private_key(ec.SECP256R1()).public_key(), WORKLOAD, [], 60, NOW
    )
    chain = m.chain_der(der)
    assert chain == der + ca_cert.public_bytes(DER) + upstream.public_bytes(DER)
    leaf = x509.load_der_x509_certificate(der)
    assert minting.chain_der(leaf, [ca_cert, upstream]) == chain
    assert x509.load_pem_x509_certificates(minting.chain_pem(leaf, [ca_cert])) == [leaf, ca_cert]


@pytest.mark.parametrize("fast", [True, False])
def test_batch_keeps_order_and_reports_each_refusal(ca_key, ca_cert, rsa_key, fast):
    m = X509Minter(ca_key, ca_cert, fast_path=fast)
    assert m.fast_path is fast
    good = ec.generate_private_key(ec.SECP256R1())
    bad_sig = bytearray(_csr(good))
    bad_sig[-1] ^= 1
    requests = [
        minting.LeafRequest(_csr(good), WORKLOAD, ["a.example"], 600),
        minting.LeafRequest(b"garbage", WORKLOAD),
        minting.LeafRequest(_csr(rsa_key), "spiffe://example.org/other"),
        minting.LeafRequest(bytes(bad_sig), WORKLOAD),
        minting.LeafRequest(_csr(good), "spiffe://elsewhere.org/x"),
        minting.LeafRequest(_csr(good), WORKLOAD, (), 0),
    ]
    out = m.mint_batch(requests, NOW)
    assert len(out) == len(requests)
    first, garbage, other, bad, foreign, zero_ttl = out
    assert isinstance(first, x509.Certificate)
    _check_leaf(first, ca_cert, WORKLOAD, ["a.example"])
    assert first.not_valid_after_utc == NOW_S + dt.timedelta(seconds=600)
    assert isinstance(other, x509.Certificate)
    _check_leaf(other, ca_cert, SpiffeId.parse("spiffe://example.org/other"), rsa_leaf=True)
    assert isinstance(garbage, InvalidCsrError)
    assert isinstance(bad, InvalidCsrError)
    assert isinstance(foreign, InvalidSpiffeIdError)
    assert isinstance(zero_ttl, ValueError)
    assert m.mint_batch([], NOW) == []


def test_batch_leaves_follow_spec_with_distinct_serials(minter, ca_cert):
    keys_ = [ec.generate_private_key(ec.SECP256R1()) for _ in range(40)]
    requests = [
        minting.LeafRequest(_csr(k), WORKLOAD, ["a.example"] if i % 2 else (), 600)
        for i, k in enumerate(keys_)
    ]
    out = minter.mint_batch(requests, NOW)
    assert len({c.serial_number for c in out}) == len(out)
    for i, (cert, key) in enumerate(zip(out, keys_, strict=True)):
        _check_leaf(cert, ca_cert, WORKLOAD, ["a.example"] if i % 2 else ())
        assert cert.public_key() == key.public_key()


def test_batch_reports_a_bad_csr_before_a_bad_identity(minter):
    bad_sig = bytearray(_csr(ec.generate_private_key(ec.SECP256R1())))
    bad_sig[-1] ^= 1
    good = _csr(ec.generate_private_key(ec.SECP256R1()))
    unsupported = _csr(ed25519.Ed25519PrivateKey.generate())
    out = minter.mint_batch_der(
        [
            minting.LeafRequest(good, WORKLOAD),
            minting.LeafRequest(bytes(bad_sig), "spiffe://elsewhere.org/x"),
            minting.LeafRequest(unsupported, "spiffe://elsewhere.org/x"),
            minting.LeafRequest(good, "spiffe://elsewhere.org/x"),
            minting.LeafRequest(good, WORKLOAD),
        ],
        NOW,
    )
    assert isinstance(out[0], bytes) and isinstance(out[4], bytes)
    assert isinstance(out[1], InvalidCsrError) and "signature" in str(out[1])
    assert isinstance(out[2], InvalidCsrError) and "unsupported key type" in str(out[2])
    assert isinstance(out[3], InvalidSpiffeIdError)


def test_batch_serial_contents_are_minimal_positive_127_bit(monkeypatch):
    crafted = [
        bytes(16),  # zero: replaced by a fresh serial
        b"\x00\x7f" + b"\x11" * 14,  # leading 0x00 not needed: dropped
        b"\x80" + b"\x22" * 15,  # top bit cleared, which leaves a 0x00 to drop
        b"\x00\x80" + b"\x33" * 14,  # this 0x00 is needed (positive INTEGER)
        b"\xff" * 16,
    ]
    real = minting.os.urandom
    calls = []

    def urandom(n):
        calls.append(n)
        return b"".join(crafted) if len(calls) == 1 else real(n)

    monkeypatch.setattr(minting.os, "urandom", urandom)
    contents = minting.random_serial_contents(len(crafted))
    assert len(contents) == len(crafted)
    values = [int.from_bytes(c, "big") for c in contents]
    for c, v in zip(contents, values, strict=True):
        assert 0 < v < 2**127
        assert c == template.serial_content(v)  # minimal DER INTEGER content
    assert values[1:] == [int.from_bytes(c, "big") & (2**127 - 1) for c in crafted[1:]]


# --------------------------------------------------------------------------- CA certificates


def _check_ca(cert, td):
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    uris = _ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [f"spiffe://{td}"]  # a CA's SPIFFE ID has no path
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == str(cert.serial_number)


def test_self_signed_ca(ca_key):
    ca = minting.self_signed_ca(ca_key, TD, 24 * 3600, NOW)
    _check_ca(ca, TD)
    ca.verify_directly_issued_by(ca)
    assert ca.issuer == ca.subject
    assert ca.not_valid_before_utc == NOW_S - dt.timedelta(seconds=10)
    assert ca.not_valid_after_utc == NOW_S + dt.timedelta(hours=24)
    assert (
        _ext(ca, x509.AuthorityKeyIdentifier).value.key_identifier
        == _ext(ca, x509.SubjectKeyIdentifier).value.digest
    )
    assert minting.trust_domain_of(ca) == TD
    # Distinct subjects per CA generation.
    assert minting.self_signed_ca(ca_key, TD, 3600, NOW).subject != ca.subject


def test_p384_ca_signs_with_sha384():
    key = ec.generate_private_key(ec.SECP384R1())
    ca = minting.self_signed_ca(key, TD, 3600, NOW)
    assert isinstance(ca.signature_hash_algorithm, hashes.SHA384)
    leaf = X509Minter(key, ca).mint_from_public_key(
        ec.generate_private_key(ec.SECP256R1()).public_key(), WORKLOAD, [], 60, NOW
    )
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA384)
    leaf.verify_directly_issued_by(ca)


def test_ca_signed_by_issuer_is_clamped(ca_key, ca_cert):
    sub_key = ec.generate_private_key(ec.SECP256R1())
    sub = minting.mint_ca_cert(sub_key.public_key(), TD, ca_key, 10 * 24 * 3600, NOW, issuer=ca_cert)
    _check_ca(sub, TD)
    sub.verify_directly_issued_by(ca_cert)
    assert sub.not_valid_after_utc == ca_cert.not_valid_after_utc
    assert _ext(sub, x509.AuthorityKeyIdentifier).value.key_identifier == minting.key_identifier(ca_cert)
    with pytest.raises(SigningError, match="does not match"):
        minting.mint_ca_cert(sub_key.public_key(), TD, sub_key, 60, NOW, issuer=ca_cert)
    with pytest.raises(SigningError, match="own key"):
        minting.mint_ca_cert(sub_key.public_key(), TD, ca_key, 60, NOW)


def test_build_ca_csr(ca_key):
    der = minting.build_ca_csr(ca_key, TD)
    csr, pub = minting.parse_csr(der)
    assert csr.is_signature_valid
    assert pub == ca_key.public_key()
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    assert csr.subject == minting.ca_subject()


# --------------------------------------------------------------------------- JWT-SVIDs


@pytest.mark.parametrize(
    ("kt", "alg"),
    [(keys.KeyType.EC_P256, "ES256"), (keys.KeyType.EC_P384, "ES384"), (keys.KeyType.RSA_2048, "RS256")],
)
def test_jwt_svid(kt, alg):
    key = keys.generate_private_key(kt)
    kid = keys.key_id_for(key)
    token = minting.mint_jwt_svid(key, kid, WORKLOAD, ["spiffe://example.org/db", "aud2"], 300, NOW)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": alg, "kid": kid, "typ": "JWT"}
    claims = jwt.decode(
        token,
        key.public_key(),
        algorithms=[alg],
        audience="aud2",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims == {
        "sub": str(WORKLOAD),
        "aud": ["spiffe://example.org/db", "aud2"],
        "exp": int(NOW.timestamp()) + 300,
        "iat": int(NOW.timestamp()),
    }


def test_jwt_verifies_now_with_issuer_and_pss():
    key = keys.generate_private_key(keys.KeyType.RSA_2048)
    now = dt.datetime.now(dt.UTC)
    token = minting.mint_jwt_svid(
        key, "k1", WORKLOAD, ["a"], 60, now, issuer="https://oidc.example", alg="PS256"
    )
    claims = jwt.decode(
        token, key.public_key(), algorithms=["PS256"], audience="a", issuer="https://oidc.example"
    )
    assert claims["sub"] == str(WORKLOAD)


def test_jwt_exp_clamped_to_key():
    key = keys.generate_private_key(keys.KeyType.EC_P256)
    limit = NOW + dt.timedelta(seconds=42)
    token = minting.mint_jwt_svid(key, "k", WORKLOAD, ["a"], 300, NOW, key_not_after=limit)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] == int(limit.timestamp())
    with pytest.raises(SigningError):
        minting.mint_jwt_svid(key, "k", WORKLOAD, ["a"], 300, NOW, key_not_after=NOW)


@pytest.mark.parametrize("audience", [[], (), [""], "single-string"])
def test_jwt_bad_audience_refused(audience):
    key = keys.generate_private_key(keys.KeyType.EC_P256)
    with pytest.raises(ValueError, match="audience"):
        minting.mint_jwt_svid(key, "k", WORKLOAD, audience, 300, NOW)


def test_jwt_refusals():
    key = keys.generate_private_key(keys.KeyType.EC_P256)
    with pytest.raises(ValueError, match="kid"):
        minting.mint_jwt_svid(key, "", WORKLOAD, ["a"], 300, NOW)
    for alg in ("ES384", "RS256", "HS256", "none"):
        with pytest.raises(ValueError, match="does not fit"):
            minting.mint_jwt_svid(key, "k", WORKLOAD, ["a"], 300, NOW, alg=alg)
    rsa_key = keys.generate_private_key(keys.KeyType.RSA_2048)
    with pytest.raises(ValueError, match="does not fit"):
        minting.mint_jwt_svid(rsa_key, "k", WORKLOAD, ["a"], 300, NOW, alg="HS256")
    with pytest.raises(ValueError, match="ttl"):
        minting.mint_jwt_svid(key, "k", WORKLOAD, ["a"], 0, NOW)


@pytest.mark.parametrize("fast", [True, False])
def test_batch_leaves_carry_the_facts_of_their_certificates(ca_key, ca_cert, fast):
    """mint_batch_leaves reports each leaf's serial and validity without parsing it back;
    they must be what the certificate says, refusals interleaved included."""
    m = X509Minter(ca_key, ca_cert, fast_path=fast)
    key = ec.generate_private_key(ec.SECP256R1())
    requests = [
        minting.LeafRequest(_csr(key), WORKLOAD, ["a.example"], 600),
        minting.LeafRequest(b"garbage", WORKLOAD),
        minting.LeafRequest(_csr(key), WORKLOAD, (), 10**9),  # clipped to the CA's notAfter
        minting.LeafRequest(_csr(key), "spiffe://elsewhere.org/x"),
        minting.LeafRequest(_csr(key), WORKLOAD, (), 60),
    ]
    out = m.mint_batch_leaves(requests, NOW)
    assert [isinstance(o, Exception) for o in out] == [False, True, False, True, False]
    for leaf in out:
        if isinstance(leaf, Exception):
            continue
        cert = x509.load_der_x509_certificate(leaf.der)
        assert leaf.serial == cert.serial_number
        assert leaf.not_before == int(cert.not_valid_before_utc.timestamp())
        assert leaf.not_after == int(cert.not_valid_after_utc.timestamp())
    assert m.issuer_rfc4514 == ca_cert.subject.rfc4514_string()
