"""Differential test of the leaf DER template against cryptography's CertificateBuilder.

The template may only be used because it produces byte-identical TBSCertificates to the
builder (minting.build_leaf_with_builder, itself checked against the SPIFFE rules in
test_minting.py). Inputs are randomized over every per-SVID field, with the edge cases
that change DER encodings forced in: serials needing a leading 0x00, long-form lengths
(>127, >255 bytes), UTCTime/GeneralizedTime boundaries, EC and RSA keys of every size.
"""

from __future__ import annotations

import datetime as dt
import random
import string

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from issuer.ca import minting, template
from meshid.spiffe_id import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
DER = serialization.Encoding.DER
SEED = 20260522
CASES = 300

_SEGMENT_CHARS = string.ascii_letters + string.digits + ".-_"
_DNS_CHARS = string.ascii_lowercase + string.digits + "-"

SPECIAL_SERIALS = [
    1,
    0x7F,
    0x80,  # needs 0x00
    0xFF,
    0x100,
    2**63,
    2**64 - 1,
    2**119,
    2**120 - 1,  # 15 bytes, top bit set: 16 octets with 0x00
    2**120,
    2**126 + 1,
    2**127 - 1,  # largest serial meshid draws
    2**127,
    2**128 - 1,
    2**158,
    2**159 - 1,  # largest 20-octet positive serial
]
SPECIAL_TIMES = [
    dt.datetime(1950, 1, 1, 0, 0, 0, tzinfo=dt.UTC),
    dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
    dt.datetime(2000, 1, 1, 0, 0, 0, tzinfo=dt.UTC),
    dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC),  # last UTCTime second
    dt.datetime(2050, 1, 1, 0, 0, 0, tzinfo=dt.UTC),  # first GeneralizedTime second
    dt.datetime(2106, 2, 7, 6, 28, 16, tzinfo=dt.UTC),  # past 32-bit time_t
    dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
]
_T_MIN = int(SPECIAL_TIMES[0].timestamp())
_T_MAX = int(SPECIAL_TIMES[-1].timestamp())


def _ca(key, issuer=None, issuer_key=None):
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    if issuer is None:
        return minting.self_signed_ca(key, TD, 3600, now)
    return minting.mint_ca_cert(key.public_key(), TD, issuer_key, 3600, now, issuer=issuer)


@pytest.fixture(scope="module")
def cas():
    """(CA key, CA certificate) for each supported CA shape, one signed by another CA."""
    p256 = ec.generate_private_key(ec.SECP256R1())
    p384 = ec.generate_private_key(ec.SECP384R1())
    p521 = ec.generate_private_key(ec.SECP521R1())
    rsa2048 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root = _ca(p384)
    return [
        (p256, _ca(p256)),
        (p384, root),
        (p521, _ca(p521)),
        (rsa2048, _ca(rsa2048)),
        (p256, _ca(p256, issuer=root, issuer_key=p384)),  # issuer name differs from subject
    ]


@pytest.fixture(scope="module")
def leaf_keys():
    return [
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        ec.generate_private_key(ec.SECP384R1()).public_key(),
        ec.generate_private_key(ec.SECP521R1()).public_key(),
        rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(),
        rsa.generate_private_key(public_exponent=3, key_size=2048).public_key(),
        rsa.generate_private_key(public_exponent=65537, key_size=3072).public_key(),
    ]


def _spiffe_id(rng: random.Random, length: int) -> str:
    """A valid SPIFFE ID of exactly `length` bytes (length >= 23)."""
    base = f"spiffe://{TD}"
    path = ""
    while len(base) + len(path) < length:
        room = length - len(base) - len(path) - 1  # minus the '/'
        seg_len = min(room, rng.randint(1, 40))
        if room - seg_len == 1:  # never leave room for only a bare '/'
            seg_len = room
        seg = "".join(rng.choice(_SEGMENT_CHARS) for _ in range(seg_len))
        if seg in (".", ".."):
            seg = "x" * seg_len
        path += "/" + seg
    sid = base + path
    assert len(sid) == length
    return str(SpiffeId.parse(sid))


def _dns_name(rng: random.Random) -> str:
    labels = [
        "".join(rng.choice(_DNS_CHARS) for _ in range(rng.choice([1, 5, 20, 63]))).strip("-") or "a"
        for _ in range(rng.randint(1, 4))
    ]
    return ".".join(labels)


