"""Server outage longer than a rotation window: workloads keep their SVIDs (served from the
agent cache), the agent retries with backoff (no tight loop), and catches up when the
server returns on the same address. Also `meshid dev` as a new user runs it: a real
subprocess, a working socket, and a clean SIGINT shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from grpclib.client import Channel
from waiting import wait_for

from issuer.server import Server
from meshid.backoff import Backoff
from meshid.cli.dev import DevStack, start_dev
from meshid.der import load_der_certificates
from meshid.entry import Entry
from meshid.errors import PermissionDeniedError
from meshid.selector import Selector
from meshid.spiffe_id import SpiffeId
from workload_api._gen import workload_grpc, workload_pb2
from workload_api.agent import Agent
from workload_api.rotation import RenewalSchedule
from workload_api.server_client import ServerClient, ServerUnavailableError

pytestmark = pytest.mark.integration
HEADER = {"workload.spiffe.io": "true"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def fetch_leaf(sock: str) -> tuple[int, float]:
    ch = Channel(path=sock)
    try:
        async with workload_grpc.SpiffeWorkloadAPIStub(ch).FetchX509SVID.open(
            metadata=HEADER, timeout=10
        ) as st:
            await st.send_message(workload_pb2.X509SVIDRequest(), end=True)
            msg = await st.recv_message()
            await st.cancel()
    finally:
        ch.close()
    assert msg is not None and msg.svids
    leaf = load_der_certificates(msg.svids[0].x509_svid)[0]
    return leaf.serial_number, leaf.not_valid_after_utc.timestamp()


@pytest.mark.slow
async def test_agent_survives_server_outage_and_catches_up(short_tmp: Path) -> None:
    port = free_port()
    ttl = 20  # renewal window [10 s, 16 s] of lifetime; the outage below is longer than that
    stack = await start_dev(
        short_tmp / "d",
        "example.org",
        str(short_tmp / "s" / "api.sock"),
        svid_ttl=ttl,
        server_overrides={"server": {"agent_api_port": port}},
    )
    server_cfg = stack.server.config
    try:
        stack.agent.manager.backoff = Backoff(base=0.5, cap=4.0)  # bound the test's wait, same algorithm
        serial, not_after = await fetch_leaf(stack.socket_path)
        await stack.server.stop()
        outage_start = time.monotonic()
        attempts_before = stack.agent.manager.consecutive_failures
        # Outage longer than one rotation window; workloads keep getting the cached SVID.
        while time.monotonic() - outage_start < 14:
            got_serial, got_not_after = await fetch_leaf(stack.socket_path)
            assert got_not_after > time.time(), "the workload was left with an expired SVID"
            await asyncio.sleep(1)
        failures = stack.agent.manager.consecutive_failures - attempts_before
        assert 1 <= failures <= 14, f"{failures} failed attempts in 14 s: not backing off"
        # Server comes back on the same address with the same datastore and CA keys.
        stack.server = Server(server_cfg)
        await stack.server.start()
        deadline = time.monotonic() + 30
        while True:
            new_serial, new_not_after = await fetch_leaf(stack.socket_path)
            if new_serial != serial and new_not_after > not_after:
                break
            assert time.monotonic() < deadline, "agent did not catch up after the server returned"
            await asyncio.sleep(0.5)
        assert stack.agent.manager.consecutive_failures == 0
    finally:
        await stack.stop()


async def test_agent_keeps_its_svid_when_a_renewal_answer_is_lost(
    dev_stack: DevStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server signs and records a renewal, and the answer never reaches the agent (a
    timeout, a reset, the agent killed). The agent, and the agent restarted from its state
    directory, go on with the SVID they hold: the server still accepts it (it refused it as
    superseded, and a join-token agent could never attest again). The next renewal that
    does arrive is used, and from then on the old SVID is refused."""
    stack = dev_stack
    assert stack.server.ds is not None
    node = stack.agent.node
    held, held_key, agent_id = node.chain, node.key, node.agent_id
    assert agent_id is not None and held_key is not None
    real_renew = node.client.renew

    async def answer_lost(csr: bytes) -> list[Any]:
        await real_renew(csr)  # signed and recorded by the server...
        raise ServerUnavailableError("renewal answer lost")  # ...and never received

    monkeypatch.setattr(node.client, "renew", answer_lost)
    with pytest.raises(ServerUnavailableError):
        await node.renew()
    assert node.chain is held
    await node.client.sync({}, -1)  # still accepted

    # Restarted: the SVID comes back from disk and is accepted (a re-attestation would
    # fail: the join token is spent).
    config = stack.agent.config
    await stack.agent.stop()
    stack.agent = Agent(config)
    await stack.agent.start()
    node = stack.agent.node
    assert node.chain == held and node.agent_id == agent_id
    await node.client.sync({}, -1)

    await node.renew()
    assert node.chain != held
    await node.client.sync({}, -1)  # presents the new SVID: now the current one
    record = await stack.server.ds.get_agent(agent_id)
    assert record is not None
    assert (record.serial, record.new_serial) == (f"{node.chain[0].serial_number:x}", "")
    stale = ServerClient(config.server_address, SpiffeId(stack.agent.td, "/meshid/server"))
    try:
        stale.set_roots(list(stack.server.ca.bundle.x509_authorities))
        stale.set_identity(held, held_key)
        with pytest.raises(PermissionDeniedError, match="superseded"):
            await stale.sync({}, -1)
    finally:
        await stale.close()


