"""Federation: the pure parts (refresh bounds, bundle files, per-agent selection, config),
the bundle endpoint documents, and the poller against a real TLS 1.3 bundle endpoint on
loopback (https_spiffe and https_web), with the last good bundle kept in SQLite."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from pki_helpers import make_ca, make_leaf, write_pem

from issuer.api.bundle_endpoint import (
    BundleEndpoint,
    ServingCertFiles,
    oidc_jwks,
    openid_configuration,
    spiffe_bundle_document,
)
from issuer.config import server_config_from_dict
from issuer.datastore.base import DataStore
from issuer.datastore.factory import open_datastore
from issuer.federation import (
    META_PREFIX,
    FederatedBundle,
    FederationPoller,
    Relationship,
    federated_for_agent,
    parse_bundle_file,
    refresh_interval,
)
from meshid.bundle import Bundle
from meshid.entry import Entry
from meshid.errors import ConfigError, InvalidBundleError
from meshid.listeners import Listener, tls_listener
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId, TrustDomain
from meshid.tls import server_context
from workload_api.cache import SvidCache

TWO = TrustDomain("two.org")
ONE = TrustDomain("one.org")
ENDPOINT_ID = SpiffeId(TWO, "/meshid/server")


async def wait_until(pred: Callable[[], bool], what: str, seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.02)):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------------------- pure parts

def test_refresh_interval_is_bounded() -> None:
    assert refresh_interval(300, 30, 3600) == 300
    assert refresh_interval(1, 30, 3600) == 30  # a tiny hint cannot make us hammer the endpoint
    assert refresh_interval(86400, 30, 3600) == 3600
    assert refresh_interval(0, 30, 3600) == 3600  # "no hint" → the upper bound


def test_bundle_file_pem_or_spiffe_json(tmp_path: Path) -> None:
    ca, _ = make_ca()
    pem = write_pem(tmp_path / "roots.pem", ca).read_bytes()
    b = parse_bundle_file(TWO, pem)
    assert b.x509_authorities == (ca,) and not b.jwt_authorities
    jwt_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    doc = Bundle(TWO, (ca,), {"k1": jwt_key}, sequence=7).to_spiffe_bytes()
    b2 = parse_bundle_file(TWO, doc)
    assert b2.sequence == 7 and set(b2.jwt_authorities) == {"k1"}
    with pytest.raises(InvalidBundleError):
        parse_bundle_file(TWO, b"not a bundle")


def _entry(path: str, *feds: TrustDomain) -> Entry:
    return Entry(f"id-{path.strip('/')}", SpiffeId(ONE, path), SpiffeId(ONE, "/agent"),
                 (Selector("unix", "uid:1"),), federates_with=feds)


def test_agent_gets_only_bundles_its_entries_federate_with_and_only_when_changed() -> None:
    ca, _ = make_ca()
    three = TrustDomain("three.org")
    available = {TWO: FederatedBundle.of(Bundle(TWO, (ca,), sequence=1)),
                 three: FederatedBundle.of(Bundle(three, (ca,), sequence=1))}
    entries = [_entry("/a", TWO), _entry("/b"), _entry("/c", TrustDomain("unknown.org"))]
    bundles, digests = federated_for_agent(entries, available, {})
    assert set(bundles) == set(digests) == {"spiffe://two.org"}
    assert bundles["spiffe://two.org"] == available[TWO].doc
    # The agent reports the digest back: nothing is resent until the bundle changes.
    bundles, digests2 = federated_for_agent(entries, available, digests)
    assert bundles == {} and digests2 == digests
    available[TWO] = FederatedBundle.of(Bundle(TWO, (ca,), sequence=2))
    bundles, digests3 = federated_for_agent(entries, available, digests)
    assert set(bundles) == {"spiffe://two.org"} and digests3 != digests


def _server_cfg(**extra: Any) -> dict[str, Any]:
    return {"trust_domain": "one.org", "data_dir": "/tmp/x", **extra}


def test_config_validation() -> None:
    ok = server_config_from_dict(_server_cfg(federation={"trust_domains": {"two.org": {
        "bundle_endpoint_url": "https://127.0.0.1:8444/", "endpoint_spiffe_id": "spiffe://two.org/meshid/server",
        "trust_bundle_path": "/x.pem"}}}))
    rels = ok.federation.relationships()
    assert list(rels) == [TWO] and rels[TWO].profile == "https_spiffe"
    bad: list[tuple[dict[str, Any], str]] = [
        ({"federation": {"trust_domains": {"two.org": {"bundle_endpoint_url": "https://h/", "bogus": 1}}}},
         "federation.trust_domains.two.org: bogus: unknown key"),
        ({"federation": {"trust_domains": {"two.org": {"bundle_endpoint_url": "https://h/"}}}},
         "endpoint_spiffe_id: required"),
        ({"federation": {"trust_domains": {"two.org": {"bundle_endpoint_url": "http://h/",
                                                       "profile": "https_web"}}}}, "must be an https URL"),
        ({"federation": {"trust_domains": {"two.org": {"profile": "https_web"}}}}, "set bundle_endpoint_url"),
        ({"federation": {"trust_domains": {"one.org": {"trust_bundle_path": "/x"}}}}, "own trust domain"),
        ({"federation": {"trust_domains": {"Bad TD": {"trust_bundle_path": "/x"}}}}, "trust_domains.Bad TD"),
        ({"federation": {"bundle_endpoint": {"enabled": True, "profile": "https_web"}}},
         "cert_file and key_file"),
        ({"federation": {"bundle_endpoint": {"profile": "acme"}}}, "profile: must be one of"),
        ({"federation": {"min_refresh_interval": 10, "max_refresh_interval": 5}}, "min_refresh_interval"),
        ({"oidc": {"enabled": True}, "federation": {"bundle_endpoint": {"enabled": True}}},
         "ca.jwt_issuer must be an https URL"),
        ({"oidc": {"enabled": True}, "ca": {"jwt_issuer": "https://oidc.one.org"}}, "enable it"),
    ]
    for extra, message in bad:
        with pytest.raises(ConfigError, match=message):
            server_config_from_dict(_server_cfg(**extra))


# ---------------------------------------------------------------------------- endpoint documents

def _bundle(ca: x509.Certificate, seq: int = 1, hint: int = 300) -> Bundle:
    keys = {"kid-ec": ec.generate_private_key(ec.SECP256R1()).public_key(),
            "kid-384": ec.generate_private_key(ec.SECP384R1()).public_key()}
    return Bundle(TWO, (ca,), keys, seq, hint)  # type: ignore[arg-type]


def test_endpoint_documents() -> None:
    ca, _ = make_ca()
    b = _bundle(ca, seq=5)
    doc = spiffe_bundle_document(b, 42)
    assert doc["spiffe_sequence"] == 5 and doc["spiffe_refresh_hint"] == 42
    assert {k["use"] for k in doc["keys"]} == {"x509-svid", "jwt-svid"}
    assert Bundle.from_spiffe_json(TWO, doc).x509_authorities == (ca,)
    conf = openid_configuration("https://oidc.two.org", "https://oidc.two.org/keys")
    assert conf["issuer"] == "https://oidc.two.org" and conf["jwks_uri"].endswith("/keys")
    assert conf["response_types_supported"] == ["id_token"]
    assert conf["subject_types_supported"] == ["public"]
    assert "ES256" in conf["id_token_signing_alg_values_supported"]
    keys = {k["kid"]: k for k in oidc_jwks(b)["keys"]}
    assert keys["kid-ec"]["alg"] == "ES256" and keys["kid-384"]["alg"] == "ES384"
    assert all(k["use"] == "sig" and k["kty"] == "EC" for k in keys.values())


# ---------------------------------------------------------------------------- live endpoint

@dataclass
class Foreign:
    """A foreign trust domain's bundle endpoint on loopback, with a bundle we can change."""

    ca: x509.Certificate
    ca_key: ec.EllipticCurvePrivateKey
    bundle: Bundle
    listener: Listener
    body: Callable[[], bytes] | None = None  # overrides the served document (bad docs)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.listener.port}/"


