"""Admin API on a Unix socket (mode 0600, owner-only) used by the `meshid` CLI.

The socket's mode is the access control; as defence in depth every connection's
SO_PEERCRED uid must be the server's own uid or root.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any

from aiohttp import web

from attestors.node.join_token import MAX_TOKEN_TTL, MIN_TOKEN_TTL, new_token
from issuer.api.errors import error_middleware, read_json
from issuer.ca.slots import JWT, X509, CaManager, LoadedKey
from issuer.datastore.base import AgentRecord, DataStore
from issuer.entries import EntryService
from issuer.node_attestation import AgentService
from meshid.entry import Entry
from meshid.errors import PermissionDeniedError
from meshid.spiffe_id import SpiffeId


def _peer_uid(request: web.Request) -> int | None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


@web.middleware
async def peer_uid_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    uid = _peer_uid(request)
    if uid is None or uid not in (0, os.getuid()):
        raise PermissionDeniedError("admin socket: caller uid is not allowed")
    return await handler(request)


def agent_json(a: AgentRecord) -> dict[str, Any]:
    return {
        "agent_id": str(a.agent_id),
        "attestor": a.attestor,
        "selectors": [str(s) for s in a.selectors],
        "serial": a.serial,
        "expires_at": a.expires_at,
        "banned": a.banned,
        "created_at": a.created_at,
        "updated_at": a.updated_at,
    }


def key_json(k: LoadedKey) -> dict[str, Any]:
    r = k.record
    return {
        "key_id": r.key_id,
        "kind": r.kind,
        "state": r.state,
        "tainted": r.tainted,
        "not_before": r.not_before,
        "not_after": r.not_after,
        "server_id": r.server_id,
        "max_signed_not_after": r.max_signed_not_after,
        "subject": k.cert.subject.rfc4514_string() if k.cert is not None else "",
        "issuer": k.cert.issuer.rfc4514_string() if k.cert is not None else "",
    }


class AdminApi:
    def __init__(
        self,
        ds: DataStore,
        entries: EntryService,
        agents: AgentService,
        ca: CaManager,
        token_ttl: float,
        trust_domain: str,
    ) -> None:
        self.ds = ds
        self.entries = entries
        self.agents = agents
        self.ca = ca
        self.token_ttl = token_ttl
        self.trust_domain = trust_domain

    def app(self) -> web.Application:
        # error_middleware is outermost so the uid check's refusal is answered as a 403, not a 500.
        app = web.Application(
            client_max_size=1024 * 1024, middlewares=[error_middleware, peer_uid_middleware]
        )
        r = app.router
        r.add_get("/v1/entries", self.list_entries)
        r.add_post("/v1/entries", self.create_entry)
        r.add_get("/v1/entries/{id}", self.show_entry)
        r.add_put("/v1/entries/{id}", self.update_entry)
        r.add_delete("/v1/entries/{id}", self.delete_entry)
        r.add_post("/v1/tokens", self.create_token)
        r.add_get("/v1/agents", self.list_agents)
        r.add_post("/v1/agents/evict", self.evict)
        r.add_post("/v1/agents/ban", self.ban)
        r.add_get("/v1/bundle", self.bundle)
        r.add_get("/v1/ca", self.ca_show)
        r.add_post("/v1/ca/{op}", self.ca_op)
        return app

    async def list_entries(self, request: web.Request) -> web.Response:
        entries = await self.entries.list()
        sid = request.query.get("spiffe_id")
        parent = request.query.get("parent_id")
        if sid:
            entries = [e for e in entries if str(e.spiffe_id) == sid]
        if parent:
            entries = [e for e in entries if str(e.parent_id) == parent]
        return web.json_response({"entries": [e.to_json() for e in entries]})

    async def create_entry(self, request: web.Request) -> web.Response:
        entry = Entry.from_json(await read_json(request))
        created = await self.entries.create(entry)
        return web.json_response(created.to_json(), status=201)

    async def show_entry(self, request: web.Request) -> web.Response:
        return web.json_response((await self.entries.get(request.match_info["id"])).to_json())

    async def update_entry(self, request: web.Request) -> web.Response:
        body = await read_json(request)

        def change(current: Entry) -> Entry:
            # The body's fields over the entry as stored at the write (not as read before it,
            # which wrote back a concurrent update's fields as they were); to_json() has no
            # additional_attributes (extra), so they are carried over, not dropped.
            merged = {**current.to_json(), **body, "id": current.id}
            return Entry.from_json(merged).replace(extra=current.extra)

        updated = await self.entries.modify(request.match_info["id"], change)
        return web.json_response(updated.to_json())

    async def delete_entry(self, request: web.Request) -> web.Response:
        deleted = await self.entries.delete(request.match_info["id"])
        return web.json_response(deleted.to_json())

    async def create_token(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        ttl = body.get("ttl", self.token_ttl)
        # At least a second: a ttl of 0.0001 made a token that had expired when it was shown.
        if (
            isinstance(ttl, bool)
            or not isinstance(ttl, (int, float))
            or not MIN_TOKEN_TTL <= ttl <= MAX_TOKEN_TTL
        ):
            raise ValueError(f"ttl must be between {MIN_TOKEN_TTL} and {MAX_TOKEN_TTL} seconds")
        tok = new_token(float(ttl), self.entries.clock())
        await self.ds.create_join_token(tok.token_hash, tok.token_id, tok.expires_at)
        agent_id = f"spiffe://{self.trust_domain}/meshid/agent/join_token/{tok.token_id}"
        return web.json_response(
            {
                "token": tok.token,
                "token_id": tok.token_id,
                "agent_id": agent_id,
                "expires_at": tok.expires_at,
            },
            status=201,
        )

    async def list_agents(self, request: web.Request) -> web.Response:
        return web.json_response({"agents": [agent_json(a) for a in await self.agents.list()]})

    async def _agent_id(self, request: web.Request) -> SpiffeId:
        body = await read_json(request)
        agent_id = body.get("agent_id")
        # Not str()-ed: a list nested 1000 deep (orjson allows 1024) made repr() raise RecursionError.
        if not isinstance(agent_id, str) or not agent_id:
            raise ValueError("agent_id (a SPIFFE ID string) is required")
        return SpiffeId.parse(agent_id)

    async def evict(self, request: web.Request) -> web.Response:
        await self.agents.evict(await self._agent_id(request))
        return web.json_response({})

    async def ban(self, request: web.Request) -> web.Response:
        await self.agents.ban(await self._agent_id(request))
        return web.json_response({})

    async def bundle(self, request: web.Request) -> web.Response:
        fmt = request.query.get("format", "pem")
        b = self.ca.bundle
        if fmt == "pem":
            return web.Response(body=b.x509_pem(), content_type="application/x-pem-file")
        if fmt == "spiffe":
            return web.Response(body=b.to_spiffe_bytes(), content_type="application/json")
        raise ValueError("format must be pem or spiffe")

    async def ca_show(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "keys": [key_json(k) for k in self.ca.keys()],
                "bundle_sequence": self.ca.bundle.sequence,
            }
        )

    async def ca_op(self, request: web.Request) -> web.Response:
        op = request.match_info["op"]
        body = await read_json(request)
        if op in ("prepare", "activate"):
            kind = body.get("kind", X509)
            if kind not in (X509, JWT):
                raise ValueError("kind must be x509 or jwt")
            lk = await (self.ca.prepare(kind) if op == "prepare" else self.ca.activate(kind))
            return web.json_response(key_json(lk))
        key_id = body.get("key_id")
        if not isinstance(key_id, str) or not key_id:
            raise ValueError("key_id is required")
        if op == "taint":
            return web.json_response(key_json(await self.ca.taint(key_id)))
        if op == "revoke":
            force = body.get("force", False)
            if not isinstance(force, bool):  # bool("false") is True
                raise ValueError("force must be a boolean")
            await self.ca.revoke(key_id, force=force)
            return web.json_response({})
        raise web.HTTPNotFound(text="unknown CA operation")
