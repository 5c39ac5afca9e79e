"""Envoy SDS v3 on the Workload API socket, driven like Envoy drives it (xds-protos messages,
a grpclib client, no security header) against a real server + agent; openssl checks chains."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_spiffe_validator_config_pb2
from envoy.type.v3 import semantic_version_pb2
from google.rpc import status_pb2
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from stream_reader import StreamReader

from issuer.ca import minting
from meshid.cli.dev import DevStack, start_dev
from workload_api.sds import SECRET_TYPE_URL, SPIFFE_VALIDATOR, spiffe_validator_supported
from workload_api.sds_service import (
    DeltaDiscoveryRequest,
    DiscoveryRequest,
    DiscoveryResponse,
    SecretDiscoveryServiceStub,
)

pytestmark = pytest.mark.integration

TD = "example.org"
TIMEOUT = 20
ENVOY_EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "envoy" / "envoy.yaml"
QUIET = 1.5  # how long "no response" must hold after an ACK/NACK/stale request


def node(version: tuple[int, int, int] | None = None) -> base_pb2.Node:
    n = base_pb2.Node(id="sidecar~10.0.0.1~app~default", cluster="app", user_agent_name="envoy")
    if version is not None:
        n.user_agent_build_version.version.CopyFrom(semantic_version_pb2.SemanticVersion(
            major_number=version[0], minor_number=version[1], patch=version[2]))
    return n


def request(names: list[str], *, version: str = "", nonce: str = "", n: base_pb2.Node | None = None,
            error: str | None = None, with_node: bool = True) -> DiscoveryRequest:
    req = DiscoveryRequest(version_info=version, resource_names=names, type_url=SECRET_TYPE_URL,
                           response_nonce=nonce)
    if with_node:  # Envoy may send it on a stream's first request only
        req.node.CopyFrom(n or node((1, 30, 0)))
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=Status.INTERNAL.value, message=error))
    return req


def secrets_of(resp: DiscoveryResponse) -> dict[str, secret_pb2.Secret]:
    out = {}
    for a in resp.resources:
        assert a.type_url == SECRET_TYPE_URL
        s = secret_pb2.Secret()
        assert a.Unpack(s)
        out[s.name] = s
    return out


def spiffe_validator(s: secret_pb2.Secret) -> tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig:
    cvc = s.validation_context.custom_validator_config
    assert cvc.name == SPIFFE_VALIDATOR
    cfg = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()
    assert cvc.typed_config.Unpack(cfg)
    return cfg


@asynccontextmanager
async def sds(stack: DevStack) -> AsyncIterator[SecretDiscoveryServiceStub]:
    ch = Channel(path=stack.socket_path)
    try:
        yield SecretDiscoveryServiceStub(ch)
    finally:
        ch.close()


@asynccontextmanager
async def secret_stream(stack: DevStack) -> AsyncIterator[tuple[Any, StreamReader]]:
    async with sds(stack) as stub:
        finished = False
        try:
            async with stub.StreamSecrets.open(timeout=120) as st:
                await st.send_request()  # headers first: the background reader needs an open stream
                responses = StreamReader(st)
                try:
                    yield st, responses
                    finished = True
                finally:
                    await responses.close()
                    await st.cancel()
        except GRPCError:
            # A status the test already read through `responses` is raised again on exit.
            if not finished:
                raise


def openssl_verify(tmp: Path, chain_pem: bytes, roots_pem: bytes) -> subprocess.CompletedProcess[str]:
    chain = x509.load_pem_x509_certificates(chain_pem)
    pem = lambda cs: b"".join(c.public_bytes(serialization.Encoding.PEM) for c in cs)  # noqa: E731
    (tmp / "leaf.pem").write_bytes(pem(chain[:1]))
    (tmp / "chain.pem").write_bytes(pem(chain[1:]))
    (tmp / "root.pem").write_bytes(roots_pem)
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp / "root.pem"), "-untrusted", str(tmp / "chain.pem"),
         str(tmp / "leaf.pem")], capture_output=True, text=True, timeout=30,
    )


def spki(public_key: Any) -> bytes:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return bytes(public_key.public_bytes(serialization.Encoding.DER, fmt))


def chain_of(s: secret_pb2.Secret) -> bytes:
    return bytes(s.tls_certificate.certificate_chain.inline_bytes)


def check_tls_certificate(s: secret_pb2.Secret, spiffe_id: str) -> x509.Certificate:
    """PEM chain whose leaf names `spiffe_id`, and a PEM PKCS#8 key for that leaf."""
    tls = s.tls_certificate
    chain = x509.load_pem_x509_certificates(tls.certificate_chain.inline_bytes)
    leaf = chain[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id]
    key_pem = tls.private_key.inline_bytes
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, not SEC1
    key = serialization.load_pem_private_key(key_pem, None)
    assert spki(key.public_key()) == spki(leaf.public_key())
    return leaf


