"""Minting X509-SVIDs, CA certificates and JWT-SVIDs by the SPIFFE rules (SPEC-PROTOCOLS §2).

Pure functions and one small class: every time comes from the `now` argument, nothing
here does I/O. CSRs are parsed and checked by `cryptography`; only their public key is
used, never their subject or SANs: the identity comes from the caller (the entry).

Leaf X509-SVID: empty subject with a critical SAN holding exactly one URI (the SPIFFE ID)
plus any DNS names; basicConstraints CA=false (critical); keyUsage digitalSignature, plus
keyEncipherment for RSA keys (critical); extKeyUsage serverAuth+clientAuth; SKI; AKI = the
CA's key identifier; random positive 127-bit serial; notBefore = now - 10 s; notAfter =
min(now + ttl, CA notAfter).

X509Minter builds leaves from a DER template (template.py, byte-identical to the
CertificateBuilder path it falls back to); mint_batch_der is the fastest way to sign many.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeAlias, cast

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from issuer.ca import template
from issuer.ca.csr_key_bytes import p256_key_bytes
from issuer.ca.keys import PrivateKey, PublicKey, jwt_alg_for
from meshid.errors import InvalidSpiffeIdError, MeshidError
from meshid.spiffe_id import SpiffeId, TrustDomain

BACKDATE_SECONDS = 10  # notBefore is backdated for clock skew between issuer and verifiers
SERIAL_BITS = 127  # positive and at most 16 octets, with ample randomness
MAX_CSR_BYTES = 64 * 1024
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
LEAF_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})
JWT_TYP = "JWT"

_DER = serialization.Encoding.DER
_EC, _RSA = "ec", "rsa"


class InvalidCsrError(MeshidError, ValueError):
    """A certificate signing request is malformed, badly signed or carries an unsupported key."""


class SigningError(MeshidError):
    """The CA cannot sign this now (expired CA, key mismatch, impossible lifetime)."""


# ---------------------------------------------------------------------------- helpers


_SERIAL_BATCH = 256
_serial_pool: list[int] = []
# A forked child must not hand out the parent's remaining serials.
os.register_at_fork(after_in_child=_serial_pool.clear)


def random_serial() -> int:
    """A random positive 127-bit serial from the OS CSPRNG.

    Drawn in batches (one getrandom() per 256 serials rather than a syscall per SVID, which
    shows next to a 35 µs signature). list.pop() is atomic under the GIL, so two threads
    never get the same serial.
    """
    while True:
        try:
            return _serial_pool.pop()
        except IndexError:
            _serial_pool.extend(_draw_serials(_SERIAL_BATCH))


def _draw_serials(n: int) -> list[int]:
    """Up to n fresh random positive 127-bit serials (one getrandom(); zeros left out)."""
    raw = os.urandom(16 * n)
    shift = 128 - SERIAL_BITS
    serials = [int.from_bytes(raw[i : i + 16], "big") >> shift for i in range(0, 16 * n, 16)]
    return [v for v in serials if v] if 0 in serials else serials


_CLEAR_TOP_BIT = bytes(b & 0x7F for b in range(256))  # 16 random octets, top bit cleared: 127 bits
if SERIAL_BITS != 127:
    raise RuntimeError("random_serial_contents draws 127-bit serials")


def random_serial_contents(n: int) -> list[bytes]:
    """n serials drawn as random_serial() draws them (uniform, positive, 127 bits), in their
    DER INTEGER content form (template.serial_content), for a batch. Fresh from the OS rather
    than from the shared pool, so no two threads can share any; cheaper than making ints."""
    raw = bytearray(os.urandom(16 * n))
    raw[::16] = raw[::16].translate(_CLEAR_TOP_BIT)
    data = bytes(raw)
    contents = [data[i : i + 16] for i in range(0, 16 * n, 16)]
    if 0 in data[::16]:  # a leading zero octet is not minimal DER (or the serial is zero)
        for k, c in enumerate(contents):
            if not c[0]:
                contents[k] = template.serial_content(int.from_bytes(c, "big") or random_serial())
    return contents


SignatureHash: TypeAlias = hashes.SHA256 | hashes.SHA384 | hashes.SHA512


def signature_hash_for(key: PrivateKeyTypes | PublicKeyTypes) -> SignatureHash:
    """Hash paired with a signing key: SHA-384 for P-384, SHA-512 for P-521, SHA-256 otherwise."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        if key.curve.name == "secp384r1":
            return hashes.SHA384()
        if key.curve.name == "secp521r1":
            return hashes.SHA512()
        return hashes.SHA256()
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return hashes.SHA256()
    raise SigningError(f"unsupported signing key {type(key).__name__}")


def _sign_plan(key: PrivateKeyTypes) -> tuple[Callable[[bytes], Any] | None, tuple[Any, ...]]:
    """How to sign with `key`: (hashlib constructor to prehash with, or None; the parameters
    after the data in `key.sign(data, *params)`)."""
    h = signature_hash_for(key)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        # Prehashed: hashlib's digest is ~2 µs cheaper than cryptography's per-call context.
        return getattr(hashlib, h.name), (ec.ECDSA(Prehashed(h)),)
    if isinstance(key, rsa.RSAPrivateKey):
        return None, (padding.PKCS1v15(), h)
    raise SigningError(f"unsupported signing key {type(key).__name__}")


def _signer(key: PrivateKeyTypes) -> Callable[[bytes], bytes]:
    prehash, params = _sign_plan(key)
    sign = cast(Callable[..., bytes], key.sign)  # type: ignore[union-attr]
    if prehash is None:
        return lambda data: sign(data, *params)
    return lambda data: sign(prehash(data).digest(), *params)


