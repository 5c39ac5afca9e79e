"""The agent's manager against a faulty or compromised server (FakeClient answers): a
malformed sync is refused whole with a named error and nothing half-applied, one bad entry
or bundle is skipped and the held version kept, and nothing unusable is ever cached."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from test_manager_schedule import AGENT, T0, TD, Ca, Clock, entry, make

from meshid.spiffe_id import SpiffeId
from workload_api import manager as manager_mod
from workload_api.server_client import ServerRejectedError, ServerUnavailableError

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
    before, held = dict(mgr.cache.entries), mgr.cache.bundle
    client.sync_data = {**GOOD, "entries": [entry(9).to_json()], "removed": ["e0"],
                        "tainted_authorities": [ca.ski], "bundle": bundle_doc(ca, sequence=3), **bad}
    with pytest.raises(ServerRejectedError, match="bad_response"):
        await mgr.sync()
    assert mgr.cache.entries == before and mgr.cache.bundle is held and mgr.tainted_akis == set()


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
    ]:
        client.sync_data = {**GOOD, "bundle": bad}
        await mgr.sync()  # the rest of the sync still applies
        assert mgr.cache.bundle is held and client.roots == [ca.cert] and mgr.bundle_sequence == 5
        assert why in caplog.text
    client.sync_data = {**GOOD, "bundle": bundle_doc(ca, newer, sequence=6)}
    await mgr.sync()
    assert client.roots == [ca.cert, newer.cert] and mgr.bundle_sequence == 6
    # A server restored from a backup goes on from an older sequence: its keys must still
    # reach the agent (refused, they would not until its sequence passed the agent's).
    restored = Ca(clock)
    client.sync_data = {**GOOD, "bundle": bundle_doc(ca, restored, sequence=4)}
    await mgr.sync()
    assert client.roots == [ca.cert, restored.cert] and mgr.bundle_sequence == 4
    assert "sequence went back from 6 to 4" in caplog.text


# ---------------------------------------------------------------------------- sign_x509

Tamper = Callable[[list[dict[str, Any]], list[dict[str, Any]]], list[dict[str, Any]]]


def tamper(client: Any, fn: Tamper) -> None:
    """Rewrite the fake server's sign answers: fn(requests, results) -> results."""
    honest = client.sign_x509

    async def sign(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return fn(requests, await honest(requests))

    client.sign_x509 = sign


def record_puts(mgr: Any) -> list[str]:
    """Entry ids of every SVID the cache was given (and streams were woken with)."""
    put: list[str] = []
    orig = mgr.cache.put_svids

    def put_svids(svids: Any) -> None:
        svids = list(svids)
        put.extend(s.entry_id for s in svids)
        orig(svids)

    mgr.cache.put_svids = put_svids
    return put


async def test_garbled_sign_results_cost_only_their_own_entries(tmp_path: Path) -> None:
    mgr, clock, _, client, _ = make(tmp_path, 8)
    garble = {
        "e1": lambda r: {**r, "svid": ["!!not base64"]},
        "e2": lambda r: {**r, "svid": [base64.b64encode(b"not DER").decode()]},
        "e3": lambda r: {**r, "svid": []},
        "e4": lambda r: {**r, "svid": [7]},
        "e5": lambda r: "not a result",
        "e6": lambda r: {"svid": r["svid"]},  # no entry_id
    }

    def fn(requests: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = [garble.get(r["entry_id"], lambda r: r)(r) for r in results]
        return [*out, {"entry_id": "not-asked", "svid": results[0]["svid"]}, [1], None]

    tamper(client, fn)
    await mgr.rotate()  # raised on the first bad chain: no SVID of the batch was kept
    assert set(mgr.cache.svids) == {"e0", "e7"}
    assert set(mgr._hold) == {f"e{i}" for i in range(1, 7)}
    assert "not-asked" not in mgr.cache.svids


async def test_an_unanswered_renewal_backs_off_instead_of_spinning(tmp_path: Path) -> None:
    mgr, clock, _, client, _ = make(tmp_path, 2)
    await mgr.rotate()
    clock.t = mgr.cache.svids["e1"].schedule.renew_at
    tamper(client, lambda requests, results: [r for r in results if r["entry_id"] != "e1"])
    await mgr.rotate()
    # Unheld, the renewal stayed due: next_due() in the past, a sync every 50 ms.
    assert "e1" in mgr._hold and mgr.next_due() > clock()


async def test_an_already_expired_svid_is_never_cached(tmp_path: Path) -> None:
    mgr, clock, _, client, _ = make(tmp_path, 2)
    stale_ca = Ca(Clock(clock() - 7200))

    def fn(requests: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        csr = base64.b64decode(next(r["csr"] for r in requests if r["entry_id"] == "e1"))
        chain = stale_ca.sign(csr, SpiffeId(TD, "/w/1"))  # expired an hour ago
        expired = [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in chain]
        return [r if r["entry_id"] != "e1" else {"entry_id": "e1", "svid": expired} for r in results]

    tamper(client, fn)
    put = record_puts(mgr)
    await mgr.rotate()
    assert put == ["e0"] and "e1" in mgr._hold


# ---------------------------------------------------------------------------- sign_jwt


def token(sub: str, aud: Any, exp: Any) -> str:
    claims = {"sub": sub, "exp": exp} if aud is None else {"sub": sub, "aud": aud, "exp": exp}
    return jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")


@pytest.mark.parametrize("tok", [
    "garbage",
    token("spiffe://example.org/w/other", ["a", "b"], T0 + 300),  # someone else's identity
    token("spiffe://example.org/w/0", ["a"], T0 + 300),  # lacks audience b
    token("spiffe://example.org/w/0", None, T0 + 300),
    token("spiffe://example.org/w/0", ["a", "b"], T0 - 1),  # already expired
    token("spiffe://example.org/w/0", ["a", "b"], "soon"),
])
async def test_a_jwt_svid_not_for_the_request_is_not_handed_out(tmp_path: Path, tok: str) -> None:
    mgr, clock, _, client, _ = make(tmp_path, 1)

    async def sign_jwt(entry_id: str, audience: list[str]) -> tuple[str, int]:
        return tok, int(T0 + 300)

    client.sign_jwt = sign_jwt  # type: ignore[attr-defined]
    with pytest.raises(ServerRejectedError, match="bad_response"):
        await mgr.jwt_svid(mgr.cache.entries["e0"], ["b", "a"])
    assert mgr._jwt == {}


async def test_a_cached_jwt_svid_is_not_served_once_its_entry_names_another_id(tmp_path: Path) -> None:
    # Cached by entry id alone, the token naming the entry's old SPIFFE ID went on being handed
    # out (to whichever workload the entry now matches) until its renewal time.
    mgr, _, _, client, _ = make(tmp_path, 1)
    e0 = mgr.cache.entries["e0"]
    renamed = dataclasses.replace(e0, spiffe_id=SpiffeId(TD, "/w/renamed"), revision_number=2)
    current = {"e0": e0}

    async def sign_jwt(entry_id: str, audience: list[str]) -> tuple[str, int]:
        return token(str(current[entry_id].spiffe_id), audience, T0 + 300), int(T0 + 300)

    client.sign_jwt = sign_jwt  # type: ignore[attr-defined]
    assert (await mgr.jwt_svid(e0, ["a"])).spiffe_id == e0.spiffe_id
    current["e0"] = renamed
    mgr.cache.set_entries([renamed], [AGENT])
    assert mgr.jwt_cached(renamed, ["a"]) is None
    svid = await mgr.jwt_svid(renamed, ["a"])
    assert svid.spiffe_id == renamed.spiffe_id
    assert jwt.decode(svid.token, options={"verify_signature": False})["sub"] == str(renamed.spiffe_id)


async def test_a_jwt_svid_is_cached_until_its_own_exp(tmp_path: Path) -> None:
    mgr, clock, _, client, _ = make(tmp_path, 1)
    e0 = mgr.cache.entries["e0"]

    async def sign_jwt(entry_id: str, audience: list[str]) -> tuple[str, int]:
        return token("spiffe://example.org/w/0", "a", T0 + 300), int(T0 + 10**9)  # expires_at lies

    client.sign_jwt = sign_jwt  # type: ignore[attr-defined]
    svid = await mgr.jwt_svid(e0, ["a"])
    assert svid.expires_at == T0 + 300
    clock.t = T0 + 300
    assert mgr.jwt_cached(e0, ["a"]) is None  # was served from the cache for ~19 years


async def test_a_cached_jwt_svid_is_served_while_the_server_cannot_renew_it(tmp_path: Path) -> None:
    """Past its renewal time the agent asks the server for a new token; when that fails (an
    outage) the cached one, still unexpired, is returned, as SPIRE's agent does. Every
    FetchJWTSVID failed with UNAVAILABLE for the second half of the token's life."""
    mgr, clock, _, client, _ = make(tmp_path, 1)
    e0 = mgr.cache.entries["e0"]
    down = False

    async def sign_jwt(entry_id: str, audience: list[str]) -> tuple[str, int]:
        if down:
            raise ServerUnavailableError("no server reachable")
        return token("spiffe://example.org/w/0", audience, T0 + 300), int(T0 + 300)

    client.sign_jwt = sign_jwt  # type: ignore[attr-defined]
    first = await mgr.jwt_svid(e0, ["a"])
    down = True
    clock.t = first.schedule.renew_at + 1
    assert (await mgr.jwt_svid(e0, ["a"])).token == first.token
    clock.t = T0 + 300  # expired: nothing left to serve
    with pytest.raises(ServerUnavailableError):
        await mgr.jwt_svid(e0, ["a"])


async def test_the_jwt_svid_cache_stays_bounded_with_every_token_unexpired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only expired tokens were pruned at the bound: callers asking for new audiences (each
    a new cache key; the per-uid mint limit allows 3000 live 5-minute tokens per uid) grew
    the cache past it without end, and every insertion beyond it copied the whole cache."""
    monkeypatch.setattr(manager_mod, "MAX_JWT_CACHE", 50)
    mgr, _, _, client, _ = make(tmp_path, 1)
    e0 = mgr.cache.entries["e0"]

    async def sign_jwt(entry_id: str, audience: list[str]) -> tuple[str, int]:
        return token("spiffe://example.org/w/0", audience, T0 + 300), int(T0 + 300)

    client.sign_jwt = sign_jwt  # type: ignore[attr-defined]
    for i in range(200):
        await mgr.jwt_svid(e0, [f"aud-{i}"])
    assert len(mgr._jwt) <= 50
    assert mgr.jwt_cached(e0, ["aud-199"]) is not None  # the newest are the ones kept