async def force_reissue(stack: DevStack, spiffe_id: str) -> None:
    """A changed entry is re-signed at the agent's next sync ("entry_changed")."""
    entry = next(e for e in await stack.server.entries.list() if str(e.spiffe_id) == spiffe_id)
    await stack.server.entries.update(entry.replace(x509_svid_ttl=entry.x509_svid_ttl + 1800))
    stack.agent.manager.poke()


async def test_stream_default_and_rootca_verify_ack_nack_stale_and_rotation(
    dev_stack: DevStack, short_tmp: Path
) -> None:
    me = str(dev_stack.spiffe_id)
    async with secret_stream(dev_stack) as (st, responses):
        await st.send_message(request(["default", "ROOTCA"]))
        first = await responses.next()
        assert first.type_url == SECRET_TYPE_URL
        assert first.version_info == "1" and first.nonce
        got = secrets_of(first)
        assert set(got) == {"default", "ROOTCA"}
        leaf = check_tls_certificate(got["default"], me)
        cfg = spiffe_validator(got["ROOTCA"])
        assert [td.name for td in cfg.trust_domains] == [TD]
        roots_pem = cfg.trust_domains[0].trust_bundle.inline_bytes
        res = openssl_verify(short_tmp, chain_of(got["default"]), roots_pem)
        assert res.returncode == 0, res.stderr

        # ACK: same names, the version and nonce just received → nothing is resent.
        await st.send_message(request(["default", "ROOTCA"], version=first.version_info, nonce=first.nonce))
        await responses.quiet(QUIET)
        # NACK: error_detail set, version rolled back → logged, not resent.
        await st.send_message(request(["default", "ROOTCA"], nonce=first.nonce, error="bad secret"))
        await responses.quiet(QUIET)
        # Stale nonce: ignored entirely, even though it asks for different names.
        await st.send_message(request(["ROOTCA"], version=first.version_info, nonce="not-our-nonce"))
        await responses.quiet(QUIET)

        # Rotation: the new SVID is pushed with a new version and nonce.
        await force_reissue(dev_stack, me)
        second = await responses.next()
        assert int(second.version_info) > int(first.version_info)
        assert second.nonce and second.nonce != first.nonce
        got2 = secrets_of(second)
        assert set(got2) == {"default", "ROOTCA"}
        leaf2 = check_tls_certificate(got2["default"], me)
        assert leaf2.serial_number != leaf.serial_number
        res = openssl_verify(short_tmp, chain_of(got2["default"]), roots_pem)
        assert res.returncode == 0, res.stderr
        # An ACK of the previous response is stale now, the ACK of the new one is quiet.
        await st.send_message(request(["default"], version=first.version_info, nonce=first.nonce))
        await st.send_message(request(["default", "ROOTCA"], version=second.version_info, nonce=second.nonce))
        await responses.quiet(QUIET)

        # Changing the subscription (with the current nonce) is answered at once.
        td_id = f"spiffe://{TD}"
        await st.send_message(request([me, td_id], version=second.version_info, nonce=second.nonce))
        third = await responses.next()
        assert int(third.version_info) > int(second.version_info)
        got3 = secrets_of(third)
        assert set(got3) == {me, td_id}
        assert check_tls_certificate(got3[me], me).serial_number == leaf2.serial_number
        assert spiffe_validator(got3[td_id]).trust_domains[0].trust_bundle.inline_bytes == roots_pem