async def _start_endpoint(app: web.Application, ctx: ssl.SSLContext, port: int = 0) -> Listener:
    return await tls_listener(app, "127.0.0.1", port, ctx)


def _foreign_app(f: Foreign) -> web.Application:
    endpoint = BundleEndpoint(lambda: f.bundle, 1)
    app = endpoint.app()

    @web.middleware
    async def override(request: web.Request, handler: Any) -> web.StreamResponse:
        if f.body is not None:
            return web.Response(body=f.body(), content_type="application/json")
        return await handler(request)

    app.middlewares.append(override)
    return app


@pytest.fixture
async def foreign() -> AsyncIterator[Foreign]:
    ca, ca_key = make_ca("two.org root")
    leaf, leaf_key = make_leaf(ca, ca_key, uri=str(ENDPOINT_ID))
    f = Foreign(ca, ca_key, _bundle(ca), None)  # type: ignore[arg-type]
    f.listener = await _start_endpoint(_foreign_app(f), server_context([leaf], leaf_key, client_cert="none"))
    try:
        yield f
    finally:
        await f.listener.stop()


@pytest.fixture
async def ds(tmp_path: Path) -> AsyncIterator[DataStore]:
    store = await open_datastore(f"sqlite://{tmp_path}/meshid.db")
    try:
        yield store
    finally:
        await store.close()


