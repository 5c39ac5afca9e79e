"""The agent's client of the server's agent API: mutual TLS 1.3, SPIFFE-ID check of the
server, failover across configured addresses, and error classes the agent acts on.

A server that no longer trusts the agent's SVID (its CA key was revoked, or it expired)
aborts the TLS 1.3 handshake after the client's Finished, which the client only sees as a
reset connection, indistinguishable from an outage. So when every address fails that way,
the client asks the same server anonymously for its bundle: if the server answers and our
SVID does not chain to that bundle, the fault is our certificate and the agent must
re-attest (IdentityRejectedError), not retry forever.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import math
import ssl
import time
from collections.abc import Sequence
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from meshid.bundle import Bundle
from meshid.certs import ChainWalker
from meshid.errors import MeshidError, OverloadedError, PermissionDeniedError, UnauthenticatedError
from meshid.http_body import read_bounded
from meshid.json_number import finite_number
from meshid.spiffe_connector import SpiffeConnector
from meshid.spiffe_id import SpiffeId
from meshid.tls import client_context

log = logging.getLogger("meshid.agent.client")

TIMEOUT = aiohttp.ClientTimeout(total=30, connect=5)
# aiohttp reads a response body whole into memory, however large. The largest real answer
# is a sync of the server's MAX_KNOWN (100k) entries, ~40 MB of JSON; beyond this bound a
# faulty server's body is refused instead.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
# A server's retry-after hint is followed up to this; a larger one (or 1e308) parked the
# sync loop for good, and NaN or Infinity made the loop's jitter raise and end it.
MAX_RETRY_AFTER = 300.0
GATEWAY_FAILURES = frozenset({502, 503, 504})


class ServerUnavailableError(MeshidError):
    """No configured server answered; the agent keeps serving its cache and retries."""


class ServerCertificateError(ServerUnavailableError):
    """Every configured server answered with a certificate the agent's roots do not verify."""


class IdentityRejectedError(UnauthenticatedError):
    """The server is up but no longer accepts the agent's SVID at the TLS layer; re-attest.

    `bundle` is the server's current bundle document, fetched over server-authenticated TLS.
    """

    def __init__(self, message: str, bundle: dict[str, Any]) -> None:
        super().__init__(message)
        self.bundle = bundle


class ServerRejectedError(MeshidError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"server refused ({status} {code}): {message}")
        self.status = status
        self.code = code


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bad_response(message: str, status: int = 0) -> ServerRejectedError:
    """The error for an answer the agent cannot use (retried with backoff like a refusal)."""
    return ServerRejectedError(status, "bad_response", message)