async def test_bundle_change_is_pushed(dev_stack: DevStack) -> None:
    """SPEC §4: push again when the caller's bundles change, not only its SVIDs."""
    cache = dev_stack.agent.cache
    async with secret_stream(dev_stack) as (st, responses):
        await st.send_message(request(["ROOTCA"]))
        first = await responses.next()
        await st.send_message(request(["ROOTCA"], version=first.version_info, nonce=first.nonce))
        await responses.quiet(QUIET)
        # What a sync bringing a new root does (a CA key prepared on the server).
        assert cache.bundle is not None
        extra = minting.self_signed_ca(ec.generate_private_key(ec.SECP256R1()), cache.td, 3600,
                                       dt.datetime.now(dt.UTC))
        cache.set_bundle(dataclasses.replace(cache.bundle,
                                             x509_authorities=(*cache.bundle.x509_authorities, extra)))
        pushed = await responses.next()
        assert int(pushed.version_info) == int(first.version_info) + 1 and pushed.nonce != first.nonce
        pem = spiffe_validator(secrets_of(pushed)["ROOTCA"]).trust_domains[0].trust_bundle.inline_bytes
        assert extra in x509.load_pem_x509_certificates(pem)


async def test_requests_wait_in_flow_control_while_a_response_waits_on_the_client(
    dev_stack: DevStack,
) -> None:
    """A client that stops reading its responses and goes on sending requests: they stay in
    HTTP/2 flow control (the client's sends block), instead of piling up in the agent's memory
    (every request was read ahead into an unbounded list; 64 MB taken in 1 MB requests)."""
    cache = dev_stack.agent.cache
    assert cache.bundle is not None
    small = Configuration(http2_connection_window_size=2**16 - 1, http2_stream_window_size=2**16 - 1)
    ch = Channel(path=dev_stack.socket_path, config=small)
    try:
        async with SecretDiscoveryServiceStub(ch).StreamSecrets.open(timeout=60) as st:
            await st.send_message(request(["ROOTCA"]))
            # Bundle changes until the unread responses fill our 64 KiB receive window: the
            # agent's next response waits on us.
            roots = list(cache.bundle.x509_authorities)
            for _ in range(30):
                roots.append(minting.self_signed_ca(ec.generate_private_key(ec.SECP256R1()), cache.td, 3600,
                                                    dt.datetime.now(dt.UTC)))
                cache.set_bundle(dataclasses.replace(cache.bundle, x509_authorities=tuple(roots)))
                await asyncio.sleep(0.01)
            big = request(["x" * 1000] * 1000)  # ~1 MB each
            sent = 0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    while sent < 64:
                        await st.send_message(big)
                        sent += 1
            # The agent's own receive windows (4 MiB) and the one request it holds, no more.
            assert sent < 16
            await st.cancel()
    finally:
        ch.close()


async def test_fetch_secrets_names(dev_stack: DevStack) -> None:
    me = str(dev_stack.spiffe_id)
    async with sds(dev_stack) as stub:
        everything = secrets_of(await stub.FetchSecrets(request([])))
        assert set(everything) == {me, f"spiffe://{TD}"}
        check_tls_certificate(everything[me], me)
        assert everything[f"spiffe://{TD}"].HasField("validation_context")

        all_td = secrets_of(await stub.FetchSecrets(request(["ALL"])))
        assert [td.name for td in spiffe_validator(all_td["ALL"]).trust_domains] == [TD]

        named = secrets_of(await stub.FetchSecrets(request([me, "default"])))
        assert set(named) == {me, "default"}
        assert named[me].tls_certificate == named["default"].tls_certificate

        # Envoy 1.17 has no SPIFFE validator: plain trusted_ca roots instead; ALL is refused.
        old = node((1, 17, 4))
        legacy = secrets_of(await stub.FetchSecrets(request(["ROOTCA"], n=old)))["ROOTCA"]
        vc = legacy.validation_context
        assert not vc.HasField("custom_validator_config")
        assert x509.load_pem_x509_certificates(vc.trusted_ca.inline_bytes)
        with pytest.raises(GRPCError) as err:
            await stub.FetchSecrets(request(["ALL"], n=old))
        assert err.value.status == Status.FAILED_PRECONDITION
        # No build version reported: treated as a current Envoy.
        assert secrets_of(await stub.FetchSecrets(request(["ROOTCA"], n=node())))["ROOTCA"] \
            .validation_context.HasField("custom_validator_config")


