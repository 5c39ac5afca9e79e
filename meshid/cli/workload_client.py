"""`meshid fetch x509|jwt|bundles` and `meshid validate jwt`: a Workload API client."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path
from urllib.parse import urlparse

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from meshid.der import load_der_certificates
from meshid.errors import ConfigError, MeshidError
from workload_api._gen import workload_grpc, workload_pb2

HEADER = {"workload.spiffe.io": "true"}
TIMEOUT = 30.0


def socket_from(arg: str | None) -> str:
    value = arg or os.environ.get("SPIFFE_ENDPOINT_SOCKET", "")
    if not value:
        raise ConfigError("no Workload API socket: pass --socket or set SPIFFE_ENDPOINT_SOCKET")
    if value.startswith("unix:"):
        u = urlparse(value)
        if u.netloc or u.query or u.fragment or not u.path.startswith("/"):
            raise ConfigError(f"invalid SPIFFE_ENDPOINT_SOCKET {value!r}: expected unix:///absolute/path")
        return u.path
    if value.startswith("/"):
        return value
    raise ConfigError(f"invalid socket address {value!r}: expected unix:///absolute/path")


def _der_certs(data: bytes) -> list[x509.Certificate]:
    return load_der_certificates(data)


def _pem(certs: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


async def fetch(args: argparse.Namespace) -> int:
    channel = Channel(path=socket_from(args.socket))
    stub = workload_grpc.SpiffeWorkloadAPIStub(channel)
    try:
        if args.fetch_op == "x509":
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
                (out / "svid.pem").write_bytes(_pem(_der_certs(s.x509_svid)))
                key = serialization.load_der_private_key(s.x509_svid_key, None)
                fd = os.open(out / "svid.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(
                        key.private_bytes(
                            serialization.Encoding.PEM,
                            serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption(),
                        )
                    )
                (out / "bundle.pem").write_bytes(_pem(_der_certs(s.bundle)))
                print(f"wrote {out}/svid.pem, svid.key, bundle.pem")
        elif args.fetch_op == "jwt":
            req = workload_pb2.JWTSVIDRequest(audience=args.audience, spiffe_id=args.spiffe_id or "")
            jresp = await stub.FetchJWTSVID(req, metadata=HEADER, timeout=TIMEOUT)
            for j in jresp.svids:
                print(f"SPIFFE ID:  {j.spiffe_id}")
                print(f"token:      {j.svid}")
        else:
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
    channel = Channel(path=socket_from(args.socket))
    stub = workload_grpc.SpiffeWorkloadAPIStub(channel)
    try:
        resp = await stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience=args.audience, svid=args.token),
            metadata=HEADER,
            timeout=TIMEOUT,
        )
    except GRPCError as exc:
        raise MeshidError(f"token is not valid: {exc.message}") from None
    finally:
        channel.close()
    from google.protobuf import json_format

    claims = json_format.MessageToDict(resp.claims)
    print(f"SPIFFE ID:  {resp.spiffe_id}")
    if "exp" in claims:
        print(f"expires:    {dt.datetime.fromtimestamp(float(claims['exp']), dt.UTC).isoformat()}")
    print(json.dumps(claims, indent=2, sort_keys=True))
    return 0
