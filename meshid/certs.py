"""Key identifiers of certificates, as hex strings (how CA keys and SVIDs are matched up),
and signature walks of certificate chains up to a set of roots."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization

_SHA256 = hashes.SHA256()
# Chain tails (a CA and those above it) a ChainWalker remembers as leading to its roots: a
# handful in practice (our CAs and their upstream intermediates); the bound only keeps a
# stream of odd chains from growing it.
_MAX_KNOWN_TAILS = 256


def authority_key_id(cert: x509.Certificate) -> str:
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return ""
    return aki.key_identifier.hex() if aki.key_identifier else ""


def subject_key_id(cert: x509.Certificate) -> str:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
    except x509.ExtensionNotFound:
        return ""


def spki_der(public_key: Any) -> bytes:
    """SubjectPublicKeyInfo DER of a public key: how two keys of any type are compared."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return bytes(der)


def issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    """Whether `parent` issued `child`: names match and parent's key verifies the signature."""
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


class ChainWalker:
    """Whether chains (leaf first) are signed link by link up to one of `roots` (the chain
    may end at a root or just below one). A signature walk, not full path validation: for
    checking what our own server hands us, not for authenticating a peer.

    The CA part of a chain that reached a root is remembered, each CA with the rest of the
    chain above it, so a batch of SVIDs from one CA costs one signature check each (~120 µs
    for P-256), not one per link. A CA alone is not enough: the same intermediate sent
    without the one above it, or with a stranger above it, does not reach a root."""

    def __init__(self, roots: Sequence[x509.Certificate]) -> None:
        self.roots = tuple(roots)
        self._root_fps = {r.fingerprint(_SHA256) for r in self.roots}
        self._known: set[tuple[bytes, ...]] = set()  # fingerprints of walked chain tails

    def reaches_root(self, chain: Sequence[x509.Certificate]) -> bool:
        if not chain or not self.roots:
            return False
        fps = tuple(c.fingerprint(_SHA256) for c in chain)
        for i, (child, parent) in enumerate(itertools.pairwise(chain), 1):
            if not issued_by(child, parent):
                return False
            if fps[i:] in self._known:
                return True
        top = chain[-1]
        if not (fps[-1] in self._root_fps or any(issued_by(top, r) for r in self.roots)):
            return False
        if len(self._known) > _MAX_KNOWN_TAILS:
            self._known.clear()
        self._known.update(fps[k:] for k in range(1, len(fps)))
        return True
