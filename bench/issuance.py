"""Certificates per second: meshid's agent API against `cfssl serve`, same box, same run.

meshid: the server (with `meshid dev`'s in-process agent) runs in a child process, as
cfssl does. The load generator is a fleet of real agents: each node-attests with a join
token and then calls ServerClient.sign_x509 over mutual TLS 1.3 exactly as the agent's
SvidManager does, one batch at a time of up to 500 CSRs, each CSR for a distinct entry
of that agent. A second meshid line sends one CSR per call from many concurrent callers,
the shape cfssl is driven with.

cfssl: `cfssl serve` (Debian's golang-cfssl, installed with apt-get when missing) with an
ECDSA P-256 CA, driven over plain HTTP with aiohttp from concurrent clients, one CSR per
POST /api/v1/cfssl/sign, its only mode. Leaf keys are ECDSA P-256 on both sides, and
both issue 1 h certificates for serverAuth+clientAuth. meshid additionally authenticates
the agent, authorises every entry and writes an issuance event per certificate to its
datastore outbox; cfssl does none of that.

CSRs are made before any timing. Rounds alternate meshid / meshid batch-1 / cfssl, so
drifting machine speed hits all alike; each rate is the median over rounds, each ratio the
median of the per-round ratios. Server CPU seconds per 1000 certificates come from the
server process's /proc stat (all threads).

    python bench/issuance.py [--seconds 5] [--rounds 3] [--agents 4] [--concurrency 64]

Last line: `ratio meshid/cfssl=<x> batch1_ratio=<y>` (meshid batched and batch-1 rates
over cfssl's rate).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TD = "bench.example"
MESHID_BATCH = 500  # workload_api.manager.BATCH: what an agent sends per call
SVID_TTL = 3600


# ----------------------------------------------------------------------------- helpers
def _proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _make_csrs(n: int) -> list[tuple[bytes, bytes]]:
    """n distinct ECDSA P-256 CSRs as (DER, PEM), made outside any timed region."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = []
    for i in range(n):
        key = ec.generate_private_key(ec.SECP256R1())
        # cfssl copies the CSR's SANs; meshid ignores them (names come from the entry).
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{TD}/bench/w{i}")])
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(san, critical=False)
            .sign(key, hashes.SHA256())
        )
        out.append(
            (csr.public_bytes(serialization.Encoding.DER), csr.public_bytes(serialization.Encoding.PEM))
        )
    return out


@dataclass
class Sample:
    certs: int
    seconds: float
    server_cpu: float
    client_cpu: float
    errors: int = 0

    @property
    def rate(self) -> float:
        return self.certs / self.seconds

    @property
    def cpu_ms_per_1000(self) -> float:
        return 1000 * self.server_cpu / max(self.certs, 1) * 1000


@dataclass
class Line:
    name: str
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)


def _round_ratio(a: Line, b: Line) -> float:
    return statistics.median(x.rate / y.rate for x, y in zip(a.samples, b.samples, strict=True))


async def _timed(
    seconds: float, server_pid: int, workers: list[Callable[[float], Awaitable[tuple[int, int]]]]
) -> Sample:
    """Run every worker until the deadline; each returns (certificates, errors)."""
    cpu0, client0, t0 = _proc_cpu_seconds(server_pid), time.process_time(), time.perf_counter()
    deadline = t0 + seconds
    done = await asyncio.gather(*(w(deadline) for w in workers))
    elapsed = time.perf_counter() - t0
    server_cpu = _proc_cpu_seconds(server_pid) - cpu0
    return Sample(
        sum(c for c, _ in done), elapsed, server_cpu, time.process_time() - client0, sum(e for _, e in done)
    )