def _spiffe_rel(f: Foreign, tmp_path: Path, endpoint_id: SpiffeId = ENDPOINT_ID) -> Relationship:
    roots = write_pem(tmp_path / "two-root.pem", f.ca)
    return Relationship(TWO, f.url, "https_spiffe", endpoint_id, str(roots))


async def test_https_spiffe_fetch_persist_and_restart_with_endpoint_down(
    foreign: Foreign, ds: DataStore, tmp_path: Path
) -> None:
    rel = _spiffe_rel(foreign, tmp_path)
    poller = FederationPoller(ds, [rel], 0.05, 1.0, fetch_timeout=5)
    await poller.load()
    assert poller.bundles[TWO].x509_authorities == (foreign.ca,) and not poller.bundles[TWO].jwt_authorities
    assert await poller.poll(TWO)
    got = poller.bundles[TWO]
    assert got.sequence == 1 and set(got.jwt_authorities) == {"kid-ec", "kid-384"}
    stored = await ds.get_meta(META_PREFIX + "two.org")
    assert stored is not None and Bundle.from_spiffe_json(TWO, stored).sequence == 1

    await foreign.listener.stop()
    assert not await poller.poll(TWO)
    assert poller.bundles[TWO] == got and poller.failures(TWO) == 1
    assert poller.status()["two.org"]["last_error"]

    # A restart while the foreign endpoint is down starts from the stored bundle (with its
    # JWT keys), not from the bootstrap PEM file.
    restarted = FederationPoller(ds, [rel], 0.05, 1.0, fetch_timeout=5)
    await restarted.load()
    assert restarted.bundles[TWO] == got