def _epoch(now: dt.datetime) -> int:
    # Naive datetimes are UTC, as cryptography's builder treats them.
    if now.tzinfo is None:
        now = now.replace(tzinfo=dt.UTC)
    return int(now.timestamp())


def _utc(ts: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(_DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_identifier(cert: x509.Certificate) -> bytes:
    """The certificate's subjectKeyIdentifier, or the RFC 5280 method-1 id of its key."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest  # type: ignore[arg-type]


def trust_domain_of(cert: x509.Certificate) -> TrustDomain | None:
    """Trust domain of a CA certificate's `spiffe://td` URI SAN, if it has one."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return SpiffeId.parse(uri).trust_domain
    return None


def _as_spiffe_id(value: SpiffeId | str) -> SpiffeId:
    return value if isinstance(value, SpiffeId) else SpiffeId.parse(value)


def chain_der(leaf: x509.Certificate | bytes, chain: Sequence[x509.Certificate | bytes]) -> bytes:
    """Leaf then chain as concatenated DER, as the Workload API's `x509_svid` field carries them."""
    return b"".join(c if isinstance(c, bytes) else c.public_bytes(_DER) for c in (leaf, *chain))


def chain_pem(leaf: x509.Certificate, chain: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, *chain))


# ---------------------------------------------------------------------------- CSRs

# ECDSA checks hash with hashlib and verify the digest (Prehashed): same check, ~3 µs less
# per CSR than letting cryptography set up its own digest context.
_EC_CSR_ALGS: dict[x509.ObjectIdentifier, tuple[Callable[[bytes], Any], tuple[ec.ECDSA]]] = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: (hashlib.sha256, (ec.ECDSA(Prehashed(hashes.SHA256())),)),
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: (hashlib.sha384, (ec.ECDSA(Prehashed(hashes.SHA384())),)),
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: (hashlib.sha512, (ec.ECDSA(Prehashed(hashes.SHA512())),)),
}
_RSA_CSR_HASHES: dict[x509.ObjectIdentifier, hashes.HashAlgorithm] = {
    SignatureAlgorithmOID.RSA_WITH_SHA256: hashes.SHA256(),
    SignatureAlgorithmOID.RSA_WITH_SHA384: hashes.SHA384(),
    SignatureAlgorithmOID.RSA_WITH_SHA512: hashes.SHA512(),
}
_PKCS1V15 = padding.PKCS1v15()
_BYTES_TYPES = (bytes, bytearray, memoryview)
_STRONG_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
# isinstance() against cryptography's ABCs is slow; remember each concrete key class once.
_KIND_BY_TYPE: dict[type, str] = {}


def _key_kind(pub: object) -> str:
    """Kind ("ec" or "rsa") of an acceptable SVID/CA public key; InvalidCsrError otherwise."""
    kind = _KIND_BY_TYPE.get(type(pub))
    if kind is None:
        if isinstance(pub, ec.EllipticCurvePublicKey):
            kind = _EC
        elif isinstance(pub, rsa.RSAPublicKey):
            kind = _RSA
        else:
            raise InvalidCsrError(
                f"unsupported key type {type(pub).__name__}: SVID keys must be EC (P-256, P-384, P-521) "
                f"or RSA ({MIN_RSA_BITS}-{MAX_RSA_BITS} bits)"
            )
        _KIND_BY_TYPE[type(pub)] = kind
    if kind is _EC:
        if pub.curve.name not in LEAF_CURVES:  # type: ignore[attr-defined]
            raise InvalidCsrError(
                f"unsupported EC curve {pub.curve.name}: use P-256, P-384 or P-521"  # type: ignore[attr-defined]
            )
    elif not MIN_RSA_BITS <= pub.key_size <= MAX_RSA_BITS:  # type: ignore[attr-defined]
        raise InvalidCsrError(
            f"RSA key of {pub.key_size} bits: must be {MIN_RSA_BITS}-{MAX_RSA_BITS}"  # type: ignore[attr-defined]
        )
    return kind


def parse_csr(csr_der: bytes) -> tuple[x509.CertificateSigningRequest, PublicKey]:
    """Parse a DER PKCS#10 request and check its self-signature (proof of possession).

    The signature is checked with the loaded key directly (not `is_signature_valid`),
    which skips a second key load. SHA-1/MD5 signatures are refused.
    """
    csr, pub, _ = _parse_csr(csr_der)
    return csr, pub


# How to check one CSR's signature: (key, kind, digest function for prehashed ECDSA or
# None, the parameters after signature and data in `key.verify(signature, data, *params)`).
_CsrCheck: TypeAlias = tuple[PublicKey, str, Callable[[bytes], Any] | None, tuple[Any, ...]]


def _parse_csr(csr_der: bytes) -> tuple[x509.CertificateSigningRequest, PublicKey, str]:
    csr = _load_der_csr(csr_der)
    check = _csr_check(csr)
    _check_csr_signature(csr, check)
    return csr, check[0], check[1]


_BAD_CSR_DER = "CSR is not a valid DER-encoded PKCS#10 request"


