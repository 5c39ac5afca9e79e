"""The agent API: aiohttp over mutual TLS 1.3 (client certificate optional only so that an
agent without an SVID can call /v1/agent/attest; every other route requires an agent SVID).

Wire format (JSON bodies, binary fields base64):
  POST /v1/agent/attest          {attestor, payload, csr}          → {svid:[der..], agent_id, bundle}
                                 or, for challenge attestors,      → {session, challenge}
  POST /v1/agent/attest/answer   {session, response}               → {svid, agent_id, bundle}
  POST /v1/agent/renew           {csr}                             → {svid}
  POST /v1/agent/sync            {known:{entry_id: revision}, known_created?:{entry_id: created_at},
                                  bundle_sequence, federated?:{"spiffe://td": digest}}
                                 → {entries:[...changed], removed:[ids], bundle?, bundle_sequence,
                                    tainted_keys, federated_digests:{"spiffe://td": digest},
                                    federated_bundles?:{"spiffe://td": SPIFFE bundle JSON, if changed}}
  POST /v1/agent/sign/x509       {requests:[{entry_id, csr, rotation_reason?, scheduled_rotation_at?}]}
                                 → {results:[{entry_id, svid}|{entry_id, error:{code,message}}]}
  POST /v1/agent/sign/jwt        {entry_id, audience:[..]}         → {token, expires_at}
  POST /v1/agent/report          {workload_attestation_failures:[...]} → {}
  GET  /v1/bundle                                                  → SPIFFE bundle JSON
Overload: 429 with Retry-After and {"retry_after": seconds}.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any

import orjson
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from attestors.node.base import AttestationRequest
from issuer.api.errors import error_middleware, read_json
from issuer.ca.slots import CaManager
from issuer.datastore.base import AgentRecord
from issuer.federation import FederationPoller, federated_for_agent
from issuer.node_attestation import AgentService, IssuedAgentSvid
from issuer.signing import MAX_BATCH, SigningService, X509Request, X509Result
from meshid.errors import UnauthenticatedError
from meshid.tls import peer_certificate, spiffe_id_of_cert

log = logging.getLogger("meshid.agent_api")

MAX_CSR_BYTES = 16 * 1024
# Body limit of the two calls open to callers without an SVID (the largest real evidence,
# an x509pop chain of five certificates with the CSR, is tens of KiB). The app-wide limit
# (max_request_bytes, 4 MiB) let anyone send 4 MiB of JSON that parses into ~100 MB of
# Python objects, held across the attestation's awaits.
MAX_ATTEST_BODY = 256 * 1024
MAX_KNOWN = 100_000
MAX_FEDERATED = 1000
# scheduled_rotation_at is a Unix time that goes into the issuance event as an RFC 3339
# timestamp: it must be one (years 1970-9999).
MAX_UNIX_TIME = 253_402_300_799

AGENT_KEY = web.RequestKey("agent", AgentRecord)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(value: Any, name: str, limit: int = MAX_CSR_BYTES) -> bytes:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty base64 string")
    if len(value) > limit * 4 // 3 + 4:
        raise ValueError(f"{name} is larger than {limit} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{name} is not valid base64") from None


def json_body(obj: Any) -> web.Response:
    """A JSON response encoded with orjson (a full sign batch is ~1.4 MB of base64,
    ~8x faster than the stdlib); what orjson refuses (integers beyond 64 bits, float
    subclasses) goes through the stdlib."""
    try:
        body = orjson.dumps(obj)
    except orjson.JSONEncodeError as exc:
        log.debug("orjson refused a response (%s); using json", exc)
        body = json.dumps(obj).encode()
    return web.Response(body=body, content_type="application/json")


def _chain_json(chain: list[Any]) -> list[str]:
    return [b64(c.public_bytes(serialization.Encoding.DER)) for c in chain]


def _svid_json(chain_der: tuple[bytes, ...], ca_b64: dict[bytes, str]) -> list[str]:
    """A signed chain for the wire: the leaf encoded, the CA part through `ca_b64`, one
    response's memo (every SVID of a batch carries the same CA certificates)."""
    out = [b64(chain_der[0])]
    for der in chain_der[1:]:
        text = ca_b64.get(der)
        if text is None:
            text = ca_b64[der] = b64(der)
        out.append(text)
    return out