# ----------------------------------------------------------------------------- meshid server (child)
async def serve_meshid(data_dir: Path, agents: int, entries: int) -> None:
    """Child process: `meshid dev` stack plus `agents` join tokens, each with `entries` entries."""
    from attestors.node.join_token import new_token
    from meshid.cli.dev import start_dev
    from meshid.entry import Entry
    from meshid.selector import Selector
    from meshid.spiffe_id import SpiffeId, TrustDomain

    logging.basicConfig(level=logging.WARNING)
    huge = 10_000_000
    overrides = {
        "log_level": "warning",
        # Admission is not what is measured here: limits far above what this box can sign.
        "admission": {
            "agent_rate": huge,
            "agent_burst": huge,
            "global_rate": huge,
            "global_burst": huge,
            "max_queue": 4096,
        },
    }
    stack = await start_dev(
        data_dir, TD, str(data_dir / "api.sock"), svid_ttl=SVID_TTL, server_overrides=overrides
    )
    try:
        server = stack.server
        assert server.ds is not None
        td = TrustDomain.parse(TD)
        fleet = []
        for a in range(agents):
            tok = new_token(3600)
            await server.ds.create_join_token(tok.token_hash, tok.token_id, tok.expires_at)
            agent_id = SpiffeId(td, f"/meshid/agent/join_token/{tok.token_id}")
            ids = []
            for w in range(entries):
                e = await server.entries.create(
                    Entry("", SpiffeId(td, f"/bench/a{a}/w{w}"), agent_id, (Selector("unix", f"uid:{w}"),))
                )
                ids.append(e.id)
            fleet.append({"token": tok.token, "entries": ids})
        bundle = data_dir / "bench_bundle.pem"
        bundle.write_bytes(server.ca.bundle.x509_pem())
        print(json.dumps({"port": server.agent_api_port, "bundle": str(bundle), "fleet": fleet}), flush=True)
        # Serve until the parent closes our stdin.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await stack.stop()


# ----------------------------------------------------------------------------- meshid load (parent)
async def _attest_fleet(info: dict[str, Any], state: Path) -> list[Any]:
    """One agent identity per join token, made by the agent's own NodeIdentity code."""
    import random

    from cryptography import x509

    from meshid.spiffe_id import SpiffeId
    from workload_api.config import agent_config_from_dict
    from workload_api.node_identity import NodeIdentity
    from workload_api.rotation import RotationPolicy
    from workload_api.server_client import ServerClient

    with open(info["bundle"], "rb") as fh:  # noqa: ASYNC230 - a small file, once, before any timing
        roots = x509.load_pem_x509_certificates(fh.read())
    clients = []
    for i, member in enumerate(info["fleet"]):
        cfg = agent_config_from_dict(
            {
                "trust_domain": TD,
                "data_dir": str(state / f"agent{i}"),
                "server_address": [f"127.0.0.1:{info['port']}"],
                "trust_bundle_path": info["bundle"],
                "socket_path": str(state / f"agent{i}.sock"),
                "node_attestor": {"join_token": {"token": member["token"]}},
            },
            "bench",
        )
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        client = ServerClient(cfg.server_address, SpiffeId.parse(f"spiffe://{TD}/meshid/server"))
        client.set_roots(roots)
        node = NodeIdentity(
            cfg, client, RotationPolicy(cfg.rotation.window_start, cfg.rotation.window_end), random.Random(i)
        )
        await node.attest()
        clients.append(client)
    return clients


def _requests(entries: list[str], csrs_b64: list[str], start: int, n: int) -> list[dict[str, Any]]:
    # The agent's request shape (workload_api.manager.SvidManager._sign_batch).
    return [
        {
            "entry_id": entries[(start + k) % len(entries)],
            "csr": csrs_b64[(start + k) % len(csrs_b64)],
            "rotation_reason": "initial",
            "scheduled_rotation_at": None,
        }
        for k in range(n)
    ]


def meshid_batch_workers(
    clients: list[Any], fleet: list[dict[str, Any]], csrs_b64: list[str], batch: int
) -> list[Callable[[float], Awaitable[tuple[int, int]]]]:
    """One worker per agent, sending batch after batch like SvidManager does (one in flight)."""

    def worker(client: Any, entries: list[str], offset: int) -> Callable[[float], Awaitable[tuple[int, int]]]:
        async def run(deadline: float) -> tuple[int, int]:
            ok = bad = 0
            i = offset
            while time.perf_counter() < deadline:
                results = await client.sign_x509(_requests(entries, csrs_b64, i, batch))
                i += batch
                n = sum(1 for r in results if "svid" in r)
                ok, bad = ok + n, bad + len(results) - n
            return ok, bad

        return run

    return [worker(c, m["entries"], 997 * k) for k, (c, m) in enumerate(zip(clients, fleet, strict=True))]


