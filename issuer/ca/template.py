"""Fast path for leaf X509-SVIDs: the TBSCertificate is assembled from DER pieces that are
precomputed once per CA, with only the per-SVID parts (serial, validity, public key, SKI,
SAN) encoded per call and every length recomputed.

This is an *encoder of our own output* only; nothing here parses untrusted input (CSRs are
parsed and checked by `cryptography` before their key reaches this module). The output is
byte-identical to what `cryptography.x509.CertificateBuilder` makes for the same leaf shape
(see minting.build_leaf_with_builder); tests/unit/test_template.py checks that over
randomized inputs, and X509Minter re-checks it once per CA before using the template.

Leaf shape (extensions in this order):
  version v3, serial, signature algorithm, issuer = CA subject, validity, empty subject,
  SubjectPublicKeyInfo, basicConstraints CA=false (critical), keyUsage (critical),
  extKeyUsage serverAuth+clientAuth, subjectKeyIdentifier, authorityKeyIdentifier (keyid),
  subjectAltName URI + DNS (critical, since the subject is empty).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

# Years the validity encoder handles: UTCTime covers 1950-2049, GeneralizedTime the rest up
# to 9999. cryptography's builder refuses dates before 1950 as well.
MIN_YEAR = 1950
MAX_YEAR = 9999
_UTCTIME_END_YEAR = 2050
_SERIAL_LIMIT = 1 << 159  # RFC 5280: at most 20 octets, positive


def der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def der_header(tag: int, n: int) -> bytes:
    """Tag and length octets for a value of n bytes (short forms spelled out: hot path)."""
    if n < 0x80:
        return bytes((tag, n))
    if n < 0x100:
        return bytes((tag, 0x81, n))
    if n < 0x10000:
        return bytes((tag, 0x82, n >> 8, n & 0xFF))
    return bytes((tag,)) + der_len(n)


def der_tlv(tag: int, value: bytes) -> bytes:
    return bytes((tag,)) + der_len(len(value)) + value


def der_uint(n: int) -> bytes:
    """INTEGER for n > 0: minimal big-endian two's complement (leading 0x00 if the top bit is set)."""
    if n <= 0:
        raise ValueError("serial number must be positive")
    return der_tlv(0x02, n.to_bytes(n.bit_length() // 8 + 1, "big"))


def serial_content(serial: int) -> bytes:
    """Content octets of the DER INTEGER of a positive serial (0x00 first if its top bit is set)."""
    return serial.to_bytes(serial.bit_length() // 8 + 1, "big")


def der_time(when: dt.datetime) -> bytes:
    """RFC 5280 Time: UTCTime for 1950-2049, GeneralizedTime otherwise; seconds precision."""
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC)
    y = when.year
    if not MIN_YEAR <= y <= MAX_YEAR:
        raise ValueError(f"year {y} cannot be encoded in a certificate validity")
    rest = f"{when.month:02d}{when.day:02d}{when.hour:02d}{when.minute:02d}{when.second:02d}Z"
    if y < _UTCTIME_END_YEAR:
        return der_tlv(0x17, f"{y % 100:02d}{rest}".encode())
    return der_tlv(0x18, f"{y:04d}{rest}".encode())


def der_validity(not_before: int, not_after: int) -> bytes:
    """Validity SEQUENCE from POSIX seconds."""
    return der_tlv(
        0x30,
        der_time(dt.datetime.fromtimestamp(not_before, dt.UTC))
        + der_time(dt.datetime.fromtimestamp(not_after, dt.UTC)),
    )


# Object identifiers, DER-encoded (tag 06 included).
_OID_BASIC_CONSTRAINTS = bytes.fromhex("0603551d13")
_OID_KEY_USAGE = bytes.fromhex("0603551d0f")
_OID_EXT_KEY_USAGE = bytes.fromhex("0603551d25")
_OID_SKI = bytes.fromhex("0603551d0e")
_OID_AKI = bytes.fromhex("0603551d23")
_OID_SAN = bytes.fromhex("0603551d11")
_OID_SERVER_AUTH = bytes.fromhex("06082b06010505070301")
_OID_CLIENT_AUTH = bytes.fromhex("06082b06010505070302")
_CRITICAL = bytes.fromhex("0101ff")

# AlgorithmIdentifier DER of the CA signature algorithms the template supports,
# keyed by (CA key kind, hash name).
SIGNATURE_ALGORITHMS: dict[tuple[str, str], bytes] = {
    ("ec", "sha256"): bytes.fromhex("300a06082a8648ce3d040302"),
    ("ec", "sha384"): bytes.fromhex("300a06082a8648ce3d040303"),
    ("ec", "sha512"): bytes.fromhex("300a06082a8648ce3d040304"),
    ("rsa", "sha256"): bytes.fromhex("300d06092a864886f70d01010b0500"),
    ("rsa", "sha384"): bytes.fromhex("300d06092a864886f70d01010c0500"),
    ("rsa", "sha512"): bytes.fromhex("300d06092a864886f70d01010d0500"),
}

_VERSION_V3 = bytes.fromhex("a003020102")
_EMPTY_NAME = bytes.fromhex("3000")
# KeyUsage BIT STRINGs (named bits, trailing zeros dropped): digitalSignature; and
# digitalSignature + keyEncipherment for RSA leaf keys.
_KU_EC = bytes.fromhex("03020780")
_KU_RSA = bytes.fromhex("030205a0")
# Version then the INTEGER header of a serial of n octets (1..20), by n.
_SERIAL_HEADERS = {n: _VERSION_V3 + bytes((0x02, n)) for n in range(1, 21)}


def extension(oid: bytes, critical: bool, value: bytes) -> bytes:
    return der_tlv(0x30, oid + (_CRITICAL if critical else b"") + der_tlv(0x04, value))


_EXT_BASIC_CONSTRAINTS_LEAF = extension(_OID_BASIC_CONSTRAINTS, True, _EMPTY_NAME)  # SEQUENCE {} = CA false
_EXT_KU_EC = extension(_OID_KEY_USAGE, True, _KU_EC)
_EXT_KU_RSA = extension(_OID_KEY_USAGE, True, _KU_RSA)
_EXT_EKU = extension(_OID_EXT_KEY_USAGE, False, der_tlv(0x30, _OID_SERVER_AUTH + _OID_CLIENT_AUTH))
_SKI_EXT_PREFIX = extension(_OID_SKI, False, der_tlv(0x04, bytes(20)))[:-20]


def aki_extension(key_identifier: bytes) -> bytes:
    return extension(_OID_AKI, False, der_tlv(0x30, der_tlv(0x80, key_identifier)))


def san_extension(uri: str, dns_names: Sequence[str] = ()) -> bytes:
    """SAN with one URI then the DNS names, critical (the leaf subject is empty).

    Values must be ASCII (IA5String); cryptography refuses non-ASCII the same way.
    """
    names = [der_tlv(0x86, _ia5(uri, "URI"))]
    names.extend(der_tlv(0x82, _ia5(d, "DNS name")) for d in dns_names)
    return extension(_OID_SAN, True, der_tlv(0x30, b"".join(names)))


def _ia5(value: str, what: str) -> bytes:
    try:
        return value.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {value!r} must be ASCII (use the IDNA A-label form)") from None


_EC_SPKI_PREFIXES: dict[str, bytes] = {}


def _ec_spki_prefix(curve: ec.EllipticCurve) -> bytes:
    """SubjectPublicKeyInfo bytes that precede the uncompressed point, for one curve.

    Taken from cryptography's own encoding of a throwaway key, so it cannot drift from it.
    """
    prefix = _EC_SPKI_PREFIXES.get(curve.name)
    if prefix is None:
        pub = ec.generate_private_key(type(curve)()).public_key()
        spki = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        point = pub.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        if not spki.endswith(point):
            raise RuntimeError(f"unexpected SubjectPublicKeyInfo layout for {curve.name}")
        prefix = _EC_SPKI_PREFIXES[curve.name] = spki[: -len(point)]
    return prefix


_sha1 = hashlib.sha1
_X962 = serialization.Encoding.X962
_UNCOMPRESSED = serialization.PublicFormat.UncompressedPoint
_DER = serialization.Encoding.DER
_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
_PKCS1 = serialization.PublicFormat.PKCS1


def ec_spki_and_ski(pub: ec.EllipticCurvePublicKey) -> tuple[bytes, bytes]:
    """(SubjectPublicKeyInfo DER, RFC 5280 method-1 key identifier) of an EC key.

    Encoding the point alone and prepending the fixed per-curve prefix is cheaper than a
    full SPKI serialization, and the key identifier is the SHA-1 of exactly that point.
    """
    point = pub.public_bytes(_X962, _UNCOMPRESSED)
    prefix = _EC_SPKI_PREFIXES.get(pub.curve.name) or _ec_spki_prefix(pub.curve)
    # SHA-1 here names a key; it protects nothing (hence usedforsecurity=False for FIPS builds).
    return prefix + point, _sha1(point, usedforsecurity=False).digest()


def rsa_spki_and_ski(pub: rsa.RSAPublicKey) -> tuple[bytes, bytes]:
    """(SubjectPublicKeyInfo DER, method-1 key identifier: SHA-1 of the RSAPublicKey DER)."""
    spki = pub.public_bytes(_DER, _SPKI)
    return spki, hashlib.sha1(pub.public_bytes(_DER, _PKCS1), usedforsecurity=False).digest()


class LeafTemplate:
    """Precomputed pieces of leaf TBSCertificates issued by one CA.

    A TBS is joined from: header, version, serial, `middle` (signature algorithm, issuer,
    validity, empty subject; one per validity), SPKI, `identity` prefix (extension headers up
    to the SKI value; one per SAN), SKI, `identity` suffix (AKI and SAN). Per SVID only the
    serial and the outer length are encoded: this runs between two signature operations for
    every SVID, so it is kept to a handful of operations.
    """

    __slots__ = ("_aki_ext", "_fixed_ec", "_fixed_rsa", "_head", "_signature_algorithm")

    def __init__(
        self, issuer_name_der: bytes, signature_algorithm_der: bytes, ca_key_identifier: bytes
    ) -> None:
        self._signature_algorithm = signature_algorithm_der
        self._head = signature_algorithm_der + issuer_name_der
        self._aki_ext = aki_extension(ca_key_identifier)
        # Extensions up to the SKI value; both key usages encode to the same length.
        self._fixed_ec = _EXT_BASIC_CONSTRAINTS_LEAF + _EXT_KU_EC + _EXT_EKU + _SKI_EXT_PREFIX
        self._fixed_rsa = _EXT_BASIC_CONSTRAINTS_LEAF + _EXT_KU_RSA + _EXT_EKU + _SKI_EXT_PREFIX

    @property
    def signature_algorithm(self) -> bytes:
        return self._signature_algorithm

    def middle(self, validity_der: bytes) -> bytes:
        """signature AlgorithmIdentifier + issuer + validity + empty subject."""
        return self._head + validity_der + _EMPTY_NAME

    def identity(self, san_ext_der: bytes) -> tuple[bytes, bytes, bytes]:
        """(EC prefix, RSA prefix, suffix) of the extensions block for one SAN."""
        inner = len(self._fixed_ec) + 20 + len(self._aki_ext) + len(san_ext_der)
        seq_hdr = der_header(0x30, inner)
        ctx_hdr = der_header(0xA3, len(seq_hdr) + inner)
        return (
            ctx_hdr + seq_hdr + self._fixed_ec,
            ctx_hdr + seq_hdr + self._fixed_rsa,
            self._aki_ext + san_ext_der,
        )

    def tbs(
        self,
        serial: int,
        validity_der: bytes,
        spki_der: bytes,
        ski: bytes,
        san_ext_der: bytes,
        rsa_key: bool,
    ) -> bytes:
        """TBSCertificate DER for one leaf.

        `validity_der` comes from der_validity(), `san_ext_der` from san_extension(), `ski`
        is the 20-byte key identifier and `spki_der` the key as cryptography encodes it.
        """
        return self.tbs_from_parts(
            serial, self.middle(validity_der), spki_der, ski, self.identity(san_ext_der), rsa_key
        )

    @staticmethod
    def tbs_from_parts(
        serial: int,
        middle: bytes,
        spki_der: bytes,
        ski: bytes,
        identity: tuple[bytes, bytes, bytes],
        rsa_key: bool,
    ) -> bytes:
        """tbs() from the cached results of middle() and identity()."""
        if not 0 < serial < _SERIAL_LIMIT:
            raise ValueError("serial number must be positive and at most 20 octets")
        return LeafTemplate.tbs_from_serial_content(
            serial_content(serial), middle, spki_der, ski, identity, rsa_key
        )

    @staticmethod
    def tbs_from_serial_content(
        serial: bytes,
        middle: bytes,
        spki_der: bytes,
        ski: bytes,
        identity: tuple[bytes, bytes, bytes],
        rsa_key: bool,
    ) -> bytes:
        """tbs_from_parts() with the serial already in its DER INTEGER content form
        (serial_content(); must be minimal, positive and at most 20 octets)."""
        size = len(serial)
        if not (0 < size <= 20 and serial[0] < 0x80 and (serial[0] or (size > 1 and serial[1] >= 0x80))):
            raise ValueError("serial number must be positive and at most 20 octets, in minimal form")
        if len(ski) != 20:
            raise ValueError("subject key identifier must be 20 bytes (SHA-1)")
        prefix = identity[1] if rsa_key else identity[0]
        suffix = identity[2]
        # version (5) + serial header (2) + SKI (20), then the variable parts.
        n = 27 + size + len(middle) + len(spki_der) + len(prefix) + len(suffix)
        header = bytes((0x30, 0x82, n >> 8, n & 0xFF)) if 0x100 <= n < 0x10000 else der_header(0x30, n)
        return b"".join((header, _SERIAL_HEADERS[size], serial, middle, spki_der, prefix, ski, suffix))


def certificate_der(tbs_der: bytes, signature_algorithm_der: bytes, signature: bytes) -> bytes:
    """Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue BIT STRING }."""
    bit_len = len(signature) + 1
    # BIT STRING header and its 0 unused-bits octet: ECDSA signatures take the short form.
    bit_hdr = bytes((0x03, bit_len, 0)) if bit_len < 0x80 else der_header(0x03, bit_len) + b"\x00"
    n = len(tbs_der) + len(signature_algorithm_der) + len(bit_hdr) + bit_len - 1
    header = bytes((0x30, 0x82, n >> 8, n & 0xFF)) if 0x100 <= n < 0x10000 else der_header(0x30, n)
    return b"".join((header, tbs_der, signature_algorithm_der, bit_hdr, signature))
