"""A CSR's SubjectPublicKeyInfo bytes without re-encoding its key, for the common shape.

Encoding a loaded EC key costs OpenSSL several microseconds per SVID (a tenth of the gap
between mint rate and the raw crypto floor). When the request is the shape every meshid
agent sends (version 1, empty subject, a P-256 key with an uncompressed point), the key's
canonical SubjectPublicKeyInfo is already in the CSR, at a position that DER fixes.

Nothing is parsed here: the CSR has been parsed (strict DER) by cryptography, which also
refuses any version but v1. Its CertificationRequestInfo is then
`SEQUENCE { INTEGER 0, Name, SubjectPublicKeyInfo, [0] attributes }`, so with an empty
Name the key starts right after `30 len 02 01 00 30 00`. The SEQUENCE header is computed
from the length alone (DER lengths are minimal), and the whole run up to the point is
compared with constants; if anything differs the caller encodes the key as before. A
differential test (tests/unit/test_csr_key_bytes.py) checks the result against
cryptography's encoder over randomized and adversarial requests.
"""

from __future__ import annotations

import hashlib

from issuer.ca.template import der_header

# SubjectPublicKeyInfo of a P-256 key (id-ecPublicKey, prime256v1) up to and including
# the 0x04 that opens an uncompressed point; 91 bytes in all with X and Y.
P256_SPKI_HEAD = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d03010703420004")
P256_SPKI_SIZE = 91
_POINT_OFFSET = len(P256_SPKI_HEAD) - 1  # the point, 0x04 included, is what the SKI hashes
_sha1 = hashlib.sha1
_VERSION_1_EMPTY_SUBJECT = bytes.fromhex("0201003000")
_HEADS: dict[int, tuple[bytes, int]] = {}  # by TBS length: (expected head, SPKI offset)
_HEADS_MAX = 4096


def _head_for(size: int) -> tuple[bytes, int]:
    for header_size in (2, 3, 4):
        header = der_header(0x30, size - header_size) if size > header_size else b""
        if len(header) == header_size:
            start = header_size + len(_VERSION_1_EMPTY_SUBJECT)
            return header + _VERSION_1_EMPTY_SUBJECT + P256_SPKI_HEAD, start
    return b"\x00", 0  # no DER SEQUENCE has this length: never matches


def p256_key_bytes(tbs_certrequest: bytes) -> tuple[bytes, bytes] | None:
    """(SubjectPublicKeyInfo DER, method-1 key identifier) of a parsed CSR's key, exactly as
    template.ec_spki_and_ski gives them, when the request has the common shape; else None.

    Call it only after cryptography has loaded the CSR's key (which checks the point).
    """
    size = len(tbs_certrequest)
    found = _HEADS.get(size)
    if found is None:
        found = _head_for(size)
        if len(_HEADS) < _HEADS_MAX:
            _HEADS[size] = found
    head, start = found
    if size < start + P256_SPKI_SIZE or not tbs_certrequest.startswith(head):
        return None
    spki = tbs_certrequest[start : start + P256_SPKI_SIZE]
    # SHA-1 here names a key; it protects nothing.
    return spki, _sha1(spki[_POINT_OFFSET:], usedforsecurity=False).digest()
