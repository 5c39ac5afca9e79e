"""CA keys at rest: master secret loading, AES-256-GCM sealing, disk key manager, rewrap."""

from __future__ import annotations

import base64
import pickle

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from issuer.ca import keys
from issuer.ca.sealing import MIN_SECRET_BYTES, KeySealer, SealError, load_master_secret
from meshid.errors import ConfigError, MeshidError

SECRET = b"correct horse battery staple 0123"
OTHER = b"a different master secret value!!"


# --------------------------------------------------------------------------- master secret


def test_load_from_file_strips_trailing_newline(tmp_path):
    f = tmp_path / "secret"
    f.write_bytes(SECRET + b"\n")
    assert load_master_secret(str(f), None) == SECRET


def test_load_from_env(monkeypatch):
    monkeypatch.setenv("MESHID_TEST_SECRET", SECRET.decode())
    assert load_master_secret(None, "MESHID_TEST_SECRET") == SECRET


def test_file_takes_precedence_over_env(tmp_path, monkeypatch):
    f = tmp_path / "secret"
    f.write_bytes(SECRET)
    monkeypatch.setenv("MESHID_TEST_SECRET", OTHER.decode())
    assert load_master_secret(str(f), "MESHID_TEST_SECRET") == SECRET


def test_secret_file_readable_by_everyone_is_warned_about(tmp_path, caplog):
    f = tmp_path / "secret"
    f.write_bytes(SECRET)
    f.chmod(0o440)  # owner and group (Kubernetes' fsGroup mounts): fine
    assert load_master_secret(str(f), None) == SECRET
    assert not caplog.records
    f.chmod(0o644)
    assert load_master_secret(str(f), None) == SECRET
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert str(f) in record.getMessage() and "0644" in record.getMessage()
    assert SECRET.decode() not in caplog.text


def test_missing_file_names_path(tmp_path):
    path = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="cannot read") as exc:
        load_master_secret(path, None)
    assert path in str(exc.value)


def test_unset_env_is_config_error(monkeypatch):
    monkeypatch.delenv("MESHID_TEST_SECRET", raising=False)
    with pytest.raises(ConfigError, match="MESHID_TEST_SECRET is not set"):
        load_master_secret(None, "MESHID_TEST_SECRET")


def test_nothing_configured():
    with pytest.raises(ConfigError, match="no master secret"):
        load_master_secret(None, None)


def test_empty_file(tmp_path):
    f = tmp_path / "secret"
    f.write_bytes(b"\n")
    with pytest.raises(ConfigError, match="empty"):
        load_master_secret(str(f), None)


def test_short_secret_refused_without_echoing_it(tmp_path, monkeypatch):
    short = "tooShort-XyZ"
    monkeypatch.setenv("MESHID_TEST_SECRET", short)
    with pytest.raises(ConfigError, match="too short") as exc:
        load_master_secret(None, "MESHID_TEST_SECRET")
    assert short not in str(exc.value)
    f = tmp_path / "secret"
    f.write_text(short)
    with pytest.raises(ConfigError, match=f"at least {MIN_SECRET_BYTES}") as exc:
        load_master_secret(str(f), None)
    assert short not in str(exc.value)


def test_sealer_refuses_short_secret():
    with pytest.raises(ConfigError):
        KeySealer(b"x" * (MIN_SECRET_BYTES - 1))


# --------------------------------------------------------------------------- sealing


def test_roundtrip():
    sealer = KeySealer(SECRET)
    blob = sealer.seal(b"private key bytes", b"x509-abc")
    assert blob[0] == 1  # format version
    assert b"private key bytes" not in blob
    assert sealer.unseal(blob, b"x509-abc") == b"private key bytes"
    # Random nonces: sealing twice never gives the same blob.
    assert sealer.seal(b"private key bytes", b"x509-abc") != blob


def test_same_secret_new_sealer_opens_blob():
    blob = KeySealer(SECRET).seal(b"k", b"id")
    assert KeySealer(SECRET).unseal(blob, b"id") == b"k"


def test_wrong_secret_fails():
    blob = KeySealer(SECRET).seal(b"k", b"id")
    with pytest.raises(SealError, match="master secret does not match") as exc:
        KeySealer(OTHER).unseal(blob, b"id")
    assert isinstance(exc.value, MeshidError)


@pytest.mark.parametrize("index", [1, 5, 13, 20, -1])  # nonce, ciphertext, tag
def test_tampered_blob_fails(index):
    sealer = KeySealer(SECRET)
    blob = bytearray(sealer.seal(b"some plaintext key", b"id"))
    blob[index] ^= 0x01
    with pytest.raises(SealError, match="master secret does not match"):
        sealer.unseal(bytes(blob), b"id")