def _load_der_csr(csr_der: bytes) -> x509.CertificateSigningRequest:
    """Parse a DER CSR (nothing checked beyond its syntax)."""
    if type(csr_der) is not bytes:
        if not isinstance(csr_der, _BYTES_TYPES):
            raise InvalidCsrError("CSR must be DER bytes")
        csr_der = bytes(csr_der)
    if len(csr_der) > MAX_CSR_BYTES:
        raise InvalidCsrError(f"CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        return x509.load_der_x509_csr(csr_der)
    except (ValueError, x509.InvalidVersion):
        raise InvalidCsrError(_BAD_CSR_DER) from None


def _load_batch_csrs(
    ders: list[bytes], errors: dict[int, Exception]
) -> tuple[list[int], list[x509.CertificateSigningRequest]]:
    """(indexes of the CSRs that parse, their CSRs); the others' errors go to `errors`."""
    if ders and set(map(type, ders)) == {bytes} and max(map(len, ders)) <= MAX_CSR_BYTES:
        try:
            return list(range(len(ders))), list(map(x509.load_der_x509_csr, ders))
        except (ValueError, x509.InvalidVersion):
            pass  # one of them is malformed: find which below
    live: list[int] = []
    csrs: list[x509.CertificateSigningRequest] = []
    for i, der in enumerate(ders):
        try:
            csrs.append(_load_der_csr(der))
        except InvalidCsrError as exc:
            errors[i] = exc
        else:
            live.append(i)
    return live, csrs


def _csr_check(csr: x509.CertificateSigningRequest) -> _CsrCheck:
    """Load a parsed CSR's key, refuse unsupported keys and signature algorithms, and pick
    how to check its signature (without checking it yet)."""
    try:
        pub: Any = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidCsrError(f"CSR public key is malformed or of an unsupported type ({exc})") from None
    oid = csr.signature_algorithm_oid
    # Fast path: a known EC key class on a leaf curve, with an accepted signature algorithm.
    if _KIND_BY_TYPE.get(type(pub)) is _EC and pub.curve.name in LEAF_CURVES:
        ec_alg = _EC_CSR_ALGS.get(oid)
        if ec_alg is not None:
            return pub, _EC, ec_alg[0], ec_alg[1]
    kind = _key_kind(pub)
    if kind is _EC:
        ec_alg = _EC_CSR_ALGS.get(oid)
        if ec_alg is None:
            raise InvalidCsrError(_bad_alg(oid, "an EC"))
        return pub, kind, ec_alg[0], ec_alg[1]
    params: tuple[Any, ...]
    h = _RSA_CSR_HASHES.get(oid)
    if h is not None:
        params = (_PKCS1V15, h)
    elif oid == SignatureAlgorithmOID.RSASSA_PSS:
        try:
            pss = csr.signature_algorithm_parameters
            ph = csr.signature_hash_algorithm
        except (ValueError, UnsupportedAlgorithm):
            # Parameters naming an unknown hash raise UnsupportedAlgorithm (not a
            # ValueError): the caller's bad CSR, not an internal error.
            raise InvalidCsrError("CSR RSASSA-PSS parameters are not supported") from None
        if not isinstance(pss, padding.PSS) or not isinstance(ph, _STRONG_HASHES):
            raise InvalidCsrError("CSR RSASSA-PSS parameters are not supported")
        params = (pss, ph)
    else:
        raise InvalidCsrError(_bad_alg(oid, "an RSA"))
    return pub, kind, None, params


def _csr_signed_data(csr: x509.CertificateSigningRequest, check: _CsrCheck) -> bytes:
    """What the CSR's signature is verified over: its TBS, or the TBS digest (prehashed ECDSA)."""
    data = csr.tbs_certrequest_bytes
    prehash = check[2]
    return data if prehash is None else prehash(data).digest()


_VERIFY_ERRORS = (InvalidSignature, ValueError, UnsupportedAlgorithm)


def _signature_error(exc: Exception) -> InvalidCsrError:
    """The InvalidCsrError for an exception of _VERIFY_ERRORS raised by a CSR check."""
    if isinstance(exc, InvalidSignature):
        return InvalidCsrError("CSR signature is not valid (no proof of possession of the key)")
    return InvalidCsrError(f"CSR signature could not be checked ({exc})")


def _verify_csr(pub: PublicKey, signature: bytes, data: bytes, params: tuple[Any, ...]) -> None:
    try:
        pub.verify(signature, data, *params)
    except _VERIFY_ERRORS as exc:
        raise _signature_error(exc) from None


def _check_csr_signature(csr: x509.CertificateSigningRequest, check: _CsrCheck) -> None:
    _verify_csr(check[0], csr.signature, _csr_signed_data(csr, check), check[3])


def _bad_alg(oid: x509.ObjectIdentifier, key: str) -> str:
    return (
        f"CSR signature algorithm {oid._name} ({oid.dotted_string}) is not accepted for {key} key; "
        "use SHA-256, SHA-384 or SHA-512"
    )


def load_csr_public_key(csr_der: bytes) -> PublicKey:
    """The public key of a CSR whose signature checks out; InvalidCsrError otherwise."""
    return parse_csr(csr_der)[1]


# ---------------------------------------------------------------------------- CA certificates


def ca_subject(serial: int | None = None) -> x509.Name:
    """Subject of meshid CA certificates: O=SPIFFE, plus the certificate serial as
    serialNumber so that every CA generation has a distinct subject (chain building
    across rotations never confuses two CAs with the same name)."""
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]
    if serial is not None:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, str(serial)))
    return x509.Name(attrs)


def _td_san(trust_domain: TrustDomain) -> x509.SubjectAlternativeName:
    # A CA certificate's SPIFFE ID, if present, is the trust domain ID without a path.
    return x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(trust_domain.id))])


def as_signing_key(key: PrivateKeyTypes) -> PrivateKey:
    """`key` as a CA signing key (EC or RSA); SigningError for other key kinds."""
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise SigningError(f"unsupported CA key {type(key).__name__}: use EC or RSA")
    return key


