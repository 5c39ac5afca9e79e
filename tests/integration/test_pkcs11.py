"""key_manager pkcs11 against a real token (SoftHSM2): CA keys made inside the token and
never extractable, the datastore holding only references, and a server whose CA lives
in the token issuing X509-SVIDs (checked by openssl) and JWT-SVIDs (checked by PyJWT)
through the agent API, before and after a restart; CA keys the CA revokes or retires are
destroyed in the token, and only those."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import exceptions as p11e

from issuer.ca import minting
from issuer.ca.keys import KeyType, key_id_for, spki_der
from issuer.ca.pkcs11 import Pkcs11EcPrivateKey, Pkcs11Error, Pkcs11KeyManager, TokenSession
from issuer.ca.sealing import SealError
from issuer.ca.slots import JWT, X509, CaManager, LoadedKey
from issuer.config import server_config_from_dict
from issuer.datastore.sqlite import SqliteDataStore
from meshid import telemetry
from meshid.cli.dev import DevStack, start_dev
from meshid.errors import ConfigError, NotFoundError
from meshid.spiffe_id import TrustDomain
from workload_api.keys import csr_for, new_key
from workload_api.server_client import b64, certs_from_json

pytestmark = pytest.mark.integration

TOKEN = "meshid"
PIN = "1234"
SO_PIN = "5678"
PIN_ENV = "MESHID_TEST_PKCS11_PIN"
PREFIX = "meshid-test-"
_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
)


@dataclass(frozen=True)
class SoftHsm:
    module: str
    conf: Path


def _find_module() -> str | None:
    return next((m for m in _MODULE_CANDIDATES if Path(m).exists()), None)


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """One initialised token for the module: SoftHSM2 reads SOFTHSM2_CONF once per process
    (at C_Initialize), so every test here shares this token directory."""
    module = _find_module()
    if module is None or shutil.which("softhsm2-util") is None:
        message = "SoftHSM2 is not installed (run .ci/install-softhsm.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", SO_PIN],
            check=True,
            capture_output=True,
            timeout=30,
        )
        yield SoftHsm(module, conf)
    finally:
        if old is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = old


def _token_attributes(hsm: SoftHsm, ckid: bytes) -> dict[str, object]:
    """Attributes of the private key with CKA_ID `ckid`, read by a separate process (its own
    login), so the check does not go through the code under test."""
    script = textwrap.dedent("""
        import json, sys
        import pkcs11
        from pkcs11 import Attribute, ObjectClass
        lib = pkcs11.lib(sys.argv[1])
        with lib.get_token(token_label=sys.argv[2]).open(user_pin=sys.argv[3]) as s:
            key = s.get_key(object_class=ObjectClass.PRIVATE_KEY, id=bytes.fromhex(sys.argv[4]))
            names = ("EXTRACTABLE", "SENSITIVE", "NEVER_EXTRACTABLE", "ALWAYS_SENSITIVE", "TOKEN", "LABEL")
            print(json.dumps({n: key[getattr(Attribute, n)] for n in names}))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script, hsm.module, TOKEN, PIN, ckid.hex()],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "SOFTHSM2_CONF": str(hsm.conf)},
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def _manager(hsm: SoftHsm) -> Pkcs11KeyManager:
    return Pkcs11KeyManager(hsm.module, TOKEN, PIN, PREFIX)


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048])
async def test_ca_key_stays_in_the_token_and_signs(softhsm: SoftHsm, key_type: KeyType) -> None:
    km = _manager(softhsm)
    try:
        key, _ = await km.generate("x509-tmp", key_type)
        key_id = f"x509-{key_id_for(key.public_key())}"
        sealed = await km.seal(key_id, key)

        # The stored form is a reference: token, CKA_ID and label, no key material.
        ref = json.loads(sealed)
        assert set(ref) == {"v", "manager", "key_id", "token", "ckid", "label"}
        assert ref["manager"] == "pkcs11" and ref["token"] == TOKEN and ref["key_id"] == key_id
        attrs = _token_attributes(softhsm, bytes.fromhex(ref["ckid"]))
        assert attrs["EXTRACTABLE"] is False and attrs["SENSITIVE"] is True
        assert attrs["NEVER_EXTRACTABLE"] is True and attrs["ALWAYS_SENSITIVE"] is True
        assert attrs["TOKEN"] is True and attrs["LABEL"] == PREFIX + key_id
        with pytest.raises(TypeError, match="cannot be exported"):
            key.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        # A handle: copies are the same handle, and it never leaves the process.
        assert copy.copy(key) is key and copy.deepcopy(key) is key
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(key)

        # Loaded back from the reference, it signs a CA certificate (cryptography's builder),
        # leaves (the minter's template path) and JWTs (PyJWT).
        loaded = await km.load(key_id, sealed)
        now = dt.datetime.now(dt.UTC)
        ca = minting.self_signed_ca(loaded, TrustDomain.parse("example.org"), 3600, now)
        ca.verify_directly_issued_by(ca)
        minter = minting.X509Minter(loaded, ca)
        assert minter.fast_path
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf = minter.mint_from_public_key(leaf_key.public_key(), "spiffe://example.org/w", [], 600, now)
        leaf.verify_directly_issued_by(ca)
        algs = ["RS256", "PS256"] if isinstance(loaded, rsa.RSAPrivateKey) else [None]
        for alg in algs:
            token = minting.mint_jwt_svid(loaded, "kid1", "spiffe://example.org/w", ["aud"], 60, now, alg=alg)
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, loaded.public_key(), algorithms=[header["alg"]], audience="aud")
            assert claims["sub"] == "spiffe://example.org/w"

        # A reference is bound to its key id, and software keys are never imported.
        with pytest.raises(SealError, match="belongs to"):
            await km.load("x509-other", sealed)
        with pytest.raises(SealError):
            await km.seal("x509-soft", ec.generate_private_key(ec.SECP256R1()))
    finally:
        await km.close()


