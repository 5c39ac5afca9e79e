"""The per-address limit on node attestation attempts (issuer/node_attestation.py)."""

from __future__ import annotations

import pytest

from issuer import node_attestation
from issuer.node_attestation import AgentService
from meshid.errors import OverloadedError
from meshid.spiffe_id import TrustDomain

TABLE = 100


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch) -> AgentService:
    monkeypatch.setattr(node_attestation, "MAX_SOURCES", TABLE)
    # _limit touches neither the datastore nor the CA.
    return AgentService(None, None, TrustDomain("example.org"), {}, 3600.0,  # type: ignore[arg-type]
                        attest_rate_per_minute=2)


def drain(service: AgentService, source: str) -> None:
    with pytest.raises(OverloadedError):
        for _ in range(3):
            service._limit(source)


def test_a_flood_of_new_addresses_does_not_reset_the_flooders_bucket(service: AgentService) -> None:
    """At MAX_SOURCES the table was wiped, every address's limit with it."""
    for i in range(TABLE - 1):
        service._limit(f"10.0.0.{i}")  # agents seen earlier, idle since
    drain(service, "192.0.2.1")
    for i in range(TABLE - 1):
        service._limit(f"198.51.100.{i}")  # the flood: these push out the idle ones
    assert len(service._sources) == TABLE
    with pytest.raises(OverloadedError):
        service._limit("192.0.2.1")
    # An address that keeps trying stays in the table however many new ones come.
    for i in range(3 * TABLE):
        service._limit(f"203.0.113.{i}")
        with pytest.raises(OverloadedError):
            service._limit("192.0.2.1")
    assert len(service._sources) == TABLE


def test_the_least_recently_used_address_is_the_one_dropped(service: AgentService) -> None:
    for i in range(TABLE):
        service._limit(f"10.0.0.{i}")
    service._limit("10.0.0.0")  # used again: now the most recent
    service._limit("192.0.2.1")
    assert "10.0.0.0" in service._sources
    assert "10.0.0.1" not in service._sources
    assert len(service._sources) == TABLE
