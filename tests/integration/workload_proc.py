"""A workload process for tests: imports everything as root, then drops to the given uid
(the venv's interpreter lives under /root, which other uids cannot read), then acts as
a real SPIFFE client. Prints one JSON line with the outcome.

usage: workload_proc.py UID SOCKET MODE [ARGS...]
  fetch                      py-spiffe fetch_x509_svid → {"spiffe_id", "serial", "not_after"}
  status                     grpclib FetchX509SVID → {"status": grpc status name}
  bundles                    FetchX509Bundles and FetchJWTBundles → {"x509": [trust domain IDs] or
                             grpc status name, "jwt": likewise}
  validate AUDIENCE TOKEN    ValidateJWTSVID → {"spiffe_id"} or {"status", "message"}
  echo-server PORT PEER_ID   spiffe-tls mTLS echo server accepting only PEER_ID (one connection)
  echo-client PORT PEER_ID   spiffe-tls client: send "ping", print the echo
  admin PATH                 try to connect to a Unix socket → {"error": errno name} or {"ok": true}
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import sys

import grpclib.client
from grpclib.exceptions import GRPCError
from OpenSSL import SSL
from spiffe import SpiffeId, WorkloadApiClient, X509Source
from spiffetls import ListenOptions, dial, listen
from spiffetls.tlsconfig.authorize import authorize_id

from workload_api._gen import workload_grpc, workload_pb2


def drop(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


async def grpc_status(sock: str) -> str:
    ch = grpclib.client.Channel(path=sock)
    try:
        stub = workload_grpc.SpiffeWorkloadAPIStub(ch)
        async with stub.FetchX509SVID.open(metadata={"workload.spiffe.io": "true"}, timeout=10) as st:
            await st.send_message(workload_pb2.X509SVIDRequest(), end=True)
            await st.recv_message()
            await st.cancel()
        return "OK"
    except GRPCError as exc:
        return exc.status.name
    finally:
        ch.close()


async def bundle_tds(sock: str, method: str) -> list[str] | str:
    """The trust domains of the first message of a bundle stream, or the error status."""
    request = (
        workload_pb2.X509BundlesRequest()
        if method == "FetchX509Bundles"
        else workload_pb2.JWTBundlesRequest()
    )
    ch = grpclib.client.Channel(path=sock)
    try:
        stub = workload_grpc.SpiffeWorkloadAPIStub(ch)
        async with getattr(stub, method).open(metadata={"workload.spiffe.io": "true"}, timeout=10) as st:
            await st.send_message(request, end=True)
            msg = await st.recv_message()
            await st.cancel()
        return sorted(msg.bundles) if msg is not None else "NO_MESSAGE"
    except GRPCError as exc:
        return exc.status.name
    finally:
        ch.close()


async def validate(sock: str, audience: str, token: str) -> dict[str, object]:
    ch = grpclib.client.Channel(path=sock)
    try:
        resp = await workload_grpc.SpiffeWorkloadAPIStub(ch).ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=token),
            metadata={"workload.spiffe.io": "true"},
            timeout=10,
        )
        return {"spiffe_id": resp.spiffe_id}
    except GRPCError as exc:
        return {"status": exc.status.name, "message": exc.message}
    finally:
        ch.close()


def main() -> None:
    uid, sock, mode, *args = sys.argv[1:]
    drop(int(uid))
    out: dict[str, object] = {"uid": os.getuid()}
    if mode == "fetch":
        client = WorkloadApiClient(socket_path=f"unix://{sock}")
        svid = client.fetch_x509_svid()
        out.update(
            spiffe_id=str(svid.spiffe_id),
            serial=svid.leaf.serial_number,
            not_after=svid.leaf.not_valid_after_utc.timestamp(),
        )
        client.close()
    elif mode == "status":
        out["status"] = asyncio.run(grpc_status(sock))
    elif mode == "bundles":
        out["x509"] = asyncio.run(bundle_tds(sock, "FetchX509Bundles"))
        out["jwt"] = asyncio.run(bundle_tds(sock, "FetchJWTBundles"))
    elif mode == "validate":
        out.update(asyncio.run(validate(sock, args[0], args[1])))
    elif mode in ("echo-server", "echo-client"):
        port, peer = int(args[0]), SpiffeId(args[1])
        source = X509Source(socket_path=f"unix://{sock}", timeout_in_seconds=20)
        try:
            if mode == "echo-server":
                server = listen(f"127.0.0.1:{port}", source, ListenOptions(authorize_fn=authorize_id(peer)))
                print(json.dumps({"listening": port}), flush=True)
                conn, _ = server.accept()
                try:
                    conn.do_handshake()
                    data = conn.recv(1024)
                    conn.sendall(b"echo:" + data)
                    out["served"] = data.decode()
                except SSL.Error as exc:
                    out["refused"] = str(exc)
                finally:
                    conn.close()
                server.close()
            else:
                try:
                    conn = dial(f"127.0.0.1:{port}", source, authorize_fn=authorize_id(peer))
                    conn.sendall(b"ping")
                    out["reply"] = conn.recv(1024).decode()
                    conn.close()
                except Exception as exc:  # the refusal is what some tests expect
                    out["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            source.close()
    elif mode == "admin":
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(args[0])
            out["ok"] = True
        except OSError as exc:
            out["error"] = errno.errorcode.get(exc.errno or 0, str(exc))
        finally:
            s.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