async def test_missing_key_and_wrong_token_are_seal_errors(softhsm: SoftHsm) -> None:
    km = _manager(softhsm)
    try:
        ref = {
            "v": 1,
            "manager": "pkcs11",
            "key_id": "x509-gone",
            "token": TOKEN,
            "ckid": "00" * 16,
            "label": "x",
        }
        with pytest.raises(SealError, match="no private key"):
            await km.load("x509-gone", json.dumps(ref).encode())
        with pytest.raises(SealError, match="token"):
            await km.load("x509-gone", json.dumps({**ref, "token": "other"}).encode())
        with pytest.raises(SealError, match="not a PKCS#11 reference"):
            await km.load("x509-gone", b"\x01" + os.urandom(40))
    finally:
        await km.close()


def _openssl_verify(tmp: Path, chain: list[x509.Certificate], roots: bytes) -> None:
    pem = serialization.Encoding.PEM
    (tmp / "leaf.pem").write_bytes(chain[0].public_bytes(pem))
    (tmp / "inter.pem").write_bytes(b"".join(c.public_bytes(pem) for c in chain[1:]))
    (tmp / "roots.pem").write_bytes(roots)
    out = subprocess.run(
        [
            "openssl",
            "verify",
            "-x509_strict",
            "-CAfile",
            str(tmp / "roots.pem"),
            "-untrusted",
            str(tmp / "inter.pem"),
            str(tmp / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr


async def _issue_and_check(stack: DevStack, tmp: Path) -> str:
    """One X509-SVID and one JWT-SVID through the agent API; returns the active CA key id."""
    server, agent = stack.server, stack.agent
    entry = next(e for e in await server.entries.list() if e.spiffe_id == stack.spiffe_id)
    # The agent attests and gets its own SVID in the background; wait for its identity.
    for _ in range(200):
        if agent.cache.svids.get(entry.id) is not None:
            break
        await asyncio.sleep(0.05)
    key = new_key()
    results = await agent.client.sign_x509([{"entry_id": entry.id, "csr": b64(csr_for(key))}])
    assert "svid" in results[0], results
    chain = certs_from_json(results[0]["svid"])
    assert spki_der(chain[0].public_key()) == spki_der(key)
    uris = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [str(entry.spiffe_id)]
    _openssl_verify(tmp, chain, server.ca.bundle.x509_pem())

    token, _ = await agent.client.sign_jwt(entry.id, ["svc-b"])
    kid = jwt.get_unverified_header(token)["kid"]
    jwks = jwt.PyJWKSet.from_dict(server.ca.bundle.jwks())
    signing_key = next(k for k in jwks.keys if k.key_id == kid)
    claims = jwt.decode(token, signing_key.key, algorithms=["ES256"], audience="svc-b")
    assert claims["sub"] == str(entry.spiffe_id)
    active: str = server.ca.x509_active.key_id
    return active


async def test_server_with_pkcs11_key_manager_issues_svids(
    softhsm: SoftHsm, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PIN_ENV, PIN)
    overrides = {
        "ca": {
            "key_manager": "pkcs11",
            "pkcs11": {
                "module_path": softhsm.module,
                "token_label": TOKEN,
                "pin_env": PIN_ENV,
                "key_label_prefix": PREFIX,
            },
        }
    }
    data, sock = short_tmp / "d", str(short_tmp / "s" / "api.sock")
    stack = await start_dev(data, "example.org", sock, server_overrides=overrides)
    try:
        assert isinstance(stack.server.ca.x509_active.key, Pkcs11EcPrivateKey)
        assert isinstance(stack.server.ca.jwt_active.key, Pkcs11EcPrivateKey)
        assert stack.server.ds is not None
        for rec in await stack.server.ds.list_ca_keys():
            ref = json.loads(rec.sealed_key)  # references only: nothing to decrypt
            assert ref["manager"] == "pkcs11" and ref["key_id"] == rec.key_id
            attrs = _token_attributes(softhsm, bytes.fromhex(ref["ckid"]))
            assert attrs["EXTRACTABLE"] is False and attrs["SENSITIVE"] is True
        # The token's signatures are made off the event loop, even one SVID's: a device
        # that waits (its lock held by a key generation, a network HSM) must not stall it.
        loop_thread = threading.get_ident()
        signed_on: list[int] = []
        real_sign = TokenSession.sign

        def recording_sign(self: TokenSession, *args: Any, **kwargs: Any) -> bytes:
            signed_on.append(threading.get_ident())
            return real_sign(self, *args, **kwargs)

        monkeypatch.setattr(TokenSession, "sign", recording_sign)
        first_ca = await _issue_and_check(stack, short_tmp)
        await stack.agent.client.renew(csr_for(new_key()))  # an agent SVID too
        assert len(signed_on) >= 3 and loop_thread not in signed_on
        signed_on.clear()
        await stack.server._renew_identity()  # and the server's own SVID
        assert len(signed_on) == 1 and loop_thread not in signed_on
    finally:
        await stack.stop()

    # Restart: the CA keys come back from their references in the token.
    stack = await start_dev(data, "example.org", sock, server_overrides=overrides)
    try:
        assert await _issue_and_check(stack, short_tmp) == first_ca
    finally:
        await stack.stop()


def test_pkcs11_config_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {"trust_domain": "example.org", "data_dir": "/tmp/x"}
    with pytest.raises(ConfigError, match="module_path, token_label"):
        server_config_from_dict({**base, "ca": {"key_manager": "pkcs11"}})
    with pytest.raises(ConfigError, match="key_manager: must be one of"):
        server_config_from_dict({**base, "ca": {"key_manager": "vault"}})
    with pytest.raises(ConfigError, match="absolute"):
        server_config_from_dict({**base, "ca": {"pkcs11": {"module_path": "libsofthsm2.so"}}})
    cfg = server_config_from_dict(
        {
            **base,
            "ca": {
                "key_manager": "pkcs11",
                "pkcs11": {"module_path": "/usr/lib/softhsm/libsofthsm2.so", "token_label": "meshid"},
            },
        }
    )
    assert cfg.ca.pkcs11.pin_env == "MESHID_PKCS11_PIN"
    monkeypatch.delenv("MESHID_PKCS11_PIN", raising=False)
    with pytest.raises(ConfigError, match="MESHID_PKCS11_PIN holds no PIN"):
        Pkcs11KeyManager.from_env("/usr/lib/softhsm/libsofthsm2.so", "meshid", "MESHID_PKCS11_PIN")


# ---------------------------------------------------------------------------- retired keys


def _token_objects(hsm: SoftHsm) -> dict[str, list[str]]:
    """CKA_ID (hex) -> classes of the key objects with that id, read by a separate process."""
    script = textwrap.dedent("""
        import json, sys
        import pkcs11
        from pkcs11 import Attribute, ObjectClass
        lib = pkcs11.lib(sys.argv[1])
        found = {}
        with lib.get_token(token_label=sys.argv[2]).open(user_pin=sys.argv[3]) as s:
            for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                for obj in s.get_objects({Attribute.CLASS: cls}):
                    found.setdefault(bytes(obj[Attribute.ID]).hex(), []).append(cls.name)
        print(json.dumps(found))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script, hsm.module, TOKEN, PIN],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "SOFTHSM2_CONF": str(hsm.conf)},
    )
    result: dict[str, list[str]] = json.loads(out.stdout)
    return result


BOTH = ["PRIVATE_KEY", "PUBLIC_KEY"]
CA_TTL = 6000


def _ckid(lk: LoadedKey) -> str:
    ckid: str = json.loads(lk.record.sealed_key)["ckid"]
    return ckid


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class RefusingUpstream:
    name = "refusing"

    async def mint_x509_ca(self, csr_der: bytes, ttl_seconds: int, now: dt.datetime) -> Any:
        raise RuntimeError("upstream is down")


def _destroy_failures() -> float:
    total = 0.0
    for metric in telemetry.default_telemetry().collect():
        if metric.name == "meshid.ca.key.destroy.failures":
            for point in metric.data.data_points:
                if (point.attributes or {}).get("key_manager") == "pkcs11":
                    total += float(getattr(point, "value", 0))
    return total


async def _rotated_ca(
    ds: SqliteDataStore, km: Pkcs11KeyManager, clock: FakeClock
) -> tuple[CaManager, dict[str, LoadedKey | None]]:
    """A CA on the token whose first keys of both kinds are old, the X509 one tainted."""
    ca = CaManager(ds, km, None, TrustDomain("example.org"), CA_TTL, server_id="r1", clock=clock)
    await ca.load()
    old = {kind: ca.active(kind) for kind in (X509, JWT)}
    clock.t += CA_TTL / 2  # the next keys outlive the first ones
    for kind in (X509, JWT):
        await ca.prepare(kind)
        await ca.activate(kind)
    old_x509 = old[X509]
    assert old_x509 is not None
    await ca.taint(old_x509.key_id)
    return ca, old


async def test_revoked_and_retired_ca_keys_are_destroyed_in_the_token(
    softhsm: SoftHsm, ds: SqliteDataStore, caplog: pytest.LogCaptureFixture
) -> None:
    km = _manager(softhsm)
    clock = FakeClock(dt.datetime.now(dt.UTC).timestamp())
    try:
        ca, old = await _rotated_ca(ds, km, clock)
        old_x509, old_jwt = old[X509], old[JWT]
        assert old_x509 is not None and old_jwt is not None
        active = [ca.x509_active, ca.jwt_active]
        objects = _token_objects(softhsm)
        for lk in [old_x509, old_jwt, *active]:
            assert sorted(objects[_ckid(lk)]) == BOTH

        # Revoke: the key pair is gone from the token, the active and other old keys stay.
        await ca.revoke(old_x509.key_id, force=True)
        objects = _token_objects(softhsm)
        assert _ckid(old_x509) not in objects
        for lk in [old_jwt, *active]:
            assert sorted(objects[_ckid(lk)]) == BOTH

        # Revoking twice, destroying a key already gone or never made: harmless.
        with pytest.raises(NotFoundError):
            await ca.revoke(old_x509.key_id, force=True)
        with caplog.at_level(logging.DEBUG, logger="meshid.ca.pkcs11"):
            await km.delete(old_x509.key_id)
            await km.delete("x509-never-existed")
        assert caplog.text.count("already destroyed") == 2
        assert _token_objects(softhsm) == objects

        # The active keys still sign.
        now = dt.datetime.fromtimestamp(clock.t, dt.UTC)
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        minter = ca.x509_active.minter
        assert minter is not None and ca.x509_active.cert is not None
        leaf = minter.mint_from_public_key(leaf_key.public_key(), "spiffe://example.org/w", [], 600, now)
        leaf.verify_directly_issued_by(ca.x509_active.cert)
        minting.mint_jwt_svid(ca.jwt_active.key, "kid", "spiffe://example.org/w", ["aud"], 60, now)

        # Prune: the old JWT key signed nothing; once expired the schedule retires and destroys it.
        clock.t = old_jwt.record.not_after
        assert await ca.tick()
        objects = _token_objects(softhsm)
        assert _ckid(old_jwt) not in objects
        for lk in active:
            assert sorted(objects[_ckid(lk)]) == BOTH
        assert {k.key_id for k in ca.keys()} >= {lk.key_id for lk in active}
    finally:
        await km.close()


async def test_a_token_error_is_reported_and_the_key_still_leaves_the_bundle(
    softhsm: SoftHsm, ds: SqliteDataStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    km = _manager(softhsm)
    clock = FakeClock(dt.datetime.now(dt.UTC).timestamp())
    try:
        ca, old = await _rotated_ca(ds, km, clock)
        old_x509 = old[X509]
        assert old_x509 is not None and old_x509.cert is not None
        token = km.token

        def broken(fn: Any) -> Any:
            raise p11e.DeviceError("device error")

        monkeypatch.setattr(token, "call", broken)
        failures = _destroy_failures()
        with caplog.at_level(logging.WARNING, logger="meshid.ca"):
            await ca.revoke(old_x509.key_id, force=True)
        assert old_x509.cert not in ca.bundle.x509_authorities
        assert old_x509.key_id not in {r.key_id for r in await ds.list_ca_keys()}
        assert _destroy_failures() == failures + 1
        assert f"{old_x509.key_id} was not destroyed" in caplog.text and "DeviceError" in caplog.text
        with pytest.raises(Pkcs11Error, match="could not destroy"):
            await km.delete(old_x509.key_id)
        assert sorted(_token_objects(softhsm)[_ckid(old_x509)]) == BOTH  # left behind

        # Once the token is back, destroying it by hand works (the manager still knows its CKA_ID).
        monkeypatch.undo()
        await km.delete(old_x509.key_id)
        assert _ckid(old_x509) not in _token_objects(softhsm)
    finally:
        await km.close()


async def test_replicas_sharing_the_token_destroy_only_what_they_retired(
    softhsm: SoftHsm, ds: SqliteDataStore
) -> None:
    """Two replicas, one datastore, one token: the shared JWT key is destroyed by the replica
    that retired it, and a gone replica's CA key (never loaded by the other: found by its
    label) only once it has expired and left the datastore."""
    km1, km2 = _manager(softhsm), _manager(softhsm)
    clock = FakeClock(dt.datetime.now(dt.UTC).timestamp())
    td = TrustDomain("example.org")
    r1 = CaManager(ds, km1, None, td, CA_TTL, server_id="r1", clock=clock)
    r2 = CaManager(ds, km2, None, td, CA_TTL, server_id="r2", clock=clock)
    try:
        await r1.load()
        await r2.load()
        shared_jwt = r1.jwt_active
        assert r2.jwt_active.key_id == shared_jwt.key_id
        await r1.prepare(JWT)
        await r1.activate(JWT)
        await r1.taint(shared_jwt.key_id)
        await r2.tick()
        await r1.tick()  # retires the tainted, unused JWT key
        await r2.tick()
        objects = _token_objects(softhsm)
        assert _ckid(shared_jwt) not in objects
        live = [r1.x509_active, r1.jwt_active, r2.x509_active]
        for lk in live:
            assert sorted(objects[_ckid(lk)]) == BOTH

        gone = r2.x509_active  # r2 stops for good
        clock.t = gone.record.not_after - 1
        await r1.tick()  # not expired yet: stays
        assert sorted(_token_objects(softhsm)[_ckid(gone)]) == BOTH
        clock.t = gone.record.not_after + 1
        await r1.tick()
        assert gone.key_id not in {r.key_id for r in await ds.list_ca_keys()}
        objects = _token_objects(softhsm)
        assert _ckid(gone) not in objects
        for lk in r1.keys():  # whatever r1 holds now is still in the token
            assert sorted(objects[_ckid(lk)]) == BOTH
    finally:
        await km1.close()
        await km2.close()


async def test_a_key_made_for_a_slot_that_failed_is_destroyed(softhsm: SoftHsm, ds: SqliteDataStore) -> None:
    km = _manager(softhsm)
    clock = FakeClock(dt.datetime.now(dt.UTC).timestamp())
    ca = CaManager(ds, km, RefusingUpstream(), TrustDomain("example.org"), CA_TTL, clock=clock)
    try:
        before = _token_objects(softhsm)
        with pytest.raises(RuntimeError, match="upstream is down"):
            await ca.load()
        assert _token_objects(softhsm) == before
    finally:
        await km.close()
