"""TLS 1.3-only contexts built from in-memory SVIDs, and SPIFFE-ID peer checks.

Python's ssl module only loads keys from files; we hand it an anonymous memfd so the
private key never touches a filesystem.  Server contexts are swapped through an SNI
callback so a rotated SVID or bundle applies to the next handshake without restarting
the listener.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from meshid.errors import UnauthenticatedError
from meshid.spiffe_id import SpiffeId, TrustDomain


def pem_chain(chain: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)


def pem_key(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_chain(ctx: ssl.SSLContext, chain: Sequence[x509.Certificate], key: PrivateKeyTypes) -> None:
    fd = os.memfd_create("meshid-svid", os.MFD_CLOEXEC)
    try:
        os.write(fd, pem_key(key) + pem_chain(chain))
        path = f"/proc/self/fd/{fd}"
        ctx.load_cert_chain(path, path)
    finally:
        os.close(fd)


def _base(purpose: ssl.Purpose) -> ssl.SSLContext:
    # Not ssl.create_default_context: for clients it also loads the system CA store, so
    # SPIFFE peers would be trusted via any public CA as well as the bundle (and each
    # context would cost ~35 ms of blocking file parsing). Trust comes from the bundle only.
    protocol = ssl.PROTOCOL_TLS_CLIENT if purpose == ssl.Purpose.SERVER_AUTH else ssl.PROTOCOL_TLS_SERVER
    ctx = ssl.SSLContext(protocol)
    # TLS 1.3 only on every listener and client: no downgrade option exists.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def _cadata(roots: Iterable[x509.Certificate]) -> str:
    return pem_chain(list(roots)).decode()


def server_context(
    chain: Sequence[x509.Certificate],
    key: PrivateKeyTypes,
    client_roots: Iterable[x509.Certificate] | None = None,
    client_cert: str = "required",
    alpn: Sequence[str] | None = None,
) -> ssl.SSLContext:
    """client_cert: "required" (mTLS), "optional" (agent API: attestation has no cert yet) or "none"."""
    ctx = _base(ssl.Purpose.CLIENT_AUTH)
    _load_chain(ctx, chain, key)
    if client_cert == "none":
        ctx.verify_mode = ssl.CERT_NONE
    else:
        roots = list(client_roots or [])
        if not roots:
            raise ValueError("client roots are required to verify client certificates")
        ctx.load_verify_locations(cadata=_cadata(roots))
        ctx.verify_mode = ssl.CERT_REQUIRED if client_cert == "required" else ssl.CERT_OPTIONAL
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def client_context(
    roots: Iterable[x509.Certificate],
    chain: Sequence[x509.Certificate] | None = None,
    key: PrivateKeyTypes | None = None,
    alpn: Sequence[str] | None = None,
) -> ssl.SSLContext:
    """Verifies the server chain to `roots`; hostname checks are replaced by SPIFFE-ID checks."""
    ctx = _base(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=_cadata(roots))
    if chain is not None and key is not None:
        _load_chain(ctx, chain, key)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


class SwappableServerContext:
    """A listener's context whose certificate/trust can be replaced for new handshakes."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.current = ctx
        self.outer = ctx
        self.outer.sni_callback = self._sni

    def _sni(self, sslobj: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        if self.current is not self.outer:
            sslobj.context = self.current

    def replace(self, ctx: ssl.SSLContext) -> None:
        self.current = ctx


def spiffe_id_of_cert(cert: x509.Certificate) -> SpiffeId:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise UnauthenticatedError("peer certificate has no URI SAN") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise UnauthenticatedError("peer certificate must have exactly one URI SAN")
    try:
        return SpiffeId.parse(uris[0])
    except ValueError as exc:
        raise UnauthenticatedError(f"peer certificate URI SAN is not a SPIFFE ID: {exc}") from None


def peer_spiffe_id(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> SpiffeId:
    """SPIFFE ID of a verified peer certificate (the handshake already checked the chain)."""
    if ssl_object is None:
        raise UnauthenticatedError("not a TLS connection")
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise UnauthenticatedError("no client certificate presented")
    return spiffe_id_of_cert(x509.load_der_x509_certificate(der))


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> x509.Certificate | None:
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


def check_server_id(
    ssl_object: ssl.SSLObject | ssl.SSLSocket | None, expected: SpiffeId | TrustDomain
) -> None:
    got = peer_spiffe_id(ssl_object)
    if isinstance(expected, TrustDomain):
        if got.trust_domain != expected:
            raise UnauthenticatedError(f"server {got} is not in trust domain {expected}")
    elif got != expected:
        raise UnauthenticatedError(f"server presented {got}, expected {expected}")