async def test_the_fetched_document_is_parsed_off_the_event_loop(
    foreign: Foreign, ds: DataStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed_on: list[int] = []
    real = Bundle.from_spiffe_json.__func__  # type: ignore[attr-defined]

    def recording(cls: type[Bundle], td: TrustDomain, data: bytes | str) -> Bundle:
        parsed_on.append(threading.get_ident())
        return real(cls, td, data)  # type: ignore[no-any-return]

    poller = FederationPoller(ds, [_spiffe_rel(foreign, tmp_path)], 0.05, 1.0, fetch_timeout=5)
    await poller.load()
    monkeypatch.setattr(Bundle, "from_spiffe_json", classmethod(recording))
    assert await poller.poll(TWO)
    assert parsed_on and threading.get_ident() not in parsed_on


async def test_wrong_endpoint_id_is_refused(foreign: Foreign, ds: DataStore, tmp_path: Path) -> None:
    rel = _spiffe_rel(foreign, tmp_path, SpiffeId(TWO, "/somebody/else"))
    poller = FederationPoller(ds, [rel], 0.05, 1.0, fetch_timeout=5)
    await poller.load()
    before = poller.bundles[TWO]
    assert not await poller.poll(TWO)
    assert "expected spiffe://two.org/somebody/else" in poller.status()["two.org"]["last_error"]
    assert poller.bundles[TWO] == before
    assert await ds.get_meta(META_PREFIX + "two.org") is None


async def test_endpoint_not_chaining_to_the_known_bundle_is_refused(
    foreign: Foreign, ds: DataStore, tmp_path: Path
) -> None:
    other_ca, _ = make_ca("impostor")
    rel = Relationship(TWO, foreign.url, "https_spiffe", ENDPOINT_ID,
                       str(write_pem(tmp_path / "other.pem", other_ca)))
    poller = FederationPoller(ds, [rel], 0.05, 1.0, fetch_timeout=5)
    await poller.load()
    assert not await poller.poll(TWO)
    assert "CERTIFICATE_VERIFY_FAILED" in poller.status()["two.org"]["last_error"]
    assert poller.bundles[TWO].x509_authorities == (other_ca,)


async def test_invalid_documents_never_replace_the_last_good_bundle(
    foreign: Foreign, ds: DataStore, tmp_path: Path
) -> None:
    poller = FederationPoller(ds, [_spiffe_rel(foreign, tmp_path)], 0.05, 1.0, fetch_timeout=5)
    await poller.load()
    assert await poller.poll(TWO)
    good = poller.bundles[TWO]
    no_roots = replace(foreign.bundle, x509_authorities=(), sequence=9).to_spiffe_bytes()
    bad_docs = [b"<html>oops</html>", b'{"keys": [{"use": "x509-svid", "x5c": ["!!"]}]}', no_roots,
                b'{"keys": "nope"}']
    # A hostile peer's documents that used to escape as RecursionError / TypeError, or (a
    # JWK with its private part) to parse and then fail to re-encode: "failed unexpectedly"
    # with a traceback, and no last_error to show for it.
    bad_docs.append(b'{"keys": ' + b"[" * 100_000)
    for change in ({"x": 12345}, {"d": "AAAA"}):
        hostile = foreign.bundle.to_spiffe_json()
        next(k for k in hostile["keys"] if k["use"] == "jwt-svid").update(change)
        bad_docs.append(json.dumps(hostile).encode())
    for doc in bad_docs:
        foreign.body = lambda d=doc: d  # type: ignore[misc]
        assert not await poller.poll(TWO), doc[:80]
        assert poller.bundles[TWO] == good
        assert poller.status()["two.org"]["last_error"]
    stored = await ds.get_meta(META_PREFIX + "two.org")
    assert stored is not None and Bundle.from_spiffe_json(TWO, stored) == good


async def test_https_web_uses_the_configured_ca(ds: DataStore, tmp_path: Path) -> None:
    ca, ca_key = make_ca("web root")
    leaf, leaf_key = make_leaf(ca, ca_key, dns=["localhost"], ips=["127.0.0.1"])
    cert_file = write_pem(tmp_path / "web.pem", leaf)
    key_file = write_pem(tmp_path / "web.key", leaf_key)
    served = _bundle(ca, seq=3)
    files = ServingCertFiles(str(cert_file), str(key_file))
    listener = await _start_endpoint(BundleEndpoint(lambda: served, 60).app(), files.context.outer)
    try:
        url = f"https://localhost:{listener.port}/"
        good = Relationship(TWO, url, "https_web", ca_file=str(write_pem(tmp_path / "ca.pem", ca)))
        poller = FederationPoller(ds, [good], 0.05, 1.0, fetch_timeout=5)
        await poller.load()
        assert TWO not in poller.bundles  # https_web needs no bootstrap bundle
        assert await poller.poll(TWO) and poller.bundles[TWO].sequence == 3
        # Without the CA, the system store does not know this certificate.
        system = FederationPoller(ds, [Relationship(TWO, url, "https_web")], 0.05, 1.0, fetch_timeout=5)
        assert not await system.poll(TWO)
        assert "CERTIFICATE_VERIFY_FAILED" in system.status()["two.org"]["last_error"]
    finally:
        await listener.stop()


async def test_https_web_reads_the_ca_store_off_the_event_loop(
    ds: DataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Loading the system CA store is ~50 ms of CPU, on every poll of an https_web endpoint:
    # on the loop, it held every agent's sync and signing that long.
    threads: list[threading.Thread] = []
    real = ssl.create_default_context

    def recording(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", recording)
    poller = FederationPoller(ds, [Relationship(TWO, "https://127.0.0.1:9/", "https_web")], 0.05, 1.0,
                              fetch_timeout=2)
    assert not await poller.poll(TWO)  # nothing listens there; the context was still made
    assert threads and threading.main_thread() not in threads


async def test_bundle_endpoint_refuses_tls12(foreign: Foreign) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    # The server aborts the handshake: an alert or a reset, depending on timing.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _, w = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", foreign.listener.port, ssl=ctx), 10)
        w.close()
    # ... while TLS 1.3 without a client certificate is served.
    ctx13 = ssl.create_default_context(cadata=foreign.ca.public_bytes(Encoding.PEM).decode())
    ctx13.check_hostname = False
    async with aiohttp.ClientSession() as s, s.get(foreign.url, ssl=ctx13) as resp:
        assert resp.status == 200
        assert json.loads(await resp.read())["spiffe_refresh_hint"] == 1


async def test_run_loop_follows_the_foreign_bundle_and_stops_cleanly(
    foreign: Foreign, ds: DataStore, tmp_path: Path
) -> None:
    poller = FederationPoller(ds, [_spiffe_rel(foreign, tmp_path)], 0.05, 0.2, fetch_timeout=5)
    await poller.load()
    task = asyncio.create_task(poller.run())
    try:
        await wait_until(lambda: poller.bundles[TWO].sequence == 1, "first poll")
        foreign.bundle = replace(foreign.bundle, sequence=2)
        await wait_until(lambda: poller.bundles[TWO].sequence == 2, "the changed bundle")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# ---------------------------------------------------------------------------- agent cache

def test_cache_applies_federated_bundles() -> None:
    ca, _ = make_ca()
    cache = SvidCache(ONE)
    w = cache.watch(frozenset())
    fb = FederatedBundle.of(Bundle(TWO, (ca,), sequence=1))
    key = "spiffe://two.org"
    assert cache.apply_federated({key: fb.digest}, {key: fb.doc})
    assert cache.federated[TWO].sequence == 1 and w.event.is_set()
    w.event.clear()
    # Same digest, no document: nothing changes, nobody is woken.
    assert not cache.apply_federated({key: fb.digest}, {})
    assert not w.event.is_set()
    # An invalid document keeps the old bundle and leaves the digest unrecorded (resent).
    assert not cache.apply_federated({key: "d2"}, {key: {"keys": "bad"}})
    assert cache.federated[TWO].sequence == 1 and key not in cache.federated_digests
    # Gone from the digests: the agent's entries no longer federate with two.org.
    assert cache.apply_federated({}, {})
    assert cache.federated == {} and w.event.is_set()
    # A "federated" bundle for our own trust domain would stand in for our own: ignored.
    own = FederatedBundle.of(Bundle(ONE, (ca,), sequence=9))
    assert not cache.apply_federated({"spiffe://one.org": own.digest}, {"spiffe://one.org": own.doc})
    assert cache.federated == {} and cache.federated_digests == {}