class AgentApi:
    def __init__(
        self,
        agents: AgentService,
        signing: SigningService,
        ca: CaManager,
        reporter: Any = None,
        federation: FederationPoller | None = None,
    ) -> None:
        self.agents = agents
        self.signing = signing
        self.ca = ca
        self.reporter = reporter
        self.federation = federation

    def app(self, max_body: int) -> web.Application:
        app = web.Application(client_max_size=max_body, middlewares=[error_middleware, self._auth])
        app.router.add_post("/v1/agent/attest", self.attest)
        app.router.add_post("/v1/agent/attest/answer", self.answer)
        app.router.add_post("/v1/agent/renew", self.renew)
        app.router.add_post("/v1/agent/sync", self.sync)
        app.router.add_post("/v1/agent/sign/x509", self.sign_x509)
        app.router.add_post("/v1/agent/sign/jwt", self.sign_jwt)
        app.router.add_post("/v1/agent/report", self.report)
        app.router.add_get("/v1/bundle", self.bundle)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path in ("/v1/agent/attest", "/v1/agent/attest/answer", "/v1/bundle"):
            return await handler(request)
        transport = request.transport
        cert = peer_certificate(transport.get_extra_info("ssl_object") if transport else None)
        if cert is None:
            raise UnauthenticatedError("this call requires the agent's X509-SVID as client certificate")
        if not self.ca.issued_by_known_ca(cert):
            raise UnauthenticatedError(
                "agent SVID was signed by a CA key that is no longer trusted; re-attest"
            )
        # The handshake checked the validity period once, but a kept-alive connection serves
        # request after request: one opened just before the SVID expired went on being
        # accepted long after (SPIRE checks every call for the same reason).
        if cert.not_valid_after_utc.timestamp() <= self.agents.clock():
            raise UnauthenticatedError("agent SVID has expired; re-attest")
        agent_id = spiffe_id_of_cert(cert)
        request[AGENT_KEY] = await self.agents.authenticate(agent_id, cert.serial_number)
        return await handler(request)

    @staticmethod
    def _source(request: web.Request) -> str:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"

    def _issued(self, issued: IssuedAgentSvid) -> web.Response:
        return web.json_response(
            {
                "svid": _chain_json(issued.chain),
                "agent_id": str(issued.agent.agent_id),
                "bundle": self.ca.bundle.to_spiffe_json(),
            }
        )

    async def attest(self, request: web.Request) -> web.Response:
        body = await read_json(request, MAX_ATTEST_BODY)
        attestor = body.get("attestor")
        payload = body.get("payload", {})
        if not isinstance(attestor, str) or not attestor:
            raise ValueError("attestor must be a non-empty string")
        if not isinstance(payload, dict):
            raise ValueError("payload must be an object")
        csr = unb64(body.get("csr"), "csr")
        req = AttestationRequest(attestor, payload, self._source(request))
        outcome = await self.agents.begin(req, csr)
        if isinstance(outcome, IssuedAgentSvid):
            return self._issued(outcome)
        session, nonce = outcome
        return web.json_response({"session": session, "challenge": b64(nonce)})

    async def answer(self, request: web.Request) -> web.Response:
        body = await read_json(request, MAX_ATTEST_BODY)
        session = body.get("session")
        if not isinstance(session, str) or not session or len(session) > 128:
            raise ValueError("session must be the string returned by /v1/agent/attest")
        response = unb64(body.get("response"), "response", 4096)
        return self._issued(await self.agents.answer(session, response, self._source(request)))

    async def renew(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        csr = unb64(body.get("csr"), "csr")
        agent = request[AGENT_KEY]
        # A renewal is a signing: it takes from the agent's signing bucket like any CSR.
        async with self.signing.admission.admit(str(agent.agent_id), 1):
            issued = await self.agents.renew(agent, csr)
        return web.json_response({"svid": _chain_json(issued.chain)})

    async def sync(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        agent = request[AGENT_KEY]
        known = body.get("known", {})
        if not isinstance(known, dict) or len(known) > MAX_KNOWN:
            raise ValueError("known must be an object of entry id → revision")
        # An entry deleted and re-created under its id is at revision 0 again, maybe the
        # revision the agent holds: compared by revision alone it was never resent, and the
        # agent kept the old entry's selectors. Its created_at tells them apart (SPIRE's
        # entryIsStale); agents that do not send it are compared by revision only.
        known_created = body.get("known_created", {})
        if not isinstance(known_created, dict) or len(known_created) > MAX_KNOWN:
            raise ValueError("known_created must be an object of entry id → created_at")
        seq = body.get("bundle_sequence", -1)
        fed_known = body.get("federated", {})
        if (
            not isinstance(fed_known, dict)
            or len(fed_known) > MAX_FEDERATED
            or not all(isinstance(v, str) for v in fed_known.values())
        ):
            raise ValueError("federated must be an object of trust domain ID → digest")
        index = await self.signing.entries.index()
        now = self.signing.clock()  # expired entries are left out (and so removed)
        allowed = index.authorized(agent.agent_id, agent.selectors, now)
        changed = [e.to_json() for eid, e in allowed.items() if known.get(eid) != e.revision_number
                   or known_created.get(eid, e.created_at) != e.created_at]
        removed = [eid for eid in known if eid not in allowed]
        bundle = self.ca.bundle
        out: dict[str, Any] = {
            "entries": changed,
            "removed": removed,
            "workload_parents": [str(agent.agent_id), *map(str, index.node_aliases(agent.selectors, now))],
            "bundle_sequence": bundle.sequence,
            "tainted_authorities": self.ca.tainted_authority_key_ids(),
            "taint_window": float(self.signing.taint_window),
        }
        if seq != bundle.sequence:
            out["bundle"] = bundle.to_spiffe_json()
        if self.federation is not None:
            # Only the trust domains this agent's entries federate with, and only bundles
            # whose digest differs from what the agent says it holds.
            fed, digests = federated_for_agent(allowed.values(), self.federation.current(), fed_known)
            out["federated_digests"] = digests
            if fed:
                out["federated_bundles"] = fed
        return json_body(out)

    async def sign_x509(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        raw = body.get("requests")
        if not isinstance(raw, list) or not raw:
            raise ValueError("requests must be a non-empty list")
        if len(raw) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} CSRs per call")
        reqs: list[X509Request] = []
        # A CSR that is not base64 fails its own item, as one that is not a CSR does in
        # signing, rather than the whole batch it came with.
        undecodable: dict[int, str] = {}
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or not isinstance(item.get("entry_id"), str):
                raise ValueError(f"requests[{i}] needs entry_id and csr")
            sched = item.get("scheduled_rotation_at")
            if isinstance(sched, (int, float)) and not 0 <= sched <= MAX_UNIX_TIME:
                raise ValueError(f"requests[{i}].scheduled_rotation_at must be a Unix time")
            reason = item.get("rotation_reason", "initial")
            if not isinstance(reason, str):
                raise ValueError(f"requests[{i}].rotation_reason must be a string")
            try:
                csr = unb64(item.get("csr"), f"requests[{i}].csr")
            except ValueError as exc:
                undecodable[i] = str(exc)
                continue
            reqs.append(
                X509Request(
                    item["entry_id"], csr, reason, float(sched) if isinstance(sched, (int, float)) else None
                )
            )
        signed = iter(await self.signing.sign_x509(request[AGENT_KEY], reqs) if reqs else [])
        results = [
            X509Result(item["entry_id"], error_code="invalid_argument", error=undecodable[i])
            if i in undecodable
            else next(signed)
            for i, item in enumerate(raw)
        ]
        out: list[dict[str, Any]] = []
        ca_b64: dict[bytes, str] = {}
        for r in results:
            if r.chain_der is not None:
                out.append({"entry_id": r.entry_id, "svid": _svid_json(r.chain_der, ca_b64)})
            else:
                out.append({"entry_id": r.entry_id, "error": {"code": r.error_code, "message": r.error}})
        return json_body({"results": out})

    async def sign_jwt(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        entry_id = body.get("entry_id")
        audience = body.get("audience")
        if not isinstance(entry_id, str) or not isinstance(audience, list):
            raise ValueError("entry_id (string) and audience (list) are required")
        token, expires = await self.signing.sign_jwt(request[AGENT_KEY], entry_id, audience)
        return web.json_response({"token": token, "expires_at": expires})

    async def report(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        failures = body.get("workload_attestation_failures", [])
        if not isinstance(failures, list) or len(failures) > 1000:
            raise ValueError("workload_attestation_failures must be a list of at most 1000 items")
        if self.reporter is not None:
            await self.reporter(request[AGENT_KEY], failures)
        return web.json_response({})

    async def bundle(self, request: web.Request) -> web.Response:
        return web.json_response(self.ca.bundle.to_spiffe_json())
