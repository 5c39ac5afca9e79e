"""Concatenated DER certificates (the Workload API's x509_svid / bundle fields).

pyasn1 finds each element's boundary (as py-spiffe does); cryptography parses each one.
"""

from __future__ import annotations

from cryptography import x509
from pyasn1.codec.der.decoder import decode
from pyasn1.error import PyAsn1Error
from pyasn1.type import univ

MAX_CERTS = 64


def load_der_certificates(data: bytes) -> list[x509.Certificate]:
    certs: list[x509.Certificate] = []
    rest = bytes(data)
    while rest:
        if len(certs) >= MAX_CERTS:
            raise ValueError(f"more than {MAX_CERTS} certificates")
        try:
            # Any: take the element's TLV as opaque bytes; cryptography parses the content.
            _, remainder = decode(rest, asn1Spec=univ.Any())
        except PyAsn1Error as exc:
            raise ValueError(f"malformed DER certificate list: {exc}") from None
        size = len(rest) - len(remainder)
        certs.append(x509.load_der_x509_certificate(rest[:size]))
        rest = bytes(remainder)
    return certs