def _serial(rng: random.Random) -> int:
    if rng.random() < 0.3:
        return rng.choice(SPECIAL_SERIALS)
    return rng.getrandbits(rng.randint(1, 159)) or 1


def _time(rng: random.Random) -> int:
    if rng.random() < 0.3:
        return int(rng.choice(SPECIAL_TIMES).timestamp())
    return rng.randint(_T_MIN, _T_MAX)


def _spki_ski(pub):
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return template.ec_spki_and_ski(pub)
    return template.rsa_spki_and_ski(pub)


def _algid(ca_key):
    kind = "ec" if isinstance(ca_key, ec.EllipticCurvePrivateKey) else "rsa"
    return template.SIGNATURE_ALGORITHMS[(kind, minting.signature_hash_for(ca_key).name)]


def test_template_matches_builder_on_random_inputs(cas, leaf_keys):
    rng = random.Random(SEED)
    lengths = [23, 60, 126, 127, 128, 129, 200, 255, 256, 257, 300, 600, 1000, 2048]
    seen_long_form = set()
    for i in range(CASES):
        ca_key, ca_cert = cas[i % len(cas)]
        pub = rng.choice(leaf_keys)
        uri = _spiffe_id(rng, lengths[i % len(lengths)] if i < 3 * len(lengths) else rng.randint(23, 2048))
        dns = [_dns_name(rng) for _ in range(rng.randint(0, 3))]
        serial = _serial(rng)
        t1, t2 = _time(rng), _time(rng)
        not_before, not_after = min(t1, t2), max(t1, t2)
        aki = minting.key_identifier(ca_cert)

        reference = minting.build_leaf_with_builder(
            ca_key,
            ca_cert.subject,
            aki,
            pub,
            uri,
            dns,
            serial,
            dt.datetime.fromtimestamp(not_before, dt.UTC),
            dt.datetime.fromtimestamp(not_after, dt.UTC),
        )
        tpl = template.LeafTemplate(ca_cert.subject.public_bytes(), _algid(ca_key), aki)
        spki, ski = _spki_ski(pub)
        san = template.san_extension(uri, dns)
        tbs = tpl.tbs(
            serial,
            template.der_validity(not_before, not_after),
            spki,
            ski,
            san,
            isinstance(pub, rsa.RSAPublicKey),
        )
        context = f"case {i}: serial={serial:#x} uri_len={len(uri)} dns={dns} nb={not_before} na={not_after}"
        assert tbs == reference.tbs_certificate_bytes, context
        # The certificate wrapper too, given the builder's signature.
        assert template.certificate_der(
            tbs, tpl.signature_algorithm, reference.signature
        ) == reference.public_bytes(DER), context

        # Our own signature over the template TBS parses back and verifies.
        der = template.certificate_der(tbs, tpl.signature_algorithm, minting._signer(ca_key)(tbs))
        cert = x509.load_der_x509_certificate(der)
        cert.verify_directly_issued_by(ca_cert)
        assert cert.serial_number == serial
        assert cert.not_valid_before_utc.timestamp() == not_before
        assert cert.not_valid_after_utc.timestamp() == not_after
        assert cert.public_key() == pub
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
        assert sans.get_values_for_type(x509.DNSName) == dns

        if len(san) > 255:
            seen_long_form.add("san>255")
        elif len(san) > 127:
            seen_long_form.add("san>127")
        if serial.bit_length() % 8 == 0:
            seen_long_form.add("serial 0x00")
        if dt.datetime.fromtimestamp(not_after, dt.UTC).year >= 2050:
            seen_long_form.add("generalized time")
    assert seen_long_form == {"san>255", "san>127", "serial 0x00", "generalized time"}


def test_minter_output_parses_back_over_random_identities(cas, leaf_keys):
    rng = random.Random(SEED + 1)
    now = dt.datetime(2030, 1, 1, 0, 30, tzinfo=dt.UTC)
    for ca_key, ca_cert in cas:
        minter = minting.X509Minter(ca_key, ca_cert)
        assert minter.fast_path
        for _ in range(20):
            pub = rng.choice(leaf_keys)
            uri = _spiffe_id(rng, rng.randint(30, 2048))
            dns = [_dns_name(rng) for _ in range(rng.randint(0, 3))]
            cert = minter.mint_from_public_key(pub, uri, dns, rng.randint(1, 7200), now)
            cert.verify_directly_issued_by(ca_cert)
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
            assert sans.get_values_for_type(x509.DNSName) == dns
            assert 0 < cert.serial_number < 2**127