def build_ca_csr(key: PrivateKeyTypes, trust_domain: TrustDomain) -> bytes:
    """DER CSR for an upstream authority: O=SPIFFE, URI SAN `spiffe://<td>`, CA=true."""
    key = as_signing_key(key)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(ca_subject())
        .add_extension(_td_san(trust_domain), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, signature_hash_for(key))
    )
    return csr.public_bytes(_DER)


def mint_ca_cert(
    public_key: PublicKeyTypes,
    trust_domain: TrustDomain,
    signer: PrivateKeyTypes,
    ttl_seconds: int,
    now: dt.datetime,
    issuer: x509.Certificate | None = None,
    *,
    not_after_limit: dt.datetime | None = None,
    serial: int | None = None,
) -> x509.Certificate:
    """An X509 CA certificate for `public_key`: CA=true pathlen 0, keyCertSign+cRLSign
    (critical), URI SAN `spiffe://<td>`. Signed by `signer` under `issuer`, or self-signed
    when `issuer` is None. Lifetime never outlasts the issuer (or the limit)."""
    key = as_signing_key(signer)
    if ttl_seconds <= 0:
        raise SigningError("CA TTL must be positive")
    now_ts = _epoch(now)
    not_before, not_after = now_ts - BACKDATE_SECONDS, now_ts + ttl_seconds
    if not_after_limit is not None:
        not_after = min(not_after, _epoch(not_after_limit))
    signer_spki = _spki(key.public_key())
    if issuer is None:
        if signer_spki != _spki(public_key):
            raise SigningError("a self-signed CA must be signed by its own key")
        aki = x509.SubjectKeyIdentifier.from_public_key(public_key).digest  # type: ignore[arg-type]
    else:
        if signer_spki != _spki(issuer.public_key()):
            raise SigningError("signing key does not match the issuer certificate")
        not_before = max(not_before, _epoch(issuer.not_valid_before_utc))
        not_after = min(not_after, _epoch(issuer.not_valid_after_utc))
        aki = key_identifier(issuer)
    if not_after <= now_ts:
        raise SigningError(f"issuer certificate expired at {_utc(not_after).isoformat()}; cannot sign a CA")
    serial = serial or random_serial()
    subject = ca_subject(serial)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer.subject)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(serial)
        .not_valid_before(_utc(not_before))
        .not_valid_after(_utc(not_after))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)  # type: ignore[arg-type]
        .add_extension(
            x509.AuthorityKeyIdentifier(
                key_identifier=aki, authority_cert_issuer=None, authority_cert_serial_number=None
            ),
            critical=False,
        )
        .add_extension(_td_san(trust_domain), critical=False)
    )
    return builder.sign(key, signature_hash_for(key))


def self_signed_ca(
    key: PrivateKeyTypes, trust_domain: TrustDomain, ttl_seconds: int, now: dt.datetime
) -> x509.Certificate:
    """A self-signed CA certificate (its own root), used when no upstream is configured."""
    key = as_signing_key(key)
    return mint_ca_cert(key.public_key(), trust_domain, key, ttl_seconds, now)


# ---------------------------------------------------------------------------- leaf X509-SVIDs

_LEAF_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])


