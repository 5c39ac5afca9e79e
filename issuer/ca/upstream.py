"""Upstream authorities: who signs the issuer's X509 CA certificate.

`UpstreamAuthority` is the plug-in interface (one per upstream kind). `DiskUpstreamAuthority`
signs with an intermediate kept in PEM files; `SelfSignedAuthority` stands in when no
upstream is configured and the CA certificate is its own root.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from issuer.ca import minting
from issuer.ca.keys import PrivateKey
from issuer.ca.sealing import warn_if_others_can_read
from meshid.certs import issued_by
from meshid.errors import ConfigError, InvalidSpiffeIdError
from meshid.spiffe_id import SpiffeId, TrustDomain

MAX_PEM_FILE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class UpstreamResult:
    ca_cert: x509.Certificate
    upstream_chain: list[x509.Certificate]  # signer of ca_cert first, up to (excluding) the roots
    roots: list[x509.Certificate]


class UpstreamAuthority(Protocol):
    name: str

    async def mint_x509_ca(self, csr_der: bytes, ttl_seconds: int, now: dt.datetime) -> UpstreamResult:
        """Sign the issuer's CA CSR. The result's lifetime may be shorter than asked."""
        ...


class SelfSignedAuthority:
    """No upstream: the CA certificate is signed by its own key and is its own root.

    Signing needs the CA private key, which an upstream plug-in never sees, so this is
    not an UpstreamAuthority: callers use it (or minting.self_signed_ca) directly.
    """

    name = "self_signed"

    def __init__(self, trust_domain: TrustDomain) -> None:
        self.trust_domain = trust_domain

    def mint_self_signed(self, ca_key: PrivateKey, ttl_seconds: int, now: dt.datetime) -> UpstreamResult:
        cert = minting.self_signed_ca(ca_key, self.trust_domain, ttl_seconds, now)
        return UpstreamResult(ca_cert=cert, upstream_chain=[], roots=[cert])


@dataclass(frozen=True)
class _Material:
    cert: x509.Certificate
    key: PrivateKey
    chain: list[x509.Certificate]  # cert_file minus any roots: the signer first
    roots: list[x509.Certificate]


class DiskUpstreamAuthority:
    """Signs CA certificates with an upstream intermediate kept on disk.

    - `cert_file`: PEM, the signing (intermediate) certificate first, then optionally the
      chain above it.
    - `key_file`: PEM private key of the signing certificate (unencrypted; protect the file).
    - `bundle_file`: PEM root certificate(s); the chain must end at one of them.

    The files are re-read (in an executor) on every call, so replacing them on disk takes
    effect at the next CA rotation without a restart.
    """

    name = "disk"

    def __init__(
        self, cert_file: str, key_file: str, bundle_file: str, trust_domain: TrustDomain | None = None
    ) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.bundle_file = bundle_file
        # When None, the trust domain comes from the `spiffe://td` URI SAN of our own CSR.
        self.trust_domain = trust_domain

    def __repr__(self) -> str:
        return f"DiskUpstreamAuthority(cert_file={self.cert_file!r}, bundle_file={self.bundle_file!r})"

    async def mint_x509_ca(self, csr_der: bytes, ttl_seconds: int, now: dt.datetime) -> UpstreamResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.mint_x509_ca_sync, csr_der, ttl_seconds, now)

    def mint_x509_ca_sync(self, csr_der: bytes, ttl_seconds: int, now: dt.datetime) -> UpstreamResult:
        material = self._load(now)
        csr, pub = minting.parse_csr(csr_der)
        td = self.trust_domain or _csr_trust_domain(csr)
        cert = minting.mint_ca_cert(
            pub,
            td,
            material.key,
            ttl_seconds,
            now,
            issuer=material.cert,
            not_after_limit=min(c.not_valid_after_utc for c in [material.cert, *material.chain]),
        )
        return UpstreamResult(ca_cert=cert, upstream_chain=list(material.chain), roots=list(material.roots))

    def _load(self, now: dt.datetime) -> _Material:
        """Read and check the upstream files; ConfigError naming the file and the problem."""
        certs = _read_certs(self.cert_file, "upstream cert_file")
        key = _read_key(self.key_file)
        roots = _read_certs(self.bundle_file, "upstream bundle_file")
        signer = certs[0]
        if _spki(key.public_key()) != _spki(signer.public_key()):
            raise ConfigError(
                f"upstream key_file {self.key_file} does not match the first certificate in {self.cert_file}"
            )
        _check_can_sign_ca(signer, self.cert_file, now)
        _check_chain(certs, roots, self.cert_file, self.bundle_file)
        # The chain handed to clients stops below the roots: roots only go to trust stores.
        root_spkis = {_spki(r.public_key()) for r in roots}
        chain = [c for c in certs if _spki(c.public_key()) not in root_spkis]
        _check_path_lengths(chain, roots, self.cert_file, self.bundle_file)
        at = _aware(now)
        for c in chain:
            if c.not_valid_after_utc <= at:
                raise ConfigError(
                    f"upstream cert_file {self.cert_file}: {c.subject.rfc4514_string()!r} "
                    f"expired at {c.not_valid_after_utc.isoformat()}"
                )
        return _Material(cert=signer, key=key, chain=chain, roots=roots)


def _aware(now: dt.datetime) -> dt.datetime:
    return now if now.tzinfo is not None else now.replace(tzinfo=dt.UTC)


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _read_file(path: str, what: str, secret: bool = False) -> bytes:
    if not path:
        raise ConfigError(f"{what} is not set")
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_PEM_FILE_BYTES + 1)
            if secret:
                warn_if_others_can_read(fh.fileno(), path, what)
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise ConfigError(f"{what} {path}: cannot read it ({reason})") from None
    if len(data) > MAX_PEM_FILE_BYTES:
        raise ConfigError(f"{what} {path}: larger than {MAX_PEM_FILE_BYTES} bytes")
    if not data.strip():
        raise ConfigError(f"{what} {path}: file is empty")
    return data


def _read_certs(path: str, what: str) -> list[x509.Certificate]:
    data = _read_file(path, what)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(f"{what} {path}: no valid PEM certificates found") from None
    return certs


def _read_key(path: str) -> PrivateKey:
    data = _read_file(path, "upstream key_file", secret=True)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"upstream key_file {path}: key is encrypted; it must be unencrypted PEM") from None
    except (ValueError, UnsupportedAlgorithm):
        # Never echo the parser's detail: it could quote key bytes.
        raise ConfigError(f"upstream key_file {path}: not a valid PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ConfigError(f"upstream key_file {path}: unsupported key {type(key).__name__}; use EC or RSA")
    return key


def _check_can_sign_ca(cert: x509.Certificate, path: str, now: dt.datetime) -> None:
    subject = cert.subject.rfc4514_string()
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise ConfigError(f"upstream cert_file {path}: {subject!r} is not a CA (basicConstraints CA=true)")
    if bc.path_length == 0:
        raise ConfigError(
            f"upstream cert_file {path}: {subject!r} has pathLenConstraint 0 and cannot sign the issuer's "
            "intermediate CA; use an upstream certificate with pathlen >= 1 or none"
        )
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise ConfigError(f"upstream cert_file {path}: {subject!r} lacks keyCertSign in its key usage")
    except x509.ExtensionNotFound:
        pass
    at = _aware(now)
    if cert.not_valid_after_utc <= at:
        raise ConfigError(
            f"upstream cert_file {path}: {subject!r} expired at {cert.not_valid_after_utc.isoformat()}"
        )
    if cert.not_valid_before_utc > at:
        raise ConfigError(
            f"upstream cert_file {path}: {subject!r} is not valid yet "
            f"(from {cert.not_valid_before_utc.isoformat()})"
        )


def _check_chain(
    certs: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], cert_path: str, bundle_path: str
) -> None:
    """Each cert in cert_file must be issued by the next; the last must be (or be issued by) a root."""
    for child, parent in itertools.pairwise(certs):
        if not issued_by(child, parent):
            raise ConfigError(
                f"upstream cert_file {cert_path}: {child.subject.rfc4514_string()!r} is not issued by the "
                f"next one, {parent.subject.rfc4514_string()!r} (order: signer first, then up the chain)"
            )
    last = certs[-1]
    root_spkis = {_spki(r.public_key()) for r in roots}
    if _spki(last.public_key()) in root_spkis:
        return
    if not any(issued_by(last, r) for r in roots):
        raise ConfigError(
            f"upstream bundle_file {bundle_path}: no root issued {last.subject.rfc4514_string()!r} "
            f"(the end of {cert_path})"
        )


def _check_path_lengths(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], cert_path: str, bundle_path: str
) -> None:
    """Every CA above the issuer's CA must allow the CAs below it (RFC 5280 pathLenConstraint:
    non-self-issued intermediates, the issuer's own CA included). Otherwise every SVID it
    signs fails verification in clients (OpenSSL, Go) while the upstream looks fine here.
    `chain` is the signer first, up to but without the roots (empty: a root signs)."""
    below = 1  # the issuer's CA certificate
    for cert in chain:
        _check_path_length(cert, below, f"upstream cert_file {cert_path}")
        if cert.subject != cert.issuer:
            below += 1
    if chain:
        for root in roots:
            if issued_by(chain[-1], root):
                _check_path_length(root, below, f"upstream bundle_file {bundle_path}")


def _check_path_length(cert: x509.Certificate, below: int, where: str) -> None:
    try:
        limit = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
    except x509.ExtensionNotFound:
        return
    if limit is not None and limit < below:
        raise ConfigError(
            f"{where}: {cert.subject.rfc4514_string()!r} has pathLenConstraint {limit}, but {below} CA "
            f"certificate(s) would sit below it with the issuer's own CA; SVIDs would not verify"
        )


def _csr_trust_domain(csr: x509.CertificateSigningRequest) -> TrustDomain:
    """Trust domain from the CSR's single `spiffe://td` URI SAN (our own CA CSR)."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        raise minting.InvalidCsrError("CA CSR carries no URI SAN with the trust domain ID") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise minting.InvalidCsrError("CA CSR must carry exactly one URI SAN (spiffe://<trust domain>)")
    try:
        sid = SpiffeId.parse(uris[0])
    except InvalidSpiffeIdError as exc:
        raise minting.InvalidCsrError(f"CA CSR URI SAN is not a SPIFFE ID: {exc}") from None
    if not sid.is_trust_domain_id:
        raise minting.InvalidCsrError("CA CSR URI SAN must be a trust domain ID without a path")
    return sid.trust_domain