def test_der_lengths():
    assert template.der_len(0) == b"\x00"
    assert template.der_len(127) == b"\x7f"
    assert template.der_len(128) == b"\x81\x80"
    assert template.der_len(255) == b"\x81\xff"
    assert template.der_len(256) == b"\x82\x01\x00"
    assert template.der_len(65535) == b"\x82\xff\xff"
    assert template.der_len(65536) == b"\x83\x01\x00\x00"
    for n in [0, 1, 127, 128, 200, 255, 256, 1000, 65535, 65536, 1 << 20]:
        assert template.der_header(0x30, n) == b"\x30" + template.der_len(n)


def test_der_integer():
    assert template.der_uint(1) == b"\x02\x01\x01"
    assert template.der_uint(0x7F) == b"\x02\x01\x7f"
    assert template.der_uint(0x80) == b"\x02\x02\x00\x80"
    assert template.der_uint(0x0100) == b"\x02\x02\x01\x00"
    for bad in (0, -1):
        with pytest.raises(ValueError):
            template.der_uint(bad)


def test_time_encodings_and_documented_rejection():
    assert template.der_time(dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC)) == b"\x17\x0d491231235959Z"
    assert template.der_time(dt.datetime(2050, 1, 1, tzinfo=dt.UTC)) == b"\x18\x0f20500101000000Z"
    assert template.der_time(dt.datetime(1950, 1, 1, tzinfo=dt.UTC)) == b"\x17\x0d500101000000Z"
    # Other zones are converted to UTC; sub-second precision is dropped, as the builder does.
    plus2 = dt.timezone(dt.timedelta(hours=2))
    assert template.der_time(dt.datetime(2030, 1, 1, 2, 0, 0, 999, tzinfo=plus2)) == b"\x17\x0d300101000000Z"
    # Before 1950 cannot be a UTCTime and cryptography's builder refuses it too: rejected.
    with pytest.raises(ValueError, match="1949"):
        template.der_time(dt.datetime(1949, 12, 31, 23, 59, 59, tzinfo=dt.UTC))


def test_tbs_argument_checks(cas, leaf_keys):
    ca_key, ca_cert = cas[0]
    tpl = template.LeafTemplate(ca_cert.subject.public_bytes(), _algid(ca_key), b"\x01" * 20)
    spki, ski = _spki_ski(leaf_keys[0])
    validity = template.der_validity(0, 60)
    san = template.san_extension("spiffe://example.org/x")
    for bad_serial in (0, -5, 2**159):
        with pytest.raises(ValueError, match="serial"):
            tpl.tbs(bad_serial, validity, spki, ski, san, False)
    with pytest.raises(ValueError, match="20 bytes"):
        tpl.tbs(1, validity, spki, ski[:19], san, False)
    with pytest.raises(ValueError, match="ASCII"):
        template.san_extension("spiffe://example.org/x", ["bücher.example"])


def test_serial_content_form_checked(cas, leaf_keys):
    ca_key, ca_cert = cas[0]
    tpl = template.LeafTemplate(ca_cert.subject.public_bytes(), _algid(ca_key), b"\x01" * 20)
    spki, ski = _spki_ski(leaf_keys[0])
    middle = tpl.middle(template.der_validity(0, 60))
    ident = tpl.identity(template.san_extension("spiffe://example.org/x"))
    for serial in (1, 0x7F, 0x80, 2**127 - 1, 2**159 - 1):
        content = template.serial_content(serial)
        assert content == template.der_uint(serial)[2:]
        assert tpl.tbs_from_serial_content(content, middle, spki, ski, ident, False) == tpl.tbs_from_parts(
            serial, middle, spki, ski, ident, False
        )
    # Empty, zero, non-minimal, negative, longer than 20 octets.
    for bad in (b"", b"\x00", b"\x00\x01", b"\x00\x00\x80", b"\x80", b"\xff\x01", b"\x01" * 21):
        with pytest.raises(ValueError, match="serial"):
            tpl.tbs_from_serial_content(bad, middle, spki, ski, ident, False)


def test_every_supported_ca_shape_uses_the_fast_path(cas):
    for ca_key, ca_cert in cas:
        assert minting.X509Minter(ca_key, ca_cert).fast_path