def _leaf_key_usage(rsa_key: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=rsa_key,  # RSA key transport (TLS 1.2 RSA kx); meaningless for EC keys
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def build_leaf_with_builder(
    signing_key: PrivateKey,
    issuer_name: x509.Name,
    ca_key_identifier: bytes,
    public_key: PublicKey,
    uri: str,
    dns_names: Sequence[str],
    serial: int,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    """The leaf X509-SVID through cryptography's CertificateBuilder: the reference for the
    template fast path and the fallback for shapes it does not cover."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    names.extend(x509.DNSName(d) for d in dns_names)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(isinstance(public_key, rsa.RSAPublicKey)), critical=True)
        .add_extension(_LEAF_EKU, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier(
                key_identifier=ca_key_identifier,
                authority_cert_issuer=None,
                authority_cert_serial_number=None,
            ),
            critical=False,
        )
        # Critical because the subject is empty (RFC 5280 4.2.1.6).
        .add_extension(x509.SubjectAlternativeName(names), critical=True)
    )
    return builder.sign(signing_key, signature_hash_for(signing_key))


_IDENTITY_CACHE_MAX = 4096


def _drop(positions: list[int], *columns: list[Any]) -> None:
    """Delete the given (ascending) positions from every column, in place."""
    for k in reversed(positions):
        for column in columns:
            del column[k]


def _key_bytes(public_key: Any, kind: str) -> tuple[bytes, bytes]:
    """(SubjectPublicKeyInfo DER, key identifier) of a leaf key of a checked kind."""
    if kind is _EC:
        return template.ec_spki_and_ski(public_key)
    return template.rsa_spki_and_ski(public_key)


def _csr_key_bytes(tbs_certrequest: bytes, public_key: Any, kind: str) -> tuple[bytes, bytes]:
    """_key_bytes of a checked CSR's key, taken from the request itself when it has the
    common shape (no re-encoding), else encoded."""
    found = p256_key_bytes(tbs_certrequest) if kind is _EC else None
    return _key_bytes(public_key, kind) if found is None else found


def _leaf_facts(der: bytes) -> MintedLeaf:
    """MintedLeaf of a leaf from the builder (the rare non-template path): parsed back."""
    cert = x509.load_der_x509_certificate(der)
    return MintedLeaf(der, cert.serial_number, _epoch(cert.not_valid_before_utc),
                      _epoch(cert.not_valid_after_utc))


_Identity: TypeAlias = tuple[bytes, tuple[bytes, bytes, bytes]]  # SAN extension, template pieces


class MintedLeaf(NamedTuple):
    """A minted leaf and the facts issuance events need, so nobody parses it back."""

    der: bytes
    serial: int
    not_before: int  # epoch seconds
    not_after: int


class LeafRequest(NamedTuple):
    """One X509-SVID to mint: the CSR (only its key is used) and the entry's identity."""

    csr_der: bytes
    spiffe_id: SpiffeId | str
    dns_names: Sequence[str] = ()
    ttl_seconds: int = 3600


def ca_chain(ca_cert: x509.Certificate, upstream_chain: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    """The certificates that follow a leaf in an SVID: the CA and its upstream intermediates.
    A self-signed CA is a root: it is in the bundle and left out of chains, as SPIRE does and
    SPEC §1 asks ("leaf first, then intermediates")."""
    if not upstream_chain and _self_signed(ca_cert):
        return []
    return [ca_cert, *upstream_chain]


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


class X509Minter:
    """Signs leaf X509-SVIDs with one CA key.

    `chain` is the upstream chain above `ca_cert` (no roots). Leaves are assembled from a
    precomputed DER template when the CA's shape is covered (EC P-256/P-384/P-521 or RSA
    CA key) and the template reproduces cryptography's builder output byte for byte on a
    probe certificate; otherwise every leaf goes through the builder. Thread-safe: the
    server may run batches in an executor.
    """

    def __init__(
        self,
        ca_key: PrivateKeyTypes,
        ca_cert: x509.Certificate,
        chain: Sequence[x509.Certificate] = (),
        *,
        fast_path: bool = True,
    ) -> None:
        ca_key = as_signing_key(ca_key)
        if _spki(ca_key.public_key()) != _spki(ca_cert.public_key()):
            raise SigningError("CA key does not match the CA certificate")
        self.ca_key: PrivateKey = ca_key
        self.ca_cert = ca_cert
        self.chain: list[x509.Certificate] = list(chain)
        self.trust_domain = trust_domain_of(ca_cert)
        self._sign = _signer(ca_key)
        self._sign_prehash, self._sign_params = _sign_plan(ca_key)
        self._issuer_name = ca_cert.subject
        self._issuer_rfc4514 = self._issuer_name.rfc4514_string()
        self._aki = key_identifier(ca_cert)
        self._ca_not_before = _epoch(ca_cert.not_valid_before_utc)
        self._ca_not_after = _epoch(ca_cert.not_valid_after_utc)
        self._ca_spki = _spki(ca_key.public_key())
        self._chain_der = tuple(c.public_bytes(_DER) for c in ca_chain(ca_cert, self.chain))
        self._identity_cache: dict[tuple[str, tuple[str, ...]], _Identity] = {}
        self._validity_cache: tuple[dt.datetime | None, int, int, tuple[int, int, bytes]] = (
            None,
            0,
            -1,
            (0, 0, b""),
        )
        self._template = self._make_template() if fast_path else None

    @property
    def fast_path(self) -> bool:
        return self._template is not None

    @property
    def issuer_rfc4514(self) -> str:
        """The leaves' issuer (this CA's subject) as an RFC 4514 string."""
        return self._issuer_rfc4514

    @property
    def chain_der_parts(self) -> tuple[bytes, ...]:
        """What follows a leaf in an SVID: CA certificate then upstream chain, DER (see ca_chain)."""
        return self._chain_der

    def _make_template(self) -> template.LeafTemplate | None:
        kind = _EC if isinstance(self.ca_key, ec.EllipticCurvePrivateKey) else _RSA
        algid = template.SIGNATURE_ALGORITHMS.get((kind, signature_hash_for(self.ca_key).name))
        if algid is None:
            return None
        tpl = template.LeafTemplate(self._issuer_name.public_bytes(), algid, self._aki)
        # Probe once: the template must reproduce the builder exactly for this CA.
        probe_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        spki, ski = template.ec_spki_and_ski(probe_key)
        uri = "spiffe://probe.invalid/template-check"
        nb, na = self._ca_not_before, max(self._ca_not_before + 1, self._ca_not_after)
        dns, serial = ["probe.invalid"], 1 << 120  # a serial that needs a leading 0x00
        reference = build_leaf_with_builder(
            self.ca_key, self._issuer_name, self._aki, probe_key, uri, dns, serial, _utc(nb), _utc(na)
        )
        try:
            validity = template.der_validity(nb, na)
        except ValueError:
            return None  # CA validity outside what the template encodes
        tbs = tpl.tbs(serial, validity, spki, ski, template.san_extension(uri, dns), False)
        if template.certificate_der(tbs, algid, reference.signature) != reference.public_bytes(_DER):
            return None
        return tpl

    # -- public API -------------------------------------------------------------------

    def mint_from_csr(
        self,
        csr_der: bytes,
        spiffe_id: SpiffeId | str,
        dns_names: Sequence[str],
        ttl_seconds: int,
        now: dt.datetime,
    ) -> x509.Certificate:
        """Leaf X509-SVID for the key in `csr_der` (signature checked); the CSR's names are ignored."""
        der = self.mint_der_from_csr(csr_der, spiffe_id, dns_names, ttl_seconds, now)
        return x509.load_der_x509_certificate(der)

    def mint_der_from_csr(
        self,
        csr_der: bytes,
        spiffe_id: SpiffeId | str,
        dns_names: Sequence[str],
        ttl_seconds: int,
        now: dt.datetime,
    ) -> bytes:
        """As mint_from_csr, returning the leaf DER (the hot path: no certificate object)."""
        csr = _load_der_csr(csr_der)
        check = _csr_check(csr)
        pub, kind = check[0], check[1]
        key_bytes = _csr_key_bytes(csr.tbs_certrequest_bytes, pub, kind)
        _check_csr_signature(csr, check)
        return self._mint(pub, kind, spiffe_id, dns_names, ttl_seconds, now, key_bytes)

    def mint_from_public_key(
        self,
        public_key: PublicKeyTypes,
        spiffe_id: SpiffeId | str,
        dns_names: Sequence[str],
        ttl_seconds: int,
        now: dt.datetime,
    ) -> x509.Certificate:
        """Leaf X509-SVID for a key the caller already trusts (e.g. the server's own SVID)."""
        return x509.load_der_x509_certificate(
            self.mint_der_from_public_key(public_key, spiffe_id, dns_names, ttl_seconds, now)
        )

    def mint_der_from_public_key(
        self,
        public_key: PublicKeyTypes,
        spiffe_id: SpiffeId | str,
        dns_names: Sequence[str],
        ttl_seconds: int,
        now: dt.datetime,
    ) -> bytes:
        return self._mint(public_key, _key_kind(public_key), spiffe_id, dns_names, ttl_seconds, now)

    def mint_batch_der(self, requests: Sequence[LeafRequest], now: dt.datetime) -> list[bytes | Exception]:
        """Mint many leaves; item i is the leaf DER for requests[i] or the error that refused it
        (InvalidCsrError, InvalidSpiffeIdError, SigningError, ValueError).

        Same output as mint_der_from_csr per item, but done in phases (parse every CSR, load
        every key, encode every key, hash every CSR, build and hash every TBS, check every CSR
        signature, sign every TBS, wrap them): each loop keeps its code and tables in cache,
        which is measurably faster than alternating the steps per SVID. Pure and thread-safe,
        so the server can run a whole batch in an executor.
        """
        tpl = self._template
        if tpl is None:
            return [self._try_one(r, now) for r in requests]
        return self._mint_batch(tpl, requests, now, None)

    def mint_batch_leaves(
        self, requests: Sequence[LeafRequest], now: dt.datetime
    ) -> list[MintedLeaf | Exception]:
        """mint_batch_der, each leaf with its serial and validity (for issuance events)."""
        tpl = self._template
        if tpl is None:
            ders = [self._try_one(r, now) for r in requests]
            return [d if isinstance(d, Exception) else _leaf_facts(d) for d in ders]
        facts: list[tuple[bytes, int, int]] = []
        ders = self._mint_batch(tpl, requests, now, facts)
        out: list[MintedLeaf | Exception] = []
        it = iter(facts)
        for d in ders:
            if isinstance(d, Exception):
                out.append(d)
            else:
                serial, nb, na = next(it)
                out.append(MintedLeaf(d, int.from_bytes(serial, "big"), nb, na))
        return out

    def _mint_batch(
        self,
        tpl: template.LeafTemplate,
        requests: Sequence[LeafRequest],
        now: dt.datetime,
        facts: list[tuple[bytes, int, int]] | None,
    ) -> list[bytes | Exception]:
        """The template path of mint_batch_der; `facts`, when given, receives (serial
        content, notBefore, notAfter) of each minted leaf, in order."""
        errors: dict[int, Exception] = {}
        # Columns below are aligned with `live`, the indexes of the requests still going;
        # a request refused in a phase is recorded in `errors` and dropped from every column.
        live, csrs = _load_batch_csrs([r.csr_der for r in requests], errors)
        checks: list[_CsrCheck] = []
        try:
            checks = list(map(_csr_check, csrs))  # the common case: every key is acceptable
        except InvalidCsrError:  # find which (the keys before it are loaded again)
            refused_keys: list[int] = []
            for k, csr in enumerate(csrs):
                try:
                    checks.append(_csr_check(csr))
                except InvalidCsrError as exc:
                    errors[live[k]] = exc
                    refused_keys.append(k)
            if refused_keys:
                _drop(refused_keys, live, csrs)

        key_bytes: list[tuple[bytes, bytes]] = []
        signatures: list[bytes] = []
        signed: list[bytes] = []
        for csr, c in zip(csrs, checks, strict=True):
            data = csr.tbs_certrequest_bytes
            key_bytes.append(_csr_key_bytes(data, c[0], c[1]))
            signatures.append(csr.signature)
            prehash = c[2]
            signed.append(data if prehash is None else prehash(data).digest())

        # Every TBS is built and hashed *before* the CSR signatures are checked (nothing is
        # signed before that), so that the verify and sign loops run back to back on warm
        # elliptic-curve code and tables: measurably faster than Python work in between.
        tbss, refused, serials, validities = self._batch_tbs(tpl, requests, live, checks, key_bytes, now)
        prehash, params = self._sign_prehash, self._sign_params
        to_sign = tbss if prehash is None else [prehash(t).digest() for t in tbss]

        failed: list[int] = []
        for k, ((pub, _, _, verify_params), sig, data) in enumerate(
            zip(checks, signatures, signed, strict=True)
        ):
            try:
                pub.verify(sig, data, *verify_params)
            except _VERIFY_ERRORS as exc:
                errors[live[k]] = _signature_error(exc)
                failed.append(k)
        if refused:
            # A bad CSR is reported before a bad identity or lifetime, as mint_der_from_csr does.
            for k, refusal in refused.items():
                errors.setdefault(live[k], refusal)
            failed = sorted(set(failed).union(refused))
        if failed:
            _drop(failed, live, tbss, to_sign, serials, validities)
        if facts is not None:
            facts.extend((serial, nb, na) for serial, (nb, na) in zip(serials, validities, strict=True))

        sign = cast(Callable[..., bytes], self.ca_key.sign)
        if len(params) == 1:
            param = params[0]
            sigs = [sign(d, param) for d in to_sign]
        else:
            sigs = [sign(d, *params) for d in to_sign]
        wrap, algid = template.certificate_der, tpl.signature_algorithm
        ders: list[bytes | Exception] = [wrap(t, algid, sig) for t, sig in zip(tbss, sigs, strict=True)]
        if not errors:
            return ders
        done = dict(zip(live, ders, strict=True))
        return [errors[i] if i in errors else done[i] for i in range(len(requests))]

    def _batch_tbs(
        self,
        tpl: template.LeafTemplate,
        requests: Sequence[LeafRequest],
        live: list[int],
        checks: list[_CsrCheck],
        key_bytes: list[tuple[bytes, bytes]],
        now: dt.datetime,
    ) -> tuple[list[bytes], dict[int, Exception], list[bytes], list[tuple[int, int]]]:
        """The TBS of each live request (the checks of _plan, inlined), the refusals by
        column position (their TBS is left empty), and each one's serial content and
        (notBefore, notAfter)."""
        middles: dict[int, tuple[int, int, bytes]] = {}
        validities: list[tuple[int, int]] = []
        cache = self._identity_cache
        ca_spki = self._ca_spki
        tbs_from_serial_content = tpl.tbs_from_serial_content
        tbss: list[bytes] = []
        refused: dict[int, Exception] = {}
        serials = random_serial_contents(len(live))
        for k, (i, c, kb, serial) in enumerate(zip(live, checks, key_bytes, serials, strict=True)):
            r = requests[i]
            try:
                ttl = r.ttl_seconds
                if type(ttl) is not int or ttl <= 0:
                    raise ValueError("ttl_seconds must be a positive integer")
                sid = r.spiffe_id
                dns = r.dns_names
                key = (sid if type(sid) is str else str(sid), dns if type(dns) is tuple else tuple(dns))
                ident = cache.get(key)
                if ident is None:
                    ident = self._identity(*key)
                spki = kb[0]
                if spki == ca_spki:
                    raise SigningError("refusing to issue an SVID for the CA's own key")
                validity = middles.get(ttl)
                if validity is None:
                    validity = middles[ttl] = self._validity(now, ttl)
                tbss.append(tbs_from_serial_content(serial, validity[2], spki, kb[1], ident[1], c[1] is _RSA))
                validities.append(validity[:2])
            except (MeshidError, ValueError) as exc:
                refused[k] = exc
                tbss.append(b"")
                validities.append((0, 0))
        return tbss, refused, serials, validities

    def mint_batch(
        self, requests: Sequence[LeafRequest], now: dt.datetime
    ) -> list[x509.Certificate | Exception]:
        """mint_batch_der with certificate objects."""
        return [
            d if isinstance(d, Exception) else x509.load_der_x509_certificate(d)
            for d in self.mint_batch_der(requests, now)
        ]

    def _try_one(self, r: LeafRequest, now: dt.datetime) -> bytes | Exception:
        try:
            return self.mint_der_from_csr(r.csr_der, r.spiffe_id, r.dns_names, r.ttl_seconds, now)
        except (MeshidError, ValueError) as exc:
            return exc

    def _mint(
        self,
        public_key: PublicKeyTypes,
        kind: str,
        spiffe_id: SpiffeId | str,
        dns_names: Sequence[str],
        ttl_seconds: int,
        now: dt.datetime,
        key_bytes: tuple[bytes, bytes] | None = None,
    ) -> bytes:
        spki, ski = _key_bytes(public_key, kind) if key_bytes is None else key_bytes
        tpl = self._template
        if tpl is not None:
            tbs = self._tbs(tpl, spki, ski, kind, spiffe_id, dns_names, ttl_seconds, now)
            return template.certificate_der(tbs, tpl.signature_algorithm, self._sign(tbs))
        _, uri, dns, serial, not_before, not_after, _ = self._plan(
            spki, spiffe_id, dns_names, ttl_seconds, now
        )
        cert = build_leaf_with_builder(
            self.ca_key,
            self._issuer_name,
            self._aki,
            cast(PublicKey, public_key),
            uri,
            dns,
            serial,
            _utc(not_before),
            _utc(not_after),
        )
        return cert.public_bytes(_DER)

    def _tbs(
        self,
        tpl: template.LeafTemplate,
        spki: bytes,
        ski: bytes,
        kind: str,
        spiffe_id: SpiffeId | str,
        dns_names: Sequence[str],
        ttl_seconds: int,
        now: dt.datetime,
    ) -> bytes:
        ident, _, _, serial, _, _, middle = self._plan(spki, spiffe_id, dns_names, ttl_seconds, now)
        return tpl.tbs_from_parts(serial, middle, spki, ski, ident[1], kind is _RSA)

    def _plan(
        self,
        spki: bytes,
        spiffe_id: SpiffeId | str,
        dns_names: Sequence[str],
        ttl_seconds: int,
        now: dt.datetime,
    ) -> tuple[_Identity, str, tuple[str, ...], int, int, int, bytes]:
        """Check one request; (identity, uri, dns, serial, notBefore, notAfter, template middle)."""
        if type(ttl_seconds) is not int or ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be a positive integer")
        uri = spiffe_id if isinstance(spiffe_id, str) else str(spiffe_id)
        dns = tuple(dns_names)
        ident = self._identity_cache.get((uri, dns))
        if ident is None:
            ident = self._identity(uri, dns)
        if spki == self._ca_spki:
            raise SigningError("refusing to issue an SVID for the CA's own key")
        not_before, not_after, middle = self._validity(now, ttl_seconds)
        return ident, uri, dns, random_serial(), not_before, not_after, middle

    def chain_der(self, leaf: x509.Certificate | bytes) -> bytes:
        """Leaf + CA + upstream chain as concatenated DER."""
        return chain_der(leaf, self._chain_der)

    # -- caches (single attribute/dict updates: atomic under the GIL) -------------------

    def _validity(self, now: dt.datetime, ttl_seconds: int) -> tuple[int, int, bytes]:
        """(notBefore, notAfter, template middle) for a mint at `now`; the last answer is
        kept (a batch shares one `now`, and a busy second shares its encoding)."""
        cached = self._validity_cache
        if cached[0] is now and cached[1] == ttl_seconds:
            return cached[3]
        now_ts = _epoch(now)
        if cached[2] == now_ts and cached[1] == ttl_seconds:
            self._validity_cache = (now, ttl_seconds, now_ts, cached[3])
            return cached[3]
        if now_ts >= self._ca_not_after:
            raise SigningError(f"CA certificate expired at {_utc(self._ca_not_after).isoformat()}")
        if now_ts < self._ca_not_before:
            # The clock stepped back past the CA's start: the leaf would begin in the future
            # (after its own notAfter, for a short TTL).
            raise SigningError(f"CA certificate is not valid until {_utc(self._ca_not_before).isoformat()}")
        not_before = max(now_ts - BACKDATE_SECONDS, self._ca_not_before)
        not_after = min(now_ts + ttl_seconds, self._ca_not_after)
        validity = template.der_validity(not_before, not_after)
        middle = self._template.middle(validity) if self._template is not None else b""
        result = (not_before, not_after, middle)
        self._validity_cache = (now, ttl_seconds, now_ts, result)
        return result

    def _identity(self, uri: str, dns: tuple[str, ...]) -> _Identity:
        """Check an SVID identity once; cache its SAN extension and template pieces."""
        sid = SpiffeId.parse(uri)
        if sid.is_trust_domain_id:
            raise InvalidSpiffeIdError(f"{sid} has no path: an X509-SVID needs a workload path")
        if self.trust_domain is not None and sid.trust_domain != self.trust_domain:
            raise InvalidSpiffeIdError(f"{sid} is not in this CA's trust domain {self.trust_domain}")
        for name in dns:
            if not isinstance(name, str) or not name:
                raise ValueError("DNS names must be non-empty strings")
        san = template.san_extension(uri, dns)
        parts = self._template.identity(san) if self._template is not None else (b"", b"", b"")
        if len(self._identity_cache) >= _IDENTITY_CACHE_MAX:
            self._identity_cache.clear()
        self._identity_cache[(uri, dns)] = ident = (san, parts)
        return ident


# ---------------------------------------------------------------------------- JWT-SVIDs

_EC_JWT_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_RSA_JWT_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})


def mint_jwt_svid(
    key: PrivateKeyTypes,
    kid: str,
    spiffe_id: SpiffeId | str,
    audience: Sequence[str],
    ttl_seconds: int,
    now: dt.datetime,
    issuer: str | None = None,
    alg: str | None = None,
    key_not_after: dt.datetime | None = None,
) -> str:
    """A JWS-compact JWT-SVID: header `alg`, `kid`, `typ: JWT`; claims `sub`, `aud` (list),
    `exp` = min(now + ttl, key_not_after), `iat`, and `iss` when given."""
    if not kid:
        raise ValueError("kid is required (go-spiffe refuses JWT-SVIDs without one)")
    if isinstance(audience, str) or not audience:
        raise ValueError("audience must be a non-empty list of strings")
    aud = list(audience)
    if not all(isinstance(a, str) and a for a in aud):
        raise ValueError("audience entries must be non-empty strings")
    if not isinstance(ttl_seconds, int) or ttl_seconds <= 0:
        raise ValueError("ttl_seconds must be a positive integer")
    sid = _as_spiffe_id(spiffe_id)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"unsupported JWT signing key {type(key).__name__}")
    chosen = alg or jwt_alg_for(key)
    _check_jwt_alg(key, chosen)
    iat = _epoch(now)
    exp = iat + ttl_seconds
    if key_not_after is not None:
        exp = min(exp, _epoch(key_not_after))
    if exp <= iat:
        raise SigningError("JWT signing key has expired")
    claims: dict[str, Any] = {"sub": str(sid), "aud": aud, "exp": exp, "iat": iat}
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, key, algorithm=chosen, headers={"kid": kid, "typ": JWT_TYP})


def _check_jwt_alg(key: PrivateKey, alg: str) -> None:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        expected = _EC_JWT_ALGS.get(key.curve.name)
        if alg != expected:
            raise ValueError(f"JWT algorithm {alg} does not fit a {key.curve.name} key (use {expected})")
    elif isinstance(key, rsa.RSAPrivateKey):
        if alg not in _RSA_JWT_ALGS:
            raise ValueError(f"JWT algorithm {alg} does not fit an RSA key (use RS/PS 256, 384 or 512)")
    else:
        raise ValueError(f"unsupported JWT signing key {type(key).__name__}")
