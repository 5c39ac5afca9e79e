"""Overload on a real server: 50 agents (attested with join tokens through the agent's own
client and node identity code) flood sign/x509 under tight admission limits.

The server must stay healthy (/ready answers within 1 s throughout), refuse with 429 +
Retry-After + JSON retry_after rather than time out, count every refusal where metrics
see it, and every agent must get all its SVIDs by honouring retry-after with jitter.
"""

from __future__ import annotations

import asyncio
import base64
import random
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509

from meshid.backoff import jittered
from meshid.cli.admin_client import AdminClient
from meshid.cli.dev import start_dev
from meshid.entry import Entry
from meshid.errors import OverloadedError
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId
from meshid.tls import spiffe_id_of_cert
from workload_api.config import agent_config_from_dict
from workload_api.keys import csr_for, new_key
from workload_api.node_identity import NodeIdentity
from workload_api.rotation import RotationPolicy
from workload_api.server_client import ServerClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

AGENTS = 50
ENTRIES_PER_AGENT = 12
BATCH = 6
LIMITS = {
    "max_concurrent_signing": 2, "max_queue": 2,
    "agent_rate": 20.0, "agent_burst": 20,
    "global_rate": 150.0, "global_burst": 60,
}
REFUSED = re.compile(r'^meshid_svid_refused_total\{kind="x509",reason="overloaded"\} (\S+)$', re.M)


class RecordingClient(ServerClient):
    """The agent's client, noting what each overload refusal looked like on the wire."""

    refusals: list[tuple[int, str | None, Any]]

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.refusals = []

    def _check(self, status: int, data: Any, headers: Any) -> dict[str, Any]:  # type: ignore[override]
        if status == 429:
            self.refusals.append((status, headers.get("Retry-After"),
                                  data.get("retry_after") if isinstance(data, dict) else None))
        return ServerClient._check(status, data, headers)


async def refused_metric(session: aiohttp.ClientSession, port: int) -> float:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        m = REFUSED.search(await resp.text())
    return float(m.group(1)) if m else 0.0


async def test_flood_of_signing_requests(short_tmp: Path) -> None:
    overrides = {"admission": LIMITS, "server": {"attest_rate_per_minute": 10_000}}
    stack = await start_dev(short_tmp / "d", "example.org", str(short_tmp / "s" / "api.sock"), svid_ttl=3600,
                            server_overrides=overrides)
    clients: list[RecordingClient] = []
    sessions: list[aiohttp.ClientSession] = []
    try:
        server = stack.server
        td = server.td
        addr = f"127.0.0.1:{server.agent_api_port}"
        roots = list(server.ca.bundle.x509_authorities)

        # 50 agents attest with join tokens, as real agents do (NodeIdentity + ServerClient).
        nodes: list[NodeIdentity] = []
        async with AdminClient(server.config.admin_socket_path) as admin:
            tokens = [await admin.call("POST", "/v1/tokens", {"ttl": 600}) for _ in range(AGENTS)]
        for i, tok in enumerate(tokens):
            state = short_tmp / "agents" / str(i)
            state.mkdir(parents=True)
            config = agent_config_from_dict({
                "trust_domain": td.name, "data_dir": str(state), "server_address": [addr],
                "trust_bundle_path": stack.agent.config.trust_bundle_path,
                "node_attestor": {"join_token": {"token": tok["token"]}},
            })
            client = RecordingClient([addr], SpiffeId(td, "/meshid/server"))
            client.set_roots(roots)
            clients.append(client)
            nodes.append(NodeIdentity(config, client, RotationPolicy(), random.Random(i)))
        await asyncio.gather(*(n.attest() for n in nodes))
        entries: list[list[Entry]] = []
        for i, node in enumerate(nodes):
            assert node.agent_id == SpiffeId.parse(tokens[i]["agent_id"])
            mine = []
            for j in range(ENTRIES_PER_AGENT):
                mine.append(await server.entries.create(Entry(
                    "", SpiffeId(td, f"/flood/{i}/{j}"), node.agent_id,
                    (Selector("unix", f"uid:{100_000 + i * 100 + j}"),))))
            entries.append(mine)

        stats = server.admission.stats
        stats_before = stats.refused_rate + stats.refused_busy
        health = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        sessions.append(health)
        metric_before = await refused_metric(health, server.health_port)
        latencies: list[float] = []
        flooding = True

        async def poll_ready() -> None:
            while flooding:
                start = time.monotonic()
                async with health.get(f"http://127.0.0.1:{server.health_port}/ready") as resp:
                    assert resp.status == 200
                    assert (await resp.json())["ready"] is True
                latencies.append(time.monotonic() - start)
                await asyncio.sleep(0.05)

        waits: list[tuple[float, float]] = []  # (retry_after hint, delay actually waited)

        async def agent(i: int) -> dict[str, x509.Certificate]:
            client, rng = clients[i], random.Random(1000 + i)
            pending = {e.id: e for e in entries[i]}
            got: dict[str, x509.Certificate] = {}
            while pending:
                batch = list(pending.values())[:BATCH]
                requests = [{"entry_id": e.id, "csr": base64.b64encode(csr_for(new_key())).decode()}
                            for e in batch]
                try:
                    results = await client.sign_x509(requests)
                except OverloadedError as exc:
                    delay = jittered(exc.retry_after, rng)
                    waits.append((exc.retry_after, delay))
                    await asyncio.sleep(delay)
                    continue
                for r in results:
                    assert "svid" in r, r
                    got[r["entry_id"]] = x509.load_der_x509_certificate(base64.b64decode(r["svid"][0]))
                    pending.pop(r["entry_id"])
            return got

        poller = asyncio.create_task(poll_ready())
        started = time.monotonic()
        try:
            async with asyncio.timeout(120):
                results = await asyncio.gather(*(agent(i) for i in range(AGENTS)))
        finally:
            flooding = False
            await poller
        elapsed = time.monotonic() - started

        # Every agent got every SVID, for the right identities.
        for i, got in enumerate(results):
            assert {eid: str(spiffe_id_of_cert(c)) for eid, c in got.items()} == \
                {e.id: str(e.spiffe_id) for e in entries[i]}
        # The health endpoint never stalled.
        assert len(latencies) >= 10
        assert max(latencies) < 1.0, f"/ready took {max(latencies):.2f}s"
        # Refusals: 429 with both hints, consistent with each other.
        refusals = [r for c in clients for r in c.refusals]
        assert len(refusals) >= AGENTS, "the limits were not tight enough to refuse anything"
        for status, header, body in refusals:
            assert status == 429
            assert isinstance(body, float) and body >= 0.05
            assert header is not None and header == str(max(1, round(body)))
        # Retries honoured the hint, never earlier, and did not come back in step.
        assert all(delay >= hint for hint, delay in waits)
        assert len({round(delay, 3) for _, delay in waits}) > len(waits) // 2
        # Every refusal is counted, in the admission stats and in /metrics alike.
        refused = stats.refused_rate + stats.refused_busy - stats_before
        assert refused >= len(refusals)
        assert await refused_metric(health, server.health_port) - metric_before == refused
        print(f"{AGENTS} agents, {AGENTS * ENTRIES_PER_AGENT} SVIDs in {elapsed:.1f}s; {len(refusals)} "
              f"refusals; /ready max {max(latencies) * 1000:.0f} ms over {len(latencies)} polls")
    finally:
        for c in clients:
            await c.close()
        for s in sessions:
            await s.close()
        await stack.stop()
