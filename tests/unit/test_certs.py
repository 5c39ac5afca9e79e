"""ChainWalker: a chain (leaf first) reaches one of the roots link by link, whatever it
remembers of chains it has already walked."""

from __future__ import annotations

import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from pki_helpers import ca_cert, make_ca, make_leaf

from meshid import certs
from meshid.certs import ChainWalker


def intermediate(
    root: x509.Certificate, root_key: ec.EllipticCurvePrivateKey, name: str = "intermediate"
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = time.time()
    return ca_cert(name, key, root_key, root, now - 60, now + 3600), key


Pki = tuple[x509.Certificate, x509.Certificate, ec.EllipticCurvePrivateKey]  # root, intermediate, its key


@pytest.fixture
def pki() -> Pki:
    root, root_key = make_ca()
    mid, mid_key = intermediate(root, root_key)
    return root, mid, mid_key


def test_chains_ending_at_or_below_a_root_reach_it(pki: Pki) -> None:
    root, mid, mid_key = pki
    leaf, _ = make_leaf(mid, mid_key, "spiffe://example.org/w")
    assert ChainWalker([root]).reaches_root([leaf, mid])
    assert ChainWalker([root]).reaches_root([leaf, mid, root])
    direct, _ = make_leaf(*make_ca("other"), "spiffe://example.org/w")
    assert not ChainWalker([root]).reaches_root([direct])


def test_a_broken_link_or_another_root_does_not(pki: Pki) -> None:
    root, mid, mid_key = pki
    other_root, other_key = make_ca("test root")  # same name, other key
    forged, forged_key = intermediate(other_root, other_key)
    leaf, _ = make_leaf(forged, forged_key, "spiffe://example.org/w")
    assert not ChainWalker([root]).reaches_root([leaf, forged])
    assert not ChainWalker([root]).reaches_root([leaf, mid])  # mid did not sign it
    assert not ChainWalker([]).reaches_root([leaf, mid])
    assert not ChainWalker([root]).reaches_root([])


def test_a_walked_intermediate_is_remembered_but_each_leaf_is_still_checked(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, mid, mid_key = pki
    walker = ChainWalker([root])
    leaves = [make_leaf(mid, mid_key, f"spiffe://example.org/w{i}")[0] for i in range(3)]
    assert walker.reaches_root([leaves[0], mid])
    checks: list[str] = []
    real = certs.issued_by

    def counted(child: x509.Certificate, parent: x509.Certificate) -> bool:
        checks.append(parent.subject.rfc4514_string())
        return real(child, parent)

    monkeypatch.setattr(certs, "issued_by", counted)
    assert walker.reaches_root([leaves[1], mid]) and walker.reaches_root([leaves[2], mid])
    assert checks == ["CN=intermediate", "CN=intermediate"]  # one check per leaf, mid not again
    # A leaf the remembered intermediate did not sign is still refused.
    stranger, _ = make_leaf(*make_ca("intermediate"), "spiffe://example.org/x")
    assert not walker.reaches_root([stranger, mid])


def test_a_remembered_intermediate_does_not_stand_in_for_the_rest_of_its_chain(pki: Pki) -> None:
    """Remembering `mid2` from [leaf, mid2, mid] must not make [leaf, mid2] (mid left out:
    peers holding only the root cannot build the path) or [leaf, mid2, junk] pass: each
    answer is the one a walker that remembers nothing gives."""
    root, mid, mid_key = pki
    mid2, mid2_key = intermediate(mid, mid_key, "intermediate 2")
    leaves = [make_leaf(mid2, mid2_key, f"spiffe://example.org/w{i}")[0] for i in range(3)]
    junk, _ = make_ca("junk")
    walker = ChainWalker([root])
    assert walker.reaches_root([leaves[0], mid2, mid])
    for chain in ([leaves[1], mid2], [leaves[2], mid2, junk]):
        assert not ChainWalker([root]).reaches_root(chain)
        assert not walker.reaches_root(chain), chain
    assert walker.reaches_root([leaves[1], mid2, mid])
