"""Federation: fetch foreign trust domains' SPIFFE bundles from their bundle endpoints.

One poller task per server polls every configured foreign bundle endpoint, honouring the
document's `spiffe_refresh_hint` within configured bounds. `https_spiffe` endpoints are
authenticated with the last known bundle of that trust domain and must present the
configured SPIFFE ID; `https_web` endpoints with the Web PKI (or a configured CA file).
A fetched bundle replaces the current one only when it parses and carries X.509 roots;
otherwise the last good bundle stays, and it is persisted in the datastore so a restart
while the foreign endpoint is down keeps trusting it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from issuer.config import FederatedTrustDomainConfig
from meshid.backoff import Backoff
from meshid.bundle import MAX_BUNDLE_DOCUMENT, Bundle, load_pem_certs
from meshid.entry import Entry
from meshid.errors import InvalidBundleError, MeshidError
from meshid.http_body import read_bounded
from meshid.spiffe_connector import SpiffeConnector
from meshid.spiffe_id import SpiffeId, TrustDomain
from meshid.tls import client_context

log = logging.getLogger("meshid.federation")

META_PREFIX = "federation.bundle."
MAX_REDIRECTS = 3


class FederationFetchError(MeshidError):
    """A foreign bundle endpoint could not be reached, authenticated or understood."""


class MetaStore(Protocol):
    async def get_meta(self, key: str) -> str | None: ...

    async def set_meta(self, key: str, value: str) -> None: ...


# ---------------------------------------------------------------------------- pure parts

@dataclass(frozen=True)
class Relationship:
    """A configured foreign trust domain and how to reach its bundle endpoint."""

    trust_domain: TrustDomain
    url: str = ""  # empty: a static bundle from `trust_bundle_path`, never polled
    profile: str = "https_spiffe"
    endpoint_id: SpiffeId | None = None
    trust_bundle_path: str = ""
    ca_file: str = ""

    @classmethod
    def from_config(cls, td: TrustDomain, c: FederatedTrustDomainConfig) -> Relationship:
        eid = SpiffeId.parse(c.endpoint_spiffe_id) if c.endpoint_spiffe_id else None
        return cls(td, c.bundle_endpoint_url, c.profile, eid, c.trust_bundle_path, c.ca_file)


@dataclass(frozen=True)
class FederatedBundle:
    """A foreign bundle with what the agent API hands out precomputed once."""

    bundle: Bundle
    doc: dict[str, Any]
    digest: str

    @classmethod
    def of(cls, bundle: Bundle) -> FederatedBundle:
        doc = bundle.to_spiffe_json()
        canonical = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return cls(bundle, doc, hashlib.sha256(canonical).hexdigest()[:32])


def refresh_interval(hint: float, lo: float, hi: float) -> float:
    """Seconds until the next poll: the foreign refresh hint bounded to [lo, hi] (a hint of
    0 or less means "not given", so the upper bound applies)."""
    if hint <= 0:
        return hi
    return min(hi, max(lo, float(hint)))


def parse_bundle_file(td: TrustDomain, data: bytes) -> Bundle:
    """A trust bundle file: SPIFFE bundle JSON, or PEM roots (as `meshid bundle show` prints)."""
    if data.lstrip().startswith(b"{"):
        return Bundle.from_spiffe_json(td, data)
    roots = load_pem_certs(data)
    if not roots:
        raise InvalidBundleError("no certificates in PEM bundle")
    return Bundle(td, tuple(roots))


def check_acceptable(td: TrustDomain, new: Bundle, current: Bundle | None) -> None:
    """Refuse a document that would silently cut off trust; raise InvalidBundleError."""
    if not new.x509_authorities:
        raise InvalidBundleError(f"bundle of {td} has no X.509 authorities")
    if current is not None and new.sequence < current.sequence:
        # A restored foreign datastore can go back; we accept it but say so.
        log.warning("federation: %s bundle sequence went back from %d to %d",
                    td, current.sequence, new.sequence)


def federated_for_agent(
    entries: Iterable[Entry],
    available: Mapping[TrustDomain, FederatedBundle],
    known: Mapping[str, str],
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """What an agent's sync gets: (bundles it lacks or holds stale, digest of every
    federated bundle its entries need). Keys are trust domain IDs (`spiffe://td`)."""
    wanted = {td for e in entries for td in e.federates_with}
    digests: dict[str, str] = {}
    bundles: dict[str, dict[str, Any]] = {}
    for td in sorted(wanted, key=lambda t: t.name):
        fb = available.get(td)
        if fb is None:
            continue
        key = str(td.id)
        digests[key] = fb.digest
        if known.get(key) != fb.digest:
            bundles[key] = fb.doc
    return bundles, digests


# ---------------------------------------------------------------------------- fetching

def _client_ssl(rel: Relationship, current: Bundle | None) -> ssl.SSLContext:
    if rel.profile == "https_spiffe":
        if current is None or not current.x509_authorities:
            raise FederationFetchError(
                f"no bundle of {rel.trust_domain} to authenticate its endpoint with; set trust_bundle_path"
            )
        return client_context(current.x509_authorities)
    ctx = ssl.create_default_context(cafile=rel.ca_file or None)
    # Same TLS floor as every other meshid client.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


async def fetch_bundle(rel: Relationship, current: Bundle | None, time_limit: float) -> Bundle:
    """GET the foreign bundle document, authenticating the endpoint per its profile."""
    spiffe = rel.profile == "https_spiffe"
    try:
        # On a thread: https_web loads the system CA store, ~50 ms of CPU on every poll.
        ctx = await asyncio.to_thread(_client_ssl, rel, current)
        connector = (SpiffeConnector(rel.endpoint_id, FederationFetchError, ssl=ctx, force_close=True)
                     if spiffe and rel.endpoint_id is not None
                     else aiohttp.TCPConnector(ssl=ctx, force_close=True))
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=time_limit)
        ) as session, session.get(
            rel.url,
            # A redirect would leave the SPIFFE-authenticated endpoint.
            allow_redirects=not spiffe, max_redirects=MAX_REDIRECTS,
            headers={"Accept": "application/json"},
        ) as resp:
            if resp.status != 200:
                raise FederationFetchError(f"endpoint answered HTTP {resp.status}")
            body = await read_bounded(resp, MAX_BUNDLE_DOCUMENT)
            if body is None:
                raise FederationFetchError("bundle document is too large")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise FederationFetchError(f"{type(exc).__name__}: {exc or 'timed out'}") from None
    except MeshidError as exc:
        if isinstance(exc, FederationFetchError):
            raise
        raise FederationFetchError(str(exc)) from None
    # Parsed on a thread: a peer's document may be up to MAX_BUNDLE_DOCUMENT, ~0.25 s of
    # JSON and certificate parsing that would hold the server's event loop.
    return await asyncio.to_thread(Bundle.from_spiffe_json, rel.trust_domain, body)


# ---------------------------------------------------------------------------- the poller

@dataclass
class _State:
    rel: Relationship
    backoff: Backoff
    due: float = 0.0
    last_success: float = 0.0
    last_error: str = ""
    failures: int = 0
    polls: int = 0


class FederationPoller:
    """Holds the current foreign bundles and refreshes them; the server owns its task."""

    def __init__(
        self,
        ds: MetaStore,
        relationships: Iterable[Relationship],
        min_refresh: float,
        max_refresh: float,
        fetch_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.ds = ds
        self.min_refresh = min_refresh
        self.max_refresh = max_refresh
        self.fetch_timeout = fetch_timeout
        self.clock = clock
        rng = rng or random.Random()
        self._states = {
            r.trust_domain: _State(r, Backoff(base=1.0, cap=300.0, rng=rng))
            for r in relationships
        }
        self._bundles: dict[TrustDomain, FederatedBundle] = {}
        self._poke = asyncio.Event()

    # ------------------------------------------------------------------ reading
    def current(self) -> Mapping[TrustDomain, FederatedBundle]:
        return self._bundles

    @property
    def bundles(self) -> dict[TrustDomain, Bundle]:
        return {td: fb.bundle for td, fb in self._bundles.items()}

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for td, st in self._states.items():
            fb = self._bundles.get(td)
            out[td.name] = {
                "have_bundle": fb is not None,
                "sequence": fb.bundle.sequence if fb else None,
                "last_success": st.last_success or None,
                "last_error": st.last_error or None,
                "consecutive_failures": st.failures,
            }
        return out

    def failures(self, td: TrustDomain) -> int:
        return self._states[td].failures

    def polls(self, td: TrustDomain) -> int:
        return self._states[td].polls

    @property
    def polled(self) -> bool:
        """True when at least one relationship has an endpoint to poll."""
        return any(st.rel.url for st in self._states.values())

    # ------------------------------------------------------------------ loading
    async def load(self) -> None:
        """Initial bundles: the last good one from the datastore, else trust_bundle_path."""
        for td, st in self._states.items():
            rel = st.rel
            bundle: Bundle | None = None
            if rel.url:
                stored = await self.ds.get_meta(META_PREFIX + td.name)
                if stored:
                    try:
                        bundle = Bundle.from_spiffe_json(td, stored)
                    except InvalidBundleError as exc:
                        log.error("federation: stored bundle of %s is unreadable (%s); ignoring it", td, exc)
            if bundle is None and rel.trust_bundle_path:
                try:
                    data = await asyncio.to_thread(Path(rel.trust_bundle_path).read_bytes)
                    bundle = parse_bundle_file(td, data)
                except (OSError, InvalidBundleError) as exc:
                    log.error("federation: cannot load trust_bundle_path %s for %s: %s",
                              rel.trust_bundle_path, td, exc)
            if bundle is not None:
                self._bundles[td] = FederatedBundle.of(bundle)
                log.info("federation: %s starts with a bundle of %d root(s), %d JWT key(s), sequence %d",
                         td, len(bundle.x509_authorities), len(bundle.jwt_authorities), bundle.sequence)
            elif rel.profile == "https_spiffe":
                log.error("federation: no bundle for %s: its https_spiffe endpoint cannot be authenticated "
                          "until trust_bundle_path is set", td)

    # ------------------------------------------------------------------ polling
    async def poll(self, td: TrustDomain) -> bool:
        """Fetch one trust domain's bundle now; True when a good document was received."""
        st = self._states[td]
        st.polls += 1
        current = self._bundles.get(td)
        try:
            new = await fetch_bundle(st.rel, current.bundle if current else None, self.fetch_timeout)
            check_acceptable(td, new, current.bundle if current else None)
        except (FederationFetchError, InvalidBundleError) as exc:
            st.failures += 1
            st.last_error = str(exc)
            delay = self._failure_delay(st, current)
            kept = f"keeping the current bundle (sequence {current.bundle.sequence})" if current else \
                "no bundle yet"
            log.warning("federation: fetching the bundle of %s from %s failed: %s; %s; retry in %.1fs",
                        td, st.rel.url, exc, kept, delay)
            st.due = self.clock() + delay
            return False
        st.failures = 0
        st.last_error = ""
        st.last_success = self.clock()
        st.backoff.reset()
        st.due = self.clock() + refresh_interval(new.refresh_hint, self.min_refresh, self.max_refresh)
        fb = FederatedBundle.of(new)
        if current is None or fb.digest != current.digest:
            await self.ds.set_meta(META_PREFIX + td.name, json.dumps(fb.doc))
            self._bundles = {**self._bundles, td: fb}
            log.info("federation: %s bundle updated to sequence %d (%d root(s), %d JWT key(s))",
                     td, new.sequence, len(new.x509_authorities), len(new.jwt_authorities))
        return True

    def _failure_delay(self, st: _State, current: FederatedBundle | None) -> float:
        hint = current.bundle.refresh_hint if current else 0
        normal = refresh_interval(hint, self.min_refresh, self.max_refresh)
        # Retry sooner than the normal cadence, but never tighter than min_refresh.
        return max(self.min_refresh, min(normal, st.backoff.next()))

    async def _poll_guarded(self, st: _State) -> None:
        # One trust domain's unexpected error (e.g. the datastore) must not stop the others.
        try:
            await self.poll(st.rel.trust_domain)
        except asyncio.CancelledError:
            raise
        except Exception:
            st.failures += 1
            st.due = self.clock() + self._failure_delay(st, self._bundles.get(st.rel.trust_domain))
            log.exception("federation: polling %s failed unexpectedly", st.rel.trust_domain)

    def poke(self) -> None:
        """Poll every endpoint now (tests, admin)."""
        for st in self._states.values():
            st.due = 0.0
        self._poke.set()

    async def run(self) -> None:
        states = [st for st in self._states.values() if st.rel.url]
        if not states:
            return
        while True:
            now = self.clock()
            due = [st for st in states if st.due <= now]
            if due:
                await asyncio.gather(*(self._poll_guarded(st) for st in due))
                continue
            wait = min(st.due for st in states) - now
            self._poke.clear()
            try:
                await asyncio.wait_for(self._poke.wait(), timeout=max(0.01, wait))
            except TimeoutError:
                pass