def test_unknown_version_and_truncation():
    sealer = KeySealer(SECRET)
    blob = sealer.seal(b"k", b"id")
    with pytest.raises(SealError, match="version 2"):
        sealer.unseal(b"\x02" + blob[1:], b"id")
    with pytest.raises(SealError, match="truncated"):
        sealer.unseal(blob[:20], b"id")
    with pytest.raises(SealError, match="empty"):
        sealer.unseal(b"", b"id")


def test_aad_mismatch_fails():
    sealer = KeySealer(SECRET)
    blob = sealer.seal(b"k", b"x509-key-1")
    with pytest.raises(SealError):
        sealer.unseal(blob, b"x509-key-2")


def test_secret_never_in_repr_or_pickle():
    sealer = KeySealer(SECRET)
    for text in (repr(sealer), str(sealer), repr(keys.DiskKeyManager(sealer))):
        assert SECRET.decode() not in text
        assert base64.b64encode(SECRET).decode() not in text
        assert SECRET.hex() not in text
    assert not hasattr(sealer, "__dict__")  # nothing but the derived AEAD is stored
    with pytest.raises(TypeError):
        pickle.dumps(sealer)


# --------------------------------------------------------------------------- key types and manager


def test_key_type_parse():
    assert keys.KeyType.parse("ec-p256") is keys.KeyType.EC_P256
    assert keys.KeyType.parse("RSA-3072") is keys.KeyType.RSA_3072
    assert keys.DEFAULT_KEY_TYPE is keys.KeyType.EC_P256
    with pytest.raises(ConfigError) as exc:
        keys.KeyType.parse("ed25519")
    for valid in ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072"):
        assert valid in str(exc.value)


@pytest.mark.parametrize(
    ("kt", "alg"),
    [(keys.KeyType.EC_P256, "ES256"), (keys.KeyType.EC_P384, "ES384"), (keys.KeyType.RSA_2048, "RS256")],
)
def test_generate_and_jwt_alg(kt, alg):
    key = keys.generate_private_key(kt)
    assert keys.key_type_of(key) is kt
    assert keys.jwt_alg_for(key) == alg
    assert keys.jwt_alg_for(key.public_key()) == alg


def test_jwt_alg_pss_and_refusals():
    rsa_key = keys.generate_private_key(keys.KeyType.RSA_2048)
    assert keys.jwt_alg_for(rsa_key, rsa_alg="PS256") == "PS256"
    with pytest.raises(ConfigError):
        keys.jwt_alg_for(rsa_key, rsa_alg="HS256")
    with pytest.raises(ConfigError):
        keys.jwt_alg_for(ec.generate_private_key(ec.SECP256K1()))


def test_key_id_is_short_stable_and_url_safe():
    key = keys.generate_private_key(keys.KeyType.EC_P256)
    kid = keys.key_id_for(key)
    assert kid == keys.key_id_for(key.public_key())
    assert len(kid) == keys.KEY_ID_LENGTH
    assert set(kid) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert kid != keys.key_id_for(keys.generate_private_key(keys.KeyType.EC_P256))


@pytest.mark.parametrize("kt", list(keys.KeyType))
async def test_disk_key_manager_roundtrip(kt):
    km = keys.DiskKeyManager(KeySealer(SECRET))
    assert km.name == "disk"
    key, sealed = await km.generate("x509-1", kt)
    assert keys.key_type_of(key) is kt
    loaded = await km.load("x509-1", sealed)
    assert keys.key_id_for(loaded) == keys.key_id_for(key)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)


async def test_disk_key_manager_seal_existing_key_and_bind_to_id():
    km = keys.DiskKeyManager(KeySealer(SECRET))
    key = keys.generate_private_key(keys.KeyType.EC_P256)
    kid = f"x509-{keys.key_id_for(key)}"
    sealed = await km.seal(kid, key)
    assert keys.key_id_for(await km.load(kid, sealed)) == keys.key_id_for(key)
    with pytest.raises(SealError):
        await km.load("x509-other", sealed)  # a blob cannot be moved to another record
    with pytest.raises(SealError, match="master secret does not match"):
        await keys.DiskKeyManager(KeySealer(OTHER)).load(kid, sealed)


async def test_rewrap():
    old, new = KeySealer(SECRET), KeySealer(OTHER)
    km_old, km_new = keys.DiskKeyManager(old), keys.DiskKeyManager(new)
    key, sealed = await km_old.generate("jwt-1", keys.KeyType.EC_P384)
    rewrapped = keys.rewrap(sealed, old, new, "jwt-1")
    assert keys.key_id_for(await km_new.load("jwt-1", rewrapped)) == keys.key_id_for(key)
    with pytest.raises(SealError):
        await km_old.load("jwt-1", rewrapped)
    # A wrong old secret fails before anything is produced.
    with pytest.raises(SealError):
        keys.rewrap(sealed, new, old, "jwt-1")