@pytest.mark.slow
async def test_scheduled_renewal_is_pushed(short_tmp: Path) -> None:
    """A 20 s SVID renews at 50-80 % of its life; the stream pushes it unasked."""
    stack = await start_dev(short_tmp / "d", TD, str(short_tmp / "s" / "api.sock"), svid_ttl=20)
    try:
        async with secret_stream(stack) as (st, responses):
            await st.send_message(request(["default"]))
            first = await responses.next()
            leaf = check_tls_certificate(secrets_of(first)["default"], str(stack.spiffe_id))
            await st.send_message(request(["default"], version=first.version_info, nonce=first.nonce))
            second = await responses.next()  # within TIMEOUT (20 s) > 16 s
            assert int(second.version_info) > int(first.version_info) and second.nonce != first.nonce
            leaf2 = check_tls_certificate(secrets_of(second)["default"], str(stack.spiffe_id))
            assert leaf2.serial_number != leaf.serial_number
            assert leaf2.not_valid_before_utc >= leaf.not_valid_before_utc
    finally:
        await stack.stop()


async def test_old_envoy_keeps_trusted_ca_when_later_requests_omit_the_node(dev_stack: DevStack) -> None:
    me = str(dev_stack.spiffe_id)
    async with secret_stream(dev_stack) as (st, responses):
        await st.send_message(request(["ROOTCA", "default"], n=node((1, 17, 0))))
        first = await responses.next()
        assert secrets_of(first)["ROOTCA"].validation_context.HasField("trusted_ca")
        await st.send_message(request(["ROOTCA", "default"], version=first.version_info, nonce=first.nonce,
                                      with_node=False))
        await responses.quiet(QUIET)
        await force_reissue(dev_stack, me)
        pushed = secrets_of(await responses.next())
        vc = pushed["ROOTCA"].validation_context
        assert vc.HasField("trusted_ca") and not vc.HasField("custom_validator_config")


@pytest.mark.parametrize("name", [f"spiffe://{TD}/someone-else", "spiffe://other.org", "bogus", "ROOTCA2"])
async def test_unknown_resource_is_invalid_argument(dev_stack: DevStack, name: str) -> None:
    async with sds(dev_stack) as stub:
        with pytest.raises(GRPCError) as err:
            await stub.FetchSecrets(request(["default", name]))
        assert err.value.status == Status.INVALID_ARGUMENT
        assert name in (err.value.message or "")
        with pytest.raises(GRPCError) as err:
            async with stub.StreamSecrets.open(timeout=TIMEOUT) as st:
                await st.send_message(request([name]))
                # The server ends the call while our side is still open: grpclib may see
                # the reset before the trailers, and raises the status on leaving the block.
                with contextlib.suppress(StreamTerminatedError):
                    await st.recv_message()
        assert err.value.status == Status.INVALID_ARGUMENT


async def test_many_names_are_refused_at_once_and_errors_stay_short(dev_stack: DevStack) -> None:
    # A request of 100k names held the agent's loop for a second of parsing, and the error
    # quoting all of them (2 MB) for minutes of hpack encoding: every workload waited.
    async with sds(dev_stack) as stub:
        with pytest.raises(GRPCError) as err:
            await asyncio.wait_for(stub.FetchSecrets(request([f"bogus-{i}" for i in range(100_000)])), 10)
        assert err.value.status == Status.INVALID_ARGUMENT
        assert err.value.message == "at most 1024 resource names per request, got 100000"
        with pytest.raises(GRPCError) as err:
            await asyncio.wait_for(stub.FetchSecrets(request([f"bogus-{i:04}" for i in range(1000)])), 10)
        assert err.value.status == Status.INVALID_ARGUMENT
        message = err.value.message or ""
        assert "'bogus-0000'" in message and "'bogus-0010'" not in message
        assert message.endswith("and 990 more")
        assert (await stub.FetchSecrets(request(["default"]))).resources


async def test_repeated_nacks_are_logged_once_and_short(
    dev_stack: DevStack, caplog: pytest.LogCaptureFixture
) -> None:
    # The NACK message is the caller's: repeating a 1 MB NACK of one response wrote 482 MB
    # of warnings in 5 s.
    caplog.set_level(logging.DEBUG, logger="meshid.agent.sds")
    async with secret_stream(dev_stack) as (st, responses):
        await st.send_message(request(["default"]))
        first = await responses.next()
        for _ in range(20):
            await st.send_message(request(["default"], nonce=first.nonce, error="x" * 100_000))
        await responses.quiet(QUIET)
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "meshid.agent.sds" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, len(warnings)
    assert len(warnings[0]) < 1000 and warnings[0].endswith("(99488 more characters)")