async def test_an_entry_recreated_under_its_id_while_the_agent_was_away_is_resynced(
    dev_stack: DevStack,
) -> None:
    """Deleted and re-created with the same id between two syncs (the agent cut off, or
    just slow), an entry is at revision 0 again, the revision the agent holds: compared by
    revision alone the server never sent it, and the agent kept the old entry's selectors
    for good, handing the new entry's SVIDs to the workloads the old one matched. As SPIRE
    (entryIsStale): the creation time is compared too."""
    stack = dev_stack
    agent_id = stack.agent.node.agent_id
    assert agent_id is not None
    manager = stack.agent.manager
    manager.sync_interval = 3600  # no sync of its own between the two below
    db = SpiffeId(stack.server.td, "/db")
    old = Entry("fixed-id", db, agent_id, (Selector("unix", "uid:4242"),))
    await stack.server.entries.create(old)
    manager.poke()
    await wait_for(lambda: "fixed-id" in stack.agent.cache.svids, 20, "the agent to sign the entry")
    signed_for_old = stack.agent.cache.svids["fixed-id"]

    await stack.server.entries.delete("fixed-id")
    await asyncio.sleep(1.1)  # created_at is in whole seconds
    new = await stack.server.entries.create(
        Entry("fixed-id", db, agent_id, (Selector("unix", "uid:4343"),)))
    assert new.revision_number == stack.agent.cache.entries["fixed-id"].revision_number
    synced = manager.last_sync_ok
    manager.poke()
    await wait_for(lambda: manager.last_sync_ok > synced, 20, "the agent to sync again")
    assert stack.agent.cache.entries["fixed-id"].selectors == new.selectors
    # ...and its SVID is signed afresh for the new entry, not left to its renewal time.
    await wait_for(lambda: stack.agent.cache.svids["fixed-id"] is not signed_for_old, 20,
                   "the agent to re-sign the re-created entry")


async def test_an_agent_svid_that_cannot_be_saved_does_not_stop_the_sync(dev_stack: DevStack) -> None:
    """The renewed agent SVID is saved before use; when that fails (here a directory where
    its temporary file goes, as a full disk would) the agent goes on with the SVID it holds,
    and its round goes on too: the renewal failure ended every round before the sync, so no
    workload SVID was renewed until they all expired."""
    stack = dev_stack
    manager, node = stack.agent.manager, stack.agent.node
    manager.sync_interval = 3600  # its own loop stays asleep: the rounds below are ours
    held = node.chain
    (node.dir / "agent_svid.key.tmp").mkdir()
    node.schedule = RenewalSchedule(time.time(), "uniform")
    synced = manager.last_sync_ok
    await manager.step()
    assert node.chain is held and manager.last_sync_ok > synced
    assert manager.next_due() > time.time()  # the renewal is held, not retried every 50 ms
    (node.dir / "agent_svid.key.tmp").rmdir()
    manager._node_hold = 0.0  # its backoff over
    await manager.step()
    assert node.chain != held


async def test_meshid_dev_command_serves_and_stops_on_sigint(short_tmp: Path) -> None:
    sock = short_tmp / "s" / "api.sock"
    env = {**os.environ, "XDG_DATA_HOME": str(short_tmp / "xdg")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "meshid.cli.main",
        "dev",
        "--socket",
        str(sock),
        "--svid-ttl",
        "10m",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = ""
        deadline = time.monotonic() + 60
        while not line.startswith("SPIFFE_ENDPOINT_SOCKET="):
            assert time.monotonic() < deadline, "meshid dev did not print its socket"
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().strip()
            assert line or proc.returncode is None
        assert line == f"SPIFFE_ENDPOINT_SOCKET=unix://{sock}"
        fetch = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meshid.cli.main",
            "fetch",
            "x509",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**env, "SPIFFE_ENDPOINT_SOCKET": f"unix://{sock}"},
        )
        out, err = await asyncio.wait_for(fetch.communicate(), 30)
        assert fetch.returncode == 0, err.decode()
        assert "SPIFFE ID:  spiffe://example.org/user/" in out.decode()
        assert (short_tmp / "xdg" / "meshid" / "dev" / "upstream" / "root.pem").exists()
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert not sock.exists(), "socket left behind after shutdown"
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        assert "agent ready" in log and "agent stopped" in log
        assert "listening: agent_api 127.0.0.1:" in log and "admin unix://" in log
        assert "meshid server for example.org stopped" in log
        # A workload closing its stream is routine: no line per close, no traceback.
        assert "Request was cancelled" not in log and "Traceback" not in log, log
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