def certs_from_json(items: Any) -> list[x509.Certificate]:
    if not isinstance(items, list) or not items:
        raise bad_response("server response has no certificate chain")
    try:
        return [x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in items]
    except (TypeError, ValueError, binascii.Error) as exc:  # not a string, not base64, not DER
        raise bad_response(f"server response has a malformed certificate: {exc}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def _read_json(resp: aiohttp.ClientResponse) -> Any:
    """The response body as JSON, read up to MAX_RESPONSE_BYTES; a clear error otherwise."""
    body = await read_bounded(resp, MAX_RESPONSE_BYTES)
    if body is None:
        raise bad_response(f"response body is larger than {MAX_RESPONSE_BYTES} bytes", resp.status)
    try:
        return json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # HTML from a proxy, NaN, 10**5000, [[[[...
        if resp.status == 429:  # a proxy's own page: its Retry-After header still counts
            return None
        kind = resp.headers.get("Content-Type", "no content type")
        message = f"HTTP {resp.status} answer is not JSON ({kind}): {exc}"
        raise bad_response(message[:300], resp.status) from None


def _text(value: Any, limit: int) -> str:
    # Not str()-ed whatever it is: a list nested 900 deep made str() raise RecursionError.
    return str(value)[:limit] if isinstance(value, (str, int, float)) else f"(a JSON {type(value).__name__})"


def bounded_retry_after(value: Any) -> float:
    """A retry-after hint in seconds, within [0, MAX_RETRY_AFTER]; 1 s if unusable
    (an HTTP-date, garbage, NaN)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        return 1.0
    if math.isnan(seconds):
        return 1.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def chain_verifies(chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], now: float) -> bool:
    """Whether `chain` (leaf first) is time-valid and signed link by link up to one of `roots`.

    Only used to decide whether our own SVID is the reason the server refuses us, so a
    plain signature walk is enough; the server does the real path validation.
    """
    at = dt.datetime.fromtimestamp(now, dt.UTC)
    if any(not (c.not_valid_before_utc <= at < c.not_valid_after_utc) for c in chain):
        return False
    return ChainWalker(roots).reaches_root(chain)


class ServerClient:
    def __init__(self, addresses: Sequence[str], server_id: SpiffeId) -> None:
        self.addresses = list(addresses)
        self.server_id = server_id
        self._current = 0
        self._roots: list[x509.Certificate] = []
        self._identity: tuple[list[x509.Certificate], PrivateKeyTypes] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._anon_session: aiohttp.ClientSession | None = None
        self._closing: list[aiohttp.ClientSession] = []
        self._in_use: dict[aiohttp.ClientSession, int] = {}  # requests running on each session

    # ------------------------------------------------------------------ TLS material
    def set_roots(self, roots: Sequence[x509.Certificate]) -> None:
        if list(roots) != self._roots:
            self._roots = list(roots)
            self._reset()

    def set_identity(self, chain: list[x509.Certificate], key: PrivateKeyTypes) -> None:
        self._identity = (chain, key)
        self._reset()

    def clear_identity(self) -> None:
        self._identity = None
        self._reset()

    def _reset(self) -> None:
        # Sessions are rebuilt lazily; the old ones are closed once no request uses them.
        old = [s for s in (self._session, self._anon_session) if s is not None]
        self._session = self._anon_session = None
        for s in old:
            self._closing.append(s)

    def _ctx(self, with_identity: bool) -> ssl.SSLContext:
        if not self._roots:
            raise ServerUnavailableError("no trust bundle to authenticate the server with")
        if with_identity:
            if self._identity is None:
                raise UnauthenticatedError("agent has no SVID yet")
            return client_context(self._roots, *self._identity)
        return client_context(self._roots)

    async def _get_session(self, with_identity: bool) -> aiohttp.ClientSession:
        # Not one a request is still running on (a workload's JWT-SVID signing while the
        # sync loop adopts a bundle): closed under it, the request was cut off, and its
        # retry at the next address raised RuntimeError("Session is closed").
        idle = [s for s in self._closing if s not in self._in_use]
        self._closing = [s for s in self._closing if s in self._in_use]
        for old in idle:
            await old.close()
        attr = "_session" if with_identity else "_anon_session"
        s = getattr(self, attr)
        if s is None or s.closed:
            connector = SpiffeConnector(self.server_id, ssl=self._ctx(with_identity), limit=16)
            s = aiohttp.ClientSession(connector=connector, timeout=TIMEOUT)
            setattr(self, attr, s)
        return s

    async def close(self) -> None:
        self._reset()
        while self._closing:
            await self._closing.pop().close()

    # ------------------------------------------------------------------ requests
    async def _request(self, method: str, path: str, body: dict[str, Any] | None, with_identity: bool,
                       ) -> dict[str, Any]:
        session = await self._get_session(with_identity)
        self._in_use[session] = self._in_use.get(session, 0) + 1
        try:
            return await self._request_on(session, method, path, body, with_identity)
        finally:
            left = self._in_use.pop(session) - 1
            if left:
                self._in_use[session] = left

    async def _request_on(self, session: aiohttp.ClientSession, method: str, path: str,
                          body: dict[str, Any] | None, with_identity: bool) -> dict[str, Any]:
        last: Exception | None = None
        cert_errors = 0
        for attempt in range(len(self.addresses)):
            addr = self.addresses[(self._current + attempt) % len(self.addresses)]
            try:
                async with session.request(method, f"https://{addr}{path}", json=body) as resp:
                    if resp.status in GATEWAY_FAILURES and attempt + 1 < len(self.addresses):
                        # A proxy in front of a down server, or a failing replica: the next
                        # address may well answer (the last one's answer is reported as is).
                        last = ServerUnavailableError(f"server {addr} answered HTTP {resp.status}")
                        log.debug("%s", last)
                        continue
                    data = await _read_json(resp)
                    self._current = (self._current + attempt) % len(self.addresses)
                    return self._check(resp.status, data, resp.headers)
            # ClientError beyond connection errors: a malformed HTTP answer or a body cut
            # short (ClientPayloadError) escaped here and ended each sync with a traceback.
            except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as exc:
                last = exc
                cert_errors += isinstance(exc, aiohttp.ClientConnectorCertificateError)
                log.debug("server %s unreachable: %s", addr, exc)
                continue
        if isinstance(last, aiohttp.ClientConnectorCertificateError):
            # Our roots cannot authenticate the server: say what the operator must do, since
            # retrying alone only helps if the server goes back to a root we hold.
            error = ServerCertificateError if cert_errors == len(self.addresses) else ServerUnavailableError
            raise error(
                f"cannot verify the server's certificate with the agent's trust bundle ({last}); if the "
                "server moved to a new root while the agent was offline, re-bootstrap the agent: put "
                "the new root in trust_bundle_path and remove bundle.json from its data_dir")
        if with_identity and self._identity is not None and not isinstance(last, TimeoutError):
            await self._check_identity_rejected(last)
        raise ServerUnavailableError(f"no server reachable ({', '.join(self.addresses)}): {last}")

    async def _post(self, path: str, body: dict[str, Any], with_identity: bool = True) -> dict[str, Any]:
        return await self._request("POST", path, body, with_identity)

    async def _check_identity_rejected(self, cause: Exception | None) -> None:
        """Raise IdentityRejectedError when the server answers anonymously and our SVID does
        not chain to its current bundle; return (caller reports an outage) otherwise."""
        assert self._identity is not None
        try:
            doc = await self.fetch_bundle()
            bundle = Bundle.from_spiffe_json(self.server_id.trust_domain, doc)
        except (MeshidError, ValueError) as exc:
            log.debug("anonymous bundle probe failed too (%s): the server is unavailable", exc)
            return
        if not bundle.x509_authorities:
            # Nothing can chain to it: a faulty answer, not proof that our SVID is refused
            # (re-attesting on it spent a single-use join token).
            log.debug("anonymous bundle probe answered a bundle without X509 roots")
            return
        chain = self._identity[0]
        if chain_verifies(chain, bundle.x509_authorities, time.time()):
            log.warning("server refused our TLS client certificate although it verifies against the "
                        "server's current bundle (%s); treating as unavailable", cause)
            return
        raise IdentityRejectedError(
            "the server answers but no longer trusts the agent SVID (its CA was revoked or it expired)", doc)

    @staticmethod
    def _check(status: int, data: Any, headers: Any) -> dict[str, Any]:
        if status < 400 and isinstance(data, dict):
            return data
        if status < 400:
            raise bad_response(f"HTTP {status} answer is a JSON {type(data).__name__}, not an object", status)
        err = data.get("error", {}) if isinstance(data, dict) else {}
        if not isinstance(err, dict):  # {"error": "text"} raised AttributeError
            err = {"message": err}
        code, message = _text(err.get("code", "error"), 100), _text(err.get("message", ""), 1000)
        if status == 429:
            retry = data.get("retry_after") if isinstance(data, dict) else None
            if isinstance(retry, bool) or not isinstance(retry, (int, float)):
                retry = headers.get("Retry-After", "1")
            raise OverloadedError(message or "server overloaded", retry_after=bounded_retry_after(retry))
        if status == 403:
            raise PermissionDeniedError(message)
        if status == 401:
            raise UnauthenticatedError(message)
        raise ServerRejectedError(status, code, message)

    # ------------------------------------------------------------------ API
    async def fetch_bundle(self) -> dict[str, Any]:
        """The server's current bundle document, over server-authenticated TLS only."""
        return await self._request("GET", "/v1/bundle", None, with_identity=False)

    async def attest(self, attestor: str, payload: dict[str, Any], csr: bytes) -> dict[str, Any]:
        body = {"attestor": attestor, "payload": payload, "csr": b64(csr)}
        return await self._post("/v1/agent/attest", body, with_identity=False)

    async def answer(self, session_id: str, response: bytes) -> dict[str, Any]:
        return await self._post("/v1/agent/attest/answer", {"session": session_id, "response": b64(response)},
                                with_identity=False)

    async def renew(self, csr: bytes) -> list[x509.Certificate]:
        return certs_from_json((await self._post("/v1/agent/renew", {"csr": b64(csr)})).get("svid"))

    async def sync(self, known: dict[str, int], bundle_sequence: int,
                   federated: dict[str, str] | None = None,
                   known_created: dict[str, int] | None = None) -> dict[str, Any]:
        # `federated`: digests of the federated bundles we hold, so only changed ones come back.
        # `known_created`: the held entries' created_at, so one re-created under its id (at a
        # revision the agent may hold) comes back too.
        return await self._post("/v1/agent/sync", {"known": known, "known_created": known_created or {},
                                                   "bundle_sequence": bundle_sequence,
                                                   "federated": federated or {}})

    async def sign_x509(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        data = await self._post("/v1/agent/sign/x509", {"requests": requests})
        results = data.get("results")
        if not isinstance(results, list):
            raise bad_response("sign response has no results")
        return results

    async def sign_jwt(self, entry_id: str, audience: list[str]) -> tuple[str, int]:
        data = await self._post("/v1/agent/sign/jwt", {"entry_id": entry_id, "audience": audience})
        token, expires_at = data.get("token"), data.get("expires_at")
        if not isinstance(token, str) or not token:
            raise bad_response("JWT-SVID answer has no token")
        # 1e999 (infinity) or 10**400 raised OverflowError from int(); a bool passed as 0/1.
        exp = finite_number(expires_at)
        if exp is None:
            raise bad_response(f"JWT-SVID answer has no usable expires_at ({str(expires_at)[:40]})")
        return token, int(exp)

    async def report(self, failures: list[dict[str, Any]]) -> None:
        await self._post("/v1/agent/report", {"workload_attestation_failures": failures})
