"""`meshid fetch x509|jwt|bundles` and `meshid validate jwt`: a Workload API client."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import h2.exceptions
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from meshid.der import load_der_certificates
from meshid.durable_files import replace_together
from meshid.errors import ConfigError, MeshidError
from workload_api._gen import workload_grpc, workload_pb2

HEADER = {"workload.spiffe.io": "true"}
TIMEOUT = 30.0


def socket_from(arg: str | None) -> str:
    value = arg or os.environ.get("SPIFFE_ENDPOINT_SOCKET", "")
    if not value:
        raise ConfigError("no Workload API socket: pass --socket or set SPIFFE_ENDPOINT_SOCKET")
    # Named after where the value came from: a bad --socket was reported as SPIFFE_ENDPOINT_SOCKET.
    source = "--socket" if arg else "SPIFFE_ENDPOINT_SOCKET"
    if value.startswith("unix:"):
        u = urlparse(value)
        if u.netloc or u.query or u.fragment or not u.path.startswith("/"):
            raise ConfigError(f"invalid {source} {value!r}: expected unix:///absolute/path")
        return u.path
    if value.startswith("/"):
        return value
    if value.startswith("tcp:"):
        raise ConfigError(
            f"{source} {value!r}: a meshid agent serves the Workload API on a Unix socket only; "
            "expected unix:///absolute/path"
        )
    raise ConfigError(f"invalid {source} {value!r}: expected unix:///absolute/path")


def _der_certs(data: bytes) -> list[x509.Certificate]:
    return load_der_certificates(data)


def _pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


@contextlib.contextmanager
def _talking_to(path: str) -> Iterator[None]:
    """A failure to reach the agent at `path`, or a connection it closed, as one line naming
    the socket. They escaped as a bare "[Errno 2] No such file or directory" that named no
    path, or as a traceback: StreamTerminatedError, or grpclib's own AttributeError when the
    agent closes a connection at once (what it does above max_connections_per_uid)."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, TimeoutError) and exc.errno is None:
            raise  # grpclib's deadline: "Deadline exceeded" says it
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise MeshidError(
            f"cannot connect to the Workload API at {path}: {reason} (is the agent running?)"
        ) from None
    except (StreamTerminatedError, ProtocolError, h2.exceptions.H2Error, AttributeError) as exc:
        raise MeshidError(
            f"the Workload API at {path} closed the connection ({exc or type(exc).__name__})"
        ) from None


async def fetch(args: argparse.Namespace) -> int:
    path = socket_from(args.socket)
    channel = Channel(path=path)
    stub = workload_grpc.SpiffeWorkloadAPIStub(channel)
    try:
        if args.fetch_op == "x509":
            with _talking_to(path):
                async with stub.FetchX509SVID.open(metadata=HEADER, timeout=TIMEOUT) as stream:
                    await stream.send_message(workload_pb2.X509SVIDRequest(), end=True)
                    resp = await stream.recv_message()
                    await stream.cancel()
            if resp is None or not resp.svids:
                raise MeshidError("Workload API returned no SVIDs")
            for s in resp.svids:
                chain = _der_certs(s.x509_svid)
                print(f"SPIFFE ID:  {s.spiffe_id}")
                print(f"expires:    {chain[0].not_valid_after_utc.isoformat()}")
                print(f"chain:      {len(chain)} certificates; bundle: {len(_der_certs(s.bundle))} roots")
            if args.write:
                out = Path(args.write)
                out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - CLI output
                s = resp.svids[0]
                key = serialization.load_der_private_key(s.x509_svid_key, None)
                key_pem = key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                # Replaced whole, each with its mode: written in place, an existing 0644
                # svid.key kept its mode (the new key world-readable) and a symlink at a
                # name was followed.
                replace_together(
                    [
                        (out / "svid.key", key_pem, 0o600),
                        (out / "svid.pem", _pem(_der_certs(s.x509_svid)), 0o644),
                        (out / "bundle.pem", _pem(_der_certs(s.bundle)), 0o644),
                    ]
                )
                print(f"wrote {out}/svid.pem, svid.key, bundle.pem")
        elif args.fetch_op == "jwt":
            req = workload_pb2.JWTSVIDRequest(audience=args.audience, spiffe_id=args.spiffe_id or "")
            with _talking_to(path):
                jresp = await stub.FetchJWTSVID(req, metadata=HEADER, timeout=TIMEOUT)
            for j in jresp.svids:
                print(f"SPIFFE ID:  {j.spiffe_id}")
                print(f"token:      {j.svid}")
        else:
            with _talking_to(path):
                async with stub.FetchX509Bundles.open(metadata=HEADER, timeout=TIMEOUT) as stream:
                    await stream.send_message(workload_pb2.X509BundlesRequest(), end=True)
                    bresp = await stream.recv_message()
                    await stream.cancel()
            assert bresp is not None
            for td, der in sorted(bresp.bundles.items()):
                print(f"# {td}")
                print(_pem(_der_certs(der)).decode(), end="")
    except GRPCError as exc:
        raise MeshidError(f"Workload API error {exc.status.name}: {exc.message}") from None
    finally:
        channel.close()
    return 0


async def validate(args: argparse.Namespace) -> int:
    path = socket_from(args.socket)
    channel = Channel(path=path)
    stub = workload_grpc.SpiffeWorkloadAPIStub(channel)
    try:
        with _talking_to(path):
            resp = await stub.ValidateJWTSVID(
                workload_pb2.ValidateJWTSVIDRequest(audience=args.audience, svid=args.token),
                metadata=HEADER,
                timeout=TIMEOUT,
            )
    except GRPCError as exc:
        # The agent refuses a token with INVALID_ARGUMENT; anything else (too many streams,
        # no caller credentials) says nothing about the token.
        if exc.status is Status.INVALID_ARGUMENT:
            raise MeshidError(f"token is not valid: {exc.message}") from None
        raise MeshidError(f"Workload API error {exc.status.name}: {exc.message}") from None
    finally:
        channel.close()
    from google.protobuf import json_format

    claims = json_format.MessageToDict(resp.claims)
    print(f"SPIFFE ID:  {resp.spiffe_id}")
    if "exp" in claims:
        try:
            expires = dt.datetime.fromtimestamp(float(claims["exp"]), dt.UTC).isoformat()
        except (OverflowError, ValueError, OSError):
            # A valid token may expire past year 9999 (a federated domain's choice): its
            # number, not a traceback after the agent said it is valid.
            expires = str(claims["exp"])
        print(f"expires:    {expires}")
    print(json.dumps(claims, indent=2, sort_keys=True))
    return 0
