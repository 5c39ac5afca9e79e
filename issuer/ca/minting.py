"""Minting X509-SVIDs, CA certificates and JWT-SVIDs by the SPIFFE rules (SPEC-PROTOCOLS §2).

Pure functions and one small class: every time comes from the `now` argument, nothing
here does I/O. CSRs are parsed and checked by `cryptography`; only their public key is
used, never their subject or SANs: the identity comes from the caller (the entry).

Leaf X509-SVID: empty subject with a critical SAN holding exactly one URI (the SPIFFE ID)
plus any DNS names; basicConstraints CA=false (critical); keyUsage digitalSignature, plus
keyEncipherment for RSA keys (critical); extKeyUsage serverAuth+clientAuth; SKI; AKI = the
CA's key identifier; random positive 127-bit serial; notBefore = now - 10 s; notAfter =
min(now + ttl, CA notAfter).
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias, cast

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from issuer.ca import template
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


def random_serial() -> int:
    while True:
        serial = secrets.randbits(SERIAL_BITS)
        if serial:
            return serial


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


def _signer(key: PrivateKeyTypes) -> Callable[[bytes], bytes]:
    h = signature_hash_for(key)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = ec.ECDSA(h)
        return lambda data: key.sign(data, alg)
    if isinstance(key, rsa.RSAPrivateKey):
        pad = padding.PKCS1v15()
        return lambda data: key.sign(data, pad, h)
    raise SigningError(f"unsupported signing key {type(key).__name__}")


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

_EC_CSR_ALGS: dict[x509.ObjectIdentifier, ec.ECDSA] = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA256: ec.ECDSA(hashes.SHA256()),
    SignatureAlgorithmOID.ECDSA_WITH_SHA384: ec.ECDSA(hashes.SHA384()),
    SignatureAlgorithmOID.ECDSA_WITH_SHA512: ec.ECDSA(hashes.SHA512()),
}
_RSA_CSR_HASHES: dict[x509.ObjectIdentifier, hashes.HashAlgorithm] = {
    SignatureAlgorithmOID.RSA_WITH_SHA256: hashes.SHA256(),
    SignatureAlgorithmOID.RSA_WITH_SHA384: hashes.SHA384(),
    SignatureAlgorithmOID.RSA_WITH_SHA512: hashes.SHA512(),
}
_PKCS1V15 = padding.PKCS1v15()
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
    if not isinstance(csr_der, bytes | bytearray | memoryview):
        raise InvalidCsrError("CSR must be DER bytes")
    if len(csr_der) > MAX_CSR_BYTES:
        raise InvalidCsrError(f"CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_der_x509_csr(bytes(csr_der))
    except (ValueError, x509.InvalidVersion):
        raise InvalidCsrError("CSR is not a valid DER-encoded PKCS#10 request") from None
    try:
        pub = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidCsrError(f"CSR public key is malformed or of an unsupported type ({exc})") from None
    kind = _key_kind(pub)
    oid = csr.signature_algorithm_oid
    try:
        if kind is _EC:
            alg = _EC_CSR_ALGS.get(oid)
            if alg is None:
                raise InvalidCsrError(_bad_alg(oid, "an EC"))
            cast(ec.EllipticCurvePublicKey, pub).verify(csr.signature, csr.tbs_certrequest_bytes, alg)
        else:
            rsa_pub = cast(rsa.RSAPublicKey, pub)
            h = _RSA_CSR_HASHES.get(oid)
            if h is not None:
                rsa_pub.verify(csr.signature, csr.tbs_certrequest_bytes, _PKCS1V15, h)
            elif oid == SignatureAlgorithmOID.RSASSA_PSS:
                pss = csr.signature_algorithm_parameters
                ph = csr.signature_hash_algorithm
                if not isinstance(pss, padding.PSS) or not isinstance(ph, _STRONG_HASHES):
                    raise InvalidCsrError("CSR RSASSA-PSS parameters are not supported")
                rsa_pub.verify(csr.signature, csr.tbs_certrequest_bytes, pss, ph)
            else:
                raise InvalidCsrError(_bad_alg(oid, "an RSA"))
    except InvalidSignature:
        raise InvalidCsrError("CSR signature is not valid (no proof of possession of the key)") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidCsrError(f"CSR signature could not be checked ({exc})") from None
    return csr, cast(PublicKey, pub)


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


def build_ca_csr(key: PrivateKey, trust_domain: TrustDomain) -> bytes:
    """DER CSR for an upstream authority: O=SPIFFE, URI SAN `spiffe://<td>`, CA=true."""
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
    signing_key: PrivateKey,
    ttl_seconds: int,
    now: dt.datetime,
    issuer: x509.Certificate | None = None,
    *,
    not_after_limit: dt.datetime | None = None,
    serial: int | None = None,
) -> x509.Certificate:
    """An X509 CA certificate for `public_key`: CA=true pathlen 0, keyCertSign+cRLSign
    (critical), URI SAN `spiffe://<td>`. Signed by `signing_key` under `issuer`, or
    self-signed when `issuer` is None. Lifetime never outlasts the issuer (or the limit)."""
    if ttl_seconds <= 0:
        raise SigningError("CA TTL must be positive")
    now_ts = _epoch(now)
    not_before, not_after = now_ts - BACKDATE_SECONDS, now_ts + ttl_seconds
    if not_after_limit is not None:
        not_after = min(not_after, _epoch(not_after_limit))
    signer_spki = _spki(signing_key.public_key())
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
    return builder.sign(signing_key, signature_hash_for(signing_key))


def self_signed_ca(
    key: PrivateKey, trust_domain: TrustDomain, ttl_seconds: int, now: dt.datetime
) -> x509.Certificate:
    """A self-signed CA certificate (its own root), used when no upstream is configured."""
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


_SAN_CACHE_MAX = 4096


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
        ca_key: PrivateKey,
        ca_cert: x509.Certificate,
        chain: Sequence[x509.Certificate] = (),
        *,
        fast_path: bool = True,
    ) -> None:
        if _spki(ca_key.public_key()) != _spki(ca_cert.public_key()):
            raise SigningError("CA key does not match the CA certificate")
        self.ca_key = ca_key
        self.ca_cert = ca_cert
        self.chain: list[x509.Certificate] = list(chain)
        self.trust_domain = trust_domain_of(ca_cert)
        self._sign = _signer(ca_key)
        self._issuer_name = ca_cert.subject
        self._aki = key_identifier(ca_cert)
        self._ca_not_before = _epoch(ca_cert.not_valid_before_utc)
        self._ca_not_after = _epoch(ca_cert.not_valid_after_utc)
        self._ca_spki = _spki(ca_key.public_key())
        self._chain_der = tuple(c.public_bytes(_DER) for c in (ca_cert, *self.chain))
        self._san_cache: dict[tuple[str, tuple[str, ...]], bytes] = {}
        self._validity_cache: tuple[int, int, tuple[int, int, bytes]] = (-1, 0, (0, 0, b""))
        self._template = self._make_template() if fast_path else None

    @property
    def fast_path(self) -> bool:
        return self._template is not None

    @property
    def chain_der_parts(self) -> tuple[bytes, ...]:
        """CA certificate then upstream chain, DER."""
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
        validity = template.der_validity(nb, na)
        tbs = tpl.tbs(serial, validity, spki, ski, template.san_extension(uri, dns), False)
        if template.certificate_der(tbs, algid, reference.signature) != reference.public_bytes(_DER):
            return None
        return tpl

    # -- public API -------------------------------------------------------------------

    def mint_from_csr(
        self,
        csr_der: bytes,
        spiffe_id: SpiffeId | str,
        dns_names: Sequence[str] = (),
        ttl_seconds: int = 3600,
        now: dt.datetime | None = None,
    ) -> x509.Certificate:
        """Leaf X509-SVID for the key in `csr_der` (signature checked); the CSR's names are ignored."""
        der = self.mint_der_from_csr(csr_der, spiffe_id, dns_names, ttl_seconds, now)
        return x509.load_der_x509_certificate(der)

    def mint_der_from_csr(
        self,
        csr_der: bytes,
        spiffe_id: SpiffeId | str,
        dns_names: Sequence[str] = (),
        ttl_seconds: int = 3600,
        now: dt.datetime | None = None,
    ) -> bytes:
        """As mint_from_csr, returning the leaf DER (the hot path: no certificate object)."""
        _, pub = parse_csr(csr_der)
        return self.mint_der_from_public_key(pub, spiffe_id, dns_names, ttl_seconds, now)

    def mint_from_public_key(
        self,
        public_key: PublicKeyTypes,
        spiffe_id: SpiffeId | str,
        dns_names: Sequence[str] = (),
        ttl_seconds: int = 3600,
        now: dt.datetime | None = None,
    ) -> x509.Certificate:
        """Leaf X509-SVID for a key the caller already trusts (e.g. the server's own SVID)."""
        return x509.load_der_x509_certificate(
            self.mint_der_from_public_key(public_key, spiffe_id, dns_names, ttl_seconds, now)
        )

    def mint_der_from_public_key(
        self,
        public_key: PublicKeyTypes,
        spiffe_id: SpiffeId | str,
        dns_names: Sequence[str] = (),
        ttl_seconds: int = 3600,
        now: dt.datetime | None = None,
    ) -> bytes:
        if now is None:
            raise TypeError("now is required (minting takes its clock from the caller)")
        if type(ttl_seconds) is not int or ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be a positive integer")
        uri = spiffe_id if isinstance(spiffe_id, str) else str(spiffe_id)
        dns = tuple(dns_names)
        san = self._san_cache.get((uri, dns))
        if san is None:
            san = self._identity(uri, dns)
        kind = _key_kind(public_key)
        if kind is _EC:
            spki, ski = template.ec_spki_and_ski(cast(ec.EllipticCurvePublicKey, public_key))
        else:
            spki, ski = template.rsa_spki_and_ski(public_key)
        if spki == self._ca_spki:
            raise SigningError("refusing to issue an SVID for the CA's own key")
        not_before, not_after, validity = self._validity(_epoch(now), ttl_seconds)
        serial = random_serial()
        tpl = self._template
        if tpl is not None:
            tbs = tpl.tbs(serial, validity, spki, ski, san, kind is _RSA)
            return template.certificate_der(tbs, tpl.signature_algorithm, self._sign(tbs))
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

    def chain_der(self, leaf: x509.Certificate | bytes) -> bytes:
        """Leaf + CA + upstream chain as concatenated DER."""
        return chain_der(leaf, self._chain_der)

    # -- caches (single attribute/dict updates: atomic under the GIL) -------------------

    def _validity(self, now_ts: int, ttl_seconds: int) -> tuple[int, int, bytes]:
        """(notBefore, notAfter, Validity DER) for a mint at now_ts; cached for the last second."""
        cached = self._validity_cache
        if cached[0] == now_ts and cached[1] == ttl_seconds:
            return cached[2]
        if now_ts >= self._ca_not_after:
            raise SigningError(f"CA certificate expired at {_utc(self._ca_not_after).isoformat()}")
        not_before = max(now_ts - BACKDATE_SECONDS, self._ca_not_before)
        not_after = min(now_ts + ttl_seconds, self._ca_not_after)
        result = (not_before, not_after, template.der_validity(not_before, not_after))
        self._validity_cache = (now_ts, ttl_seconds, result)
        return result

    def _identity(self, uri: str, dns: tuple[str, ...]) -> bytes:
        """Check an SVID identity once and cache its SAN extension."""
        sid = SpiffeId.parse(uri)
        if sid.is_trust_domain_id:
            raise InvalidSpiffeIdError(f"{sid} has no path: an X509-SVID needs a workload path")
        if self.trust_domain is not None and sid.trust_domain != self.trust_domain:
            raise InvalidSpiffeIdError(f"{sid} is not in this CA's trust domain {self.trust_domain}")
        for name in dns:
            if not isinstance(name, str) or not name:
                raise ValueError("DNS names must be non-empty strings")
        ext = template.san_extension(uri, dns)
        if len(self._san_cache) >= _SAN_CACHE_MAX:
            self._san_cache.clear()
        self._san_cache[(uri, dns)] = ext
        return ext


# ---------------------------------------------------------------------------- JWT-SVIDs

_EC_JWT_ALGS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_RSA_JWT_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})


def mint_jwt_svid(
    key: PrivateKey,
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
