"""A throw-away upstream PKI for `meshid dev` and tests: a P-384 root and a P-256
intermediate, so a single machine runs the production chain shape (leaf → meshid CA →
upstream intermediate → root)."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from issuer.ca.minting import random_serial
from meshid.tls import pem_chain, pem_key


@dataclass(frozen=True)
class UpstreamFiles:
    cert_file: Path  # intermediate, then root
    key_file: Path  # intermediate key
    bundle_file: Path  # root only


def _ca(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    days: int,
    path_length: int | None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshid dev"),
            x509.NameAttribute(NameOID.COMMON_NAME, subject),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(ski, critical=False)
    )
    aki_src = issuer.public_key() if issuer else key.public_key()
    b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(aki_src), critical=False)  # type: ignore[arg-type]
    return b.sign(
        issuer_key, hashes.SHA384() if isinstance(issuer_key.curve, ec.SECP384R1) else hashes.SHA256()
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def ensure_dev_upstream(directory: Path, days: int = 3650) -> UpstreamFiles:
    """Create the dev root and intermediate once; later starts reuse them."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = UpstreamFiles(
        directory / "intermediate.pem", directory / "intermediate.key", directory / "root.pem"
    )
    if files.cert_file.exists() and files.key_file.exists() and files.bundle_file.exists():
        return files
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = _ca("meshid dev root", root_key, None, root_key, days, None)
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter = _ca("meshid dev intermediate", inter_key, root, root_key, days - 1, 1)
    _write(directory / "root.key", pem_key(root_key), 0o600)
    _write(files.key_file, pem_key(inter_key), 0o600)
    _write(files.cert_file, pem_chain([inter, root]), 0o644)
    _write(files.bundle_file, pem_chain([root]), 0o644)
    return files
