"""The agent's manager against a faulty or compromised server (FakeClient answers): a
malformed sync is refused whole with a named error and nothing half-applied, one bad entry
or bundle is skipped and the held version kept, and nothing unusable is ever cached."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from test_manager_schedule import AGENT, Ca, entry, make

from workload_api import manager as manager_mod
from workload_api.server_client import ServerRejectedError

GOOD = {"workload_parents": [str(AGENT)], "tainted_authorities": [], "taint_window": 600}


def bundle_doc(*roots: Ca, sequence: int) -> dict[str, Any]:
    return {"keys": [{"use": "x509-svid", "x5c": [base64.b64encode(
        ca.cert.public_bytes(serialization.Encoding.DER)).decode()]} for ca in roots],
        "spiffe_sequence": sequence}


# ---------------------------------------------------------------------------- sync


@pytest.mark.parametrize("bad", [
    {"removed": 5},  # TypeError
    {"removed": [["e0"]]},  # unhashable: TypeError
    {"entries": {"id": "e9"}},  # iterated its keys: ValueError per key
    {"workload_parents": "spiffe://example.org/a"},  # parsed letter by letter
    {"tainted_authorities": [["ab"]]},
    {"tainted_authorities": None},
    {"taint_window": "soon"},
    {"taint_window": float("nan")},  # NaN taint slots never came due: the taint was ignored
    {"taint_window": -5},
    {"federated_digests": {"spiffe://other.org": "d"}, "federated_bundles": ["spiffe://other.org"]},
    {"federated_digests": {"spiffe://other.org": ["d"]}},
])
async def test_a_malformed_sync_answer_is_refused_whole(tmp_path: Path, bad: dict[str, Any]) -> None:
    mgr, _, ca, client, _ = make(tmp_path, 2)
    before = dict(mgr.cache.entries)
    client.sync_data = {**GOOD, "entries": [entry(9).to_json()], "removed": ["e0"],
                        "tainted_authorities": [ca.ski], "bundle": bundle_doc(ca, sequence=3), **bad}
    with pytest.raises(ServerRejectedError, match="bad_response"):
        await mgr.sync()
    assert mgr.cache.entries == before and mgr.cache.bundle is None and mgr.tainted_akis == set()


async def test_bad_entries_are_skipped_and_the_held_version_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mgr, _, _, client, _ = make(tmp_path, 2)
    held = mgr.cache.entries["e0"]
    changed_bad = {**entry(0, revision=2).to_json(), "selectors": ["no-colon"]}
    client.sync_data = {**GOOD, "entries": [
        entry(9).to_json(),
        changed_bad,  # a new revision that does not parse: the held one stays
        {**entry(10).to_json(), "spiffe_id": "spiffe://example.org/../x"},
        {**entry(11).to_json(), "spiffe_id": "spiffe://elsewhere.org/w/11"},  # another trust domain
        {**entry(12).to_json(), "revision_number": "7"},
        {"id": "e13"},
        "not an entry",
        [1, 2],
    ], "workload_parents": [str(AGENT), "not a SPIFFE ID"]}
    await mgr.sync()
    assert set(mgr.cache.entries) == {"e0", "e1", "e9"}
    assert mgr.cache.entries["e0"] is held
    assert mgr.cache.workload_parents == {AGENT}
    assert "ignored 8 malformed item(s)" in caplog.text


async def test_a_sync_beyond_the_entry_bound_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server refuses a sync listing more than MAX_KNOWN entries: an agent that took
    more would fail every later sync, so it refuses them instead."""
    monkeypatch.setattr(manager_mod, "MAX_ENTRIES", 5)
    mgr, _, _, client, _ = make(tmp_path, 2)
    client.sync_data = {**GOOD, "entries": [entry(i).to_json() for i in range(10, 14)]}
    with pytest.raises(ServerRejectedError, match="more than 5"):
        await mgr.sync()
    assert set(mgr.cache.entries) == {"e0", "e1"}


async def test_unusable_bundles_are_refused_and_the_held_one_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mgr, clock, ca, client, _ = make(tmp_path, 1)
    client.sync_data = {**GOOD, "bundle": bundle_doc(ca, sequence=5)}
    await mgr.sync()
    assert client.roots == [ca.cert] and mgr.bundle_sequence == 5
    held = mgr.cache.bundle
    newer = Ca(clock)
    for bad, why in [
        ({"keys": "x"}, "'keys' list"),
        ({"keys": [{"use": "x509-svid", "x5c": ["!!"]}], "spiffe_sequence": 6}, "bad certificate"),
        ({"keys": [], "spiffe_sequence": 6}, "no X509 authority"),  # the agent could trust no server
        (bundle_doc(newer, sequence=4), "older than the held 5"),  # a stale replica's
    ]:
        client.sync_data = {**GOOD, "bundle": bad}
        await mgr.sync()  # the rest of the sync still applies
        assert mgr.cache.bundle is held and client.roots == [ca.cert] and mgr.bundle_sequence == 5
        assert why in caplog.text
    client.sync_data = {**GOOD, "bundle": bundle_doc(ca, newer, sequence=6)}
    await mgr.sync()
    assert client.roots == [ca.cert, newer.cert] and mgr.bundle_sequence == 6