async def test_a_nack_naming_huge_resources_is_logged_short(
    dev_stack: DevStack, caplog: pytest.LogCaptureFixture
) -> None:
    # The resource names are the caller's too: a NACK naming a 1 MB resource was logged whole
    # at WARNING (once per stream, and streams are cheap), as were the nonce and version at DEBUG.
    caplog.set_level(logging.DEBUG, logger="meshid.agent.sds")
    huge = "y" * 1_000_000
    async with sds(dev_stack) as stub:
        with pytest.raises(GRPCError) as err:
            async with stub.StreamSecrets.open(timeout=TIMEOUT) as st:
                await st.send_message(request(["default"]))
                first = await st.recv_message()
                assert first is not None
                await st.send_message(request(["default"], version=huge, nonce=huge))  # stale
                nack = request(["default", huge], version=huge, nonce=first.nonce, error="bad")
                await st.send_message(nack, end=True)
                with contextlib.suppress(StreamTerminatedError):  # as in the test above
                    await st.recv_message()
        assert err.value.status == Status.INVALID_ARGUMENT  # the unknown name ends the stream
    logged = [r.getMessage() for r in caplog.records if r.name == "meshid.agent.sds"]
    assert any("rejected version" in m for m in logged)
    assert all(len(m) < 2000 for m in logged), sorted(len(m) for m in logged)


async def test_wrong_type_url_and_delta_secrets(dev_stack: DevStack) -> None:
    async with sds(dev_stack) as stub:
        bad = request(["default"])
        bad.type_url = "type.googleapis.com/envoy.api.v2.auth.Secret"
        with pytest.raises(GRPCError) as err:
            await stub.FetchSecrets(bad)
        assert err.value.status == Status.INVALID_ARGUMENT
        with pytest.raises(GRPCError) as err:
            async with stub.DeltaSecrets.open(timeout=TIMEOUT) as st:
                await st.send_message(DeltaDiscoveryRequest(type_url=SECRET_TYPE_URL), end=True)
                await st.recv_message()
        assert err.value.status == Status.UNIMPLEMENTED


def test_envoy_version_rule() -> None:
    assert not spiffe_validator_supported(node((1, 17, 0)))
    assert not spiffe_validator_supported(node((1, 16, 5)))
    assert spiffe_validator_supported(node((1, 18, 0)))
    assert spiffe_validator_supported(node((2, 0, 0)))
    assert spiffe_validator_supported(node())
    opt_out = node((1, 30, 0))
    opt_out.metadata.fields["disable_spiffe_cert_validation"].bool_value = True
    assert not spiffe_validator_supported(opt_out)


async def test_envoy_example_is_a_valid_bootstrap_meshid_can_serve(dev_stack: DevStack) -> None:
    """deploy/envoy/envoy.yaml decodes strictly as an Envoy v3 Bootstrap, and every SDS
    secret it names is one meshid answers."""
    import yaml
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401  (registers the Any type)
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
    from google.protobuf import json_format

    boot = json_format.ParseDict(yaml.safe_load(ENVOY_EXAMPLE.read_text()), bootstrap_pb2.Bootstrap())
    contexts: list[Any] = []
    for listener in boot.static_resources.listeners:
        for chain in listener.filter_chains:
            if chain.HasField("transport_socket"):
                ctx = tls_pb2.DownstreamTlsContext()
                assert chain.transport_socket.typed_config.Unpack(ctx)
                contexts.append(ctx.common_tls_context)
            for f in chain.filters:
                assert f.typed_config.Unpack(hcm.HttpConnectionManager())
    for cluster in boot.static_resources.clusters:
        if cluster.HasField("transport_socket"):
            ctx = tls_pb2.UpstreamTlsContext()
            assert cluster.transport_socket.typed_config.Unpack(ctx)
            contexts.append(ctx.common_tls_context)
    names = {c.name for ctx in contexts for c in ctx.tls_certificate_sds_secret_configs}
    names |= {ctx.combined_validation_context.validation_context_sds_secret_config.name for ctx in contexts}
    assert names == {"default", f"spiffe://{TD}", "ROOTCA"}
    sds_cluster = next(c for c in boot.static_resources.clusters if c.name == "meshid_agent")
    pipe = sds_cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.pipe.path
    assert pipe == "/run/meshid/sockets/agent.sock"  # the agent's default socket_path
    async with sds(dev_stack) as stub:
        assert set(secrets_of(await stub.FetchSecrets(request(sorted(names))))) == names
