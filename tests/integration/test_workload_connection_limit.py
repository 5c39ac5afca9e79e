"""One local user cannot take every file descriptor of the agent: Workload API connections
are capped per caller uid (`max_connections_per_uid`), the connections above the cap are
closed at once, and everyone else is still served."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from meshid.cli.dev import start_dev

pytestmark = pytest.mark.integration

NOBODY = 65534
CAP = 5

# Runs as NOBODY: opens CAP + 3 connections and holds them; per connection, whether the
# agent's HTTP/2 SETTINGS arrived ("open") or the agent closed it ("closed"). Then waits for
# a line on stdin, closes them all, and reports whether a new connection is served again.
HOLDER = """
import json, os, socket, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
path, n = sys.argv[1], int(sys.argv[2])

def probe():
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    try:
        data = s.recv(64)
    except socket.timeout:
        data = None
    return s, ("open" if data else "closed")

held = [probe() for _ in range(n)]
print(json.dumps([state for _, state in held]), flush=True)
sys.stdin.readline()
for s, _ in held:
    s.close()
import time; time.sleep(0.3)
s, state = probe()
print(json.dumps(state), flush=True)
"""


async def test_connections_above_the_per_uid_cap_are_closed(short_tmp: Path) -> None:
    stack = await start_dev(short_tmp / "d", "example.org", str(short_tmp / "s" / "api.sock"),
                            agent_overrides={"max_connections_per_uid": CAP})
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOLDER, stack.socket_path, str(CAP + 3),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stdout is not None and proc.stdin is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line, (await proc.stderr.read()).decode() if proc.stderr else ""
            states = json.loads(line)
            assert states == ["open"] * CAP + ["closed"] * 3, states
            # Another uid (this test, root) is served while nobody holds its cap.
            from spiffe import WorkloadApiClient

            client = WorkloadApiClient(socket_path=f"unix://{stack.socket_path}")
            try:
                svid = await asyncio.to_thread(client.fetch_x509_svid)
            finally:
                client.close()
            assert str(svid.spiffe_id) == str(stack.spiffe_id)
            # Closed connections give their places back.
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            again = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
            assert again == "open"
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    finally:
        await stack.stop()


async def test_streams_above_the_per_uid_cap_are_resource_exhausted(short_tmp: Path) -> None:
    """Each open stream costs the agent ~17 KB, and one connection may carry 100: the
    connection cap alone let one uid hold 200,000 streams (3.4 GB). Streams are capped per
    uid as well, across its connections, with a clear status; a closed one frees its place."""
    from grpclib.client import Channel
    from grpclib.const import Status
    from grpclib.exceptions import GRPCError

    from workload_api._gen import workload_grpc, workload_pb2

    stack = await start_dev(short_tmp / "d", "example.org", str(short_tmp / "s" / "api.sock"),
                            agent_overrides={"max_streams_per_uid": 3})
    channels = [Channel(path=stack.socket_path) for _ in range(2)]
    opened: list[Any] = []

    async def open_stream(ch: Channel) -> Any:
        cm = workload_grpc.SpiffeWorkloadAPIStub(ch).FetchX509SVID.open(
            metadata={"workload.spiffe.io": "true"}, timeout=20)
        st = await cm.__aenter__()
        opened.append(cm)
        await st.send_message(workload_pb2.X509SVIDRequest(), end=True)
        return st, await st.recv_message()

    try:
        streams = [await open_stream(channels[i % 2]) for i in range(3)]
        assert all(msg is not None and msg.svids for _, msg in streams)
        with pytest.raises(GRPCError) as err:
            await open_stream(channels[1])
        assert err.value.status is Status.RESOURCE_EXHAUSTED
        assert "max_streams_per_uid" in (err.value.message or "")
        await streams[0][0].cancel()
        for _ in range(100):  # the agent sees the cancellation
            try:
                _, msg = await open_stream(channels[0])
                break
            except GRPCError:
                await asyncio.sleep(0.05)
        assert msg is not None and msg.svids
    finally:
        for ch in channels:
            ch.close()
        await stack.stop()


async def test_new_jwt_svids_are_rate_limited_per_uid(short_tmp: Path) -> None:
    """Every JWT-SVID for a new audience is a signing by the server, charged to this agent's
    signing budget there (the budget that also renews every other workload's X509-SVIDs on
    the node). One local user asking for endless new audiences is held to its own rate;
    cached JWT-SVIDs are still served."""
    from grpclib.client import Channel
    from grpclib.const import Status
    from grpclib.exceptions import GRPCError

    from workload_api._gen import workload_grpc, workload_pb2

    stack = await start_dev(short_tmp / "d", "example.org", str(short_tmp / "s" / "api.sock"),
                            agent_overrides={"jwt_svid_mint_rate_per_uid": 0.001,
                                             "jwt_svid_mint_burst_per_uid": 3})
    ch = Channel(path=stack.socket_path)
    stub = workload_grpc.SpiffeWorkloadAPIStub(ch)
    header = {"workload.spiffe.io": "true"}

    async def fetch(audience: str) -> str:
        resp = await stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=[audience]), metadata=header,
                                       timeout=20)
        return str(resp.svids[0].svid)

    try:
        tokens = [await fetch(f"aud-{i}") for i in range(3)]
        with pytest.raises(GRPCError) as err:
            await fetch("aud-3")
        assert err.value.status is Status.RESOURCE_EXHAUSTED
        assert "jwt_svid_mint_rate_per_uid" in (err.value.message or "")
        assert await fetch("aud-0") == tokens[0]  # cached: no signing, not limited
    finally:
        ch.close()
        await stack.stop()
