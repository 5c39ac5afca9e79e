"""The agent's own SVID from a faulty server: a renewal or attestation answer that is not
an SVID for the agent's new key, in its trust domain and still valid, is refused before
anything is replaced or persisted (the agent keeps the identity it had)."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from test_manager_schedule import AGENT, Ca, Clock

from workload_api.config import agent_config_from_dict
from workload_api.keys import csr_for, new_key
from workload_api.node_identity import KEY_FILE, STATE_FILE, SVID_FILE, NodeIdentity
from workload_api.rotation import RotationPolicy
from workload_api.server_client import ServerRejectedError


class FakeClient:
    def __init__(self) -> None:
        self.answer: Any = None  # fn(csr) -> chain, for renew
        self.identity: Any = None

    async def renew(self, csr: bytes) -> list[x509.Certificate]:
        return self.answer(csr)  # type: ignore[no-any-return]

    def set_identity(self, chain: Any, key: Any) -> None:
        self.identity = (chain, key)


def node_for(tmp_path: Path, clock: Clock) -> tuple[NodeIdentity, FakeClient]:
    config = agent_config_from_dict({
        "trust_domain": "example.org", "data_dir": str(tmp_path), "server_address": ["127.0.0.1:1"],
        "trust_bundle_path": str(tmp_path / "root.pem"), "socket_path": str(tmp_path / "w.sock"),
        "node_attestor": {"join_token": {"token": "t"}},
    })
    client = FakeClient()
    node = NodeIdentity(config, client, RotationPolicy(0.5, 0.8), random.Random(1), clock)  # type: ignore[arg-type]
    return node, client


@pytest.mark.parametrize("bad,why", [
    ("other_key", "for a different key"),  # was adopted, persisted, and broke every mTLS context
    ("expired", "already expired"),
    ("other_td", "outside trust domain"),
])
async def test_a_bad_renewal_leaves_the_agent_svid_in_place(tmp_path: Path, bad: str, why: str) -> None:
    clock = Clock()
    ca = Ca(clock)
    node, client = node_for(tmp_path, clock)
    client.answer = lambda csr: ca.sign(csr, AGENT)
    await node.renew()
    held, held_file = node.chain, (tmp_path / SVID_FILE).read_bytes()

    def faulty(csr: bytes) -> list[x509.Certificate]:
        if bad == "other_key":
            return ca.sign(csr_for(new_key()), AGENT)
        if bad == "expired":
            return Ca(Clock(clock() - 7200)).sign(csr, AGENT)
        req = x509.load_der_x509_csr(csr)
        now = dt.datetime.fromtimestamp(clock(), dt.UTC)
        leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca.cert.subject)
                .public_key(req.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(now + dt.timedelta(hours=1))
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                    "spiffe://elsewhere.org/meshid/agent/test")]), critical=True)
                .sign(ca.key, hashes.SHA256()))
        return [leaf, ca.cert]

    client.answer = faulty
    with pytest.raises(ServerRejectedError, match=why):
        await node.renew()
    assert node.chain is held and client.identity[0] is held
    assert (tmp_path / SVID_FILE).read_bytes() == held_file


@pytest.mark.parametrize("unwritable", [KEY_FILE, SVID_FILE, STATE_FILE])
async def test_a_renewal_that_cannot_be_saved_is_not_used(tmp_path: Path, unwritable: str) -> None:
    """The server accepts the SVID the agent holds until the agent presents the new one.
    A new SVID that could not be saved was put in use all the same (the first call made it
    the server's current one) and, written file by file, could leave the new key beside the
    old SVID: a restart then had no usable pair. Now it is saved whole before use, or not
    used, and a restart comes back with the SVID held before."""
    clock = Clock()
    ca = Ca(clock)
    node, client = node_for(tmp_path, clock)
    client.answer = lambda csr: ca.sign(csr, AGENT)
    await node.renew()
    held, held_key = node.chain, node.key
    saved = {name: (tmp_path / name).read_bytes() for name in (KEY_FILE, SVID_FILE, STATE_FILE)}
    (tmp_path / (unwritable + ".tmp")).mkdir()  # its write fails, as on a full disk
    with pytest.raises(OSError):
        await node.renew()
    assert node.chain is held and client.identity == (held, held_key)
    assert {name: (tmp_path / name).read_bytes() for name in saved} == saved
    assert not [p.name for p in tmp_path.iterdir() if p.is_file() and p.name.endswith(".tmp")]

    restarted, restarted_client = node_for(tmp_path, clock)
    assert restarted.load()
    assert restarted.chain == held and restarted_client.identity[0] == held


@pytest.mark.parametrize("first", [
    {}, {"challenge": "AAAA"}, {"session": "s"}, {"challenge": 5, "session": "s"},
    {"challenge": "not base64!", "session": "s"}, {"challenge": "", "session": "s"},
    {"challenge": "AAAA", "session": ["s"]},
])
async def test_a_garbled_x509pop_challenge_is_a_named_error(tmp_path: Path, first: dict[str, Any]) -> None:
    """It raised KeyError or binascii.Error: a traceback per retry instead of one line."""
    from pki_helpers import make_ca, make_leaf, write_pem

    ca, ca_key = make_ca()
    cert, key = make_leaf(ca, ca_key, dns=["node1"])
    write_pem(tmp_path / "node.pem", cert)
    write_pem(tmp_path / "node.key", key)
    config = agent_config_from_dict({
        "trust_domain": "example.org", "data_dir": str(tmp_path / "d"), "server_address": ["127.0.0.1:1"],
        "trust_bundle_path": str(tmp_path / "root.pem"), "socket_path": str(tmp_path / "w.sock"),
        "node_attestor": {"x509pop": {"certificate_path": str(tmp_path / "node.pem"),
                                      "private_key_path": str(tmp_path / "node.key")}},
    })

    class Client(FakeClient):
        async def attest(self, kind: str, payload: Any, csr: bytes) -> dict[str, Any]:
            return first

    node = NodeIdentity(config, Client(), RotationPolicy(0.5, 0.8), random.Random(1), Clock())  # type: ignore[arg-type]
    with pytest.raises(ServerRejectedError, match="x509pop"):
        await node.attest()