def meshid_single_workers(
    clients: list[Any], fleet: list[dict[str, Any]], csrs_b64: list[str], concurrency: int
) -> list[Callable[[float], Awaitable[tuple[int, int]]]]:
    """`concurrency` callers, one CSR per sign_x509 call, spread over the agents' connections."""

    def worker(k: int) -> Callable[[float], Awaitable[tuple[int, int]]]:
        client, entries = clients[k % len(clients)], fleet[k % len(clients)]["entries"]

        async def run(deadline: float) -> tuple[int, int]:
            ok = bad = 0
            i = k * 131
            while time.perf_counter() < deadline:
                results = await client.sign_x509(_requests(entries, csrs_b64, i, 1))
                i += 1
                if results and "svid" in results[0]:
                    ok += 1
                else:
                    bad += 1
            return ok, bad

        return run

    return [worker(k) for k in range(concurrency)]


# ----------------------------------------------------------------------------- cfssl
def ensure_cfssl() -> str:
    found = shutil.which("cfssl")
    if found:
        return found
    if os.geteuid() != 0:
        sys.exit("cfssl is not installed and this is not root: apt-get install golang-cfssl")
    print("installing golang-cfssl with apt-get ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "golang-cfssl"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    found = shutil.which("cfssl")
    if not found:
        sys.exit("golang-cfssl installed but no cfssl on PATH")
    return found


def cfssl_ca(directory: Path) -> tuple[Path, Path, Path]:
    """An ECDSA P-256 CA for cfssl (made with cryptography) and a signing profile like
    meshid's leaves: 1 h, digitalSignature, serverAuth + clientAuth."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    ca, ca_key, config = directory / "ca.pem", directory / "ca-key.pem", directory / "config.json"
    ca.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    ca_key.chmod(0o600)
    config.write_text(
        json.dumps(
            {
                "signing": {
                    "default": {"expiry": "1h", "usages": ["digital signature", "server auth", "client auth"]}
                }
            }
        )
    )
    return ca, ca_key, config


async def start_cfssl(binary: str, directory: Path) -> tuple[asyncio.subprocess.Process, str]:
    import aiohttp

    ca, ca_key, config = cfssl_ca(directory)
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        binary,
        "serve",
        "-address",
        "127.0.0.1",
        "-port",
        str(port),
        "-ca",
        str(ca),
        "-ca-key",
        str(ca_key),
        "-config",
        str(config),
        "-loglevel",
        "2",  # warnings only: no log line per request
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api/v1/cfssl/sign"
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            try:
                async with s.get(f"http://127.0.0.1:{port}/api/v1/cfssl/health") as r:
                    await r.read()
                    break
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
        else:
            raise RuntimeError("cfssl serve did not come up")
    return proc, url


def cfssl_workers(
    session: Any, url: str, bodies: list[bytes], concurrency: int
) -> list[Callable[[float], Awaitable[tuple[int, int]]]]:
    headers = {"Content-Type": "application/json"}

    def worker(k: int) -> Callable[[float], Awaitable[tuple[int, int]]]:
        async def run(deadline: float) -> tuple[int, int]:
            ok = bad = 0
            i = k * 131
            while time.perf_counter() < deadline:
                async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as r:
                    doc = await r.json(content_type=None)
                i += 1
                if r.status == 200 and doc.get("success") and doc["result"].get("certificate"):
                    ok += 1
                else:
                    bad += 1
            return ok, bad

        return run

    return [worker(k) for k in range(concurrency)]


# ----------------------------------------------------------------------------- controller
async def controller(args: argparse.Namespace) -> None:
    import aiohttp

    cfssl_bin = ensure_cfssl()
    t = time.perf_counter()
    csrs = _make_csrs(args.csrs)
    csrs_b64 = [base64.b64encode(der).decode() for der, _ in csrs]
    cfssl_bodies = [json.dumps({"certificate_request": pem.decode()}).encode() for _, pem in csrs]
    print(f"prepared {len(csrs)} ECDSA P-256 CSRs in {time.perf_counter() - t:.1f}s (untimed)")

    with tempfile.TemporaryDirectory(prefix="mib", dir="/tmp") as tmp:
        work = Path(tmp)
        server = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--serve-meshid",
            str(work / "meshid"),
            "--agents",
            str(args.agents),
            "--entries",
            str(args.batch),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=64 * 1024 * 1024,  # the ready line carries every entry id
        )
        cfssl: asyncio.subprocess.Process | None = None
        clients: list[Any] = []
        try:
            assert server.stdout is not None
            line = await asyncio.wait_for(server.stdout.readline(), timeout=300)
            if not line:
                raise RuntimeError("meshid server process exited before it was ready")
            info = json.loads(line)
            clients = await _attest_fleet(info, work / "agents")
            cfssl, url = await start_cfssl(cfssl_bin, work)
            fleet = info["fleet"]
            lines = {
                "meshid": Line(f"meshid agent API, {args.agents} agents x batches of {args.batch}"),
                "batch1": Line(f"meshid agent API, batch size 1, {args.concurrency} concurrent callers"),
                "cfssl": Line(f"cfssl serve /api/v1/cfssl/sign, {args.concurrency} concurrent clients"),
            }
            connector = aiohttp.TCPConnector(limit=args.concurrency)
            async with aiohttp.ClientSession(connector=connector) as session:
                cases: dict[str, tuple[int, Callable[[], list[Any]]]] = {
                    "meshid": (
                        server.pid,
                        lambda: meshid_batch_workers(clients, fleet, csrs_b64, args.batch),
                    ),
                    "batch1": (
                        server.pid,
                        lambda: meshid_single_workers(clients, fleet, csrs_b64, args.concurrency),
                    ),
                    "cfssl": (cfssl.pid, lambda: cfssl_workers(session, url, cfssl_bodies, args.concurrency)),
                }
                for pid, make in cases.values():  # warm-up: connections, caches
                    await _timed(min(1.0, args.seconds), pid, make())
                for rnd in range(args.rounds):
                    for name, (pid, make) in cases.items():
                        s = await _timed(args.seconds, pid, make())
                        lines[name].samples.append(s)
                        print(
                            f"  round {rnd + 1} {name:7s} {s.rate:9.0f} certs/s  ({s.certs} in "
                            f"{s.seconds:.1f}s, errors {s.errors}, server cpu {s.server_cpu:.1f}s, "
                            f"client cpu {s.client_cpu:.1f}s)"
                        )
            print()
            print(f"{'line':72s} {'certs/s':>9s} {'server CPU ms/1000':>19s}")
            for ln in lines.values():
                print(f"{ln.name:72s} {ln.median('rate'):9.0f} {ln.median('cpu_ms_per_1000'):19.0f}")
            errors = sum(s.errors for ln in lines.values() for s in ln.samples)
            load = " ".join(f"{x:.1f}" for x in os.getloadavg())
            print(
                f"errors: {errors}; cores: {os.cpu_count()}; load average {load}; "
                "the load generator shares the box with both servers"
            )
            # Ratios within each round (its cases run seconds apart, under the same machine load),
            # then the median over rounds.
            print(
                f"ratio meshid/cfssl={_round_ratio(lines['meshid'], lines['cfssl']):.2f} "
                f"batch1_ratio={_round_ratio(lines['batch1'], lines['cfssl']):.2f}"
            )
        finally:
            for c in clients:
                await c.close()
            if cfssl is not None and cfssl.returncode is None:
                cfssl.terminate()
                await cfssl.wait()
            if server.stdin is not None:
                server.stdin.close()
            try:
                await asyncio.wait_for(server.wait(), timeout=30)
            except TimeoutError:
                server.kill()
                await server.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per case and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (cases alternate within a round)")
    ap.add_argument("--agents", type=int, default=4, help="meshid agents (each one batch in flight)")
    ap.add_argument("--batch", type=int, default=MESHID_BATCH, help="CSRs per meshid sign call (max 500)")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent single-CSR callers")
    ap.add_argument("--csrs", type=int, default=4000, help="distinct pre-made CSRs, cycled")
    ap.add_argument("--serve-meshid", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--entries", type=int, default=MESHID_BATCH, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_meshid:
        asyncio.run(serve_meshid(Path(args.serve_meshid), args.agents, args.entries))
        return
    if not 1 <= args.batch <= MESHID_BATCH:
        ap.error(f"--batch must be 1..{MESHID_BATCH}")
    asyncio.run(controller(args))


if __name__ == "__main__":
    main()
