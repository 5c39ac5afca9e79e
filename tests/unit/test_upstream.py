"""Upstream authorities, checked against a chain made by the openssl CLI and verified by
`openssl verify` (an independent X.509 implementation)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from issuer.ca import keys, minting
from issuer.ca.minting import InvalidCsrError
from issuer.ca.upstream import DiskUpstreamAuthority, SelfSignedAuthority, UpstreamAuthority
from meshid.errors import ConfigError
from meshid.spiffe_id import SpiffeId, TrustDomain

# Under CI the tests run regardless, and fail without the openssl CLI: CI must not skip them.
pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None and not os.environ.get("CI"), reason="needs the openssl CLI"
)

TD = TrustDomain("example.org")
WORKLOAD = SpiffeId.parse("spiffe://example.org/ns/prod/sa/web")
PEM = serialization.Encoding.PEM

def _ext_section(name: str, constraints: str, usage: str = "keyCertSign, cRLSign") -> str:
    """One openssl -extensions section: CA or not (path length), key usage, key ids."""
    return (f"[{name}]\nbasicConstraints = critical, {constraints}\nkeyUsage = critical, {usage}\n"
            "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n")


EXTENSIONS = "".join([
    _ext_section("v3_int", "CA:TRUE, pathlen:1"),
    _ext_section("v3_int_pathlen0", "CA:TRUE, pathlen:0"),
    _ext_section("v3_int_pathlen2", "CA:TRUE, pathlen:2"),
    _ext_section("v3_sub", "CA:TRUE"),
    _ext_section("v3_leafish", "CA:FALSE", "digitalSignature"),
])


def _openssl(*args: str, cwd: Path) -> str:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"openssl {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc.stdout + proc.stderr


def _openssl_fails(*args: str, cwd: Path) -> bool:
    return subprocess.run(["openssl", *args], cwd=cwd, capture_output=True).returncode != 0


def _make_root(d: Path, constraints: str = "CA:TRUE") -> None:
    """P-384 root, with basicConstraints `constraints`."""
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384", "-out", "root.key", cwd=d)
    _openssl(
        "req", "-x509", "-new", "-key", "root.key", "-sha384", "-days", "30", "-subj", "/O=Test/CN=Test Root",
        "-addext", f"basicConstraints=critical,{constraints}",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", "root.pem",
        cwd=d,
    )  # fmt: skip


def _make_intermediate(
    d: Path, name: str, days: int = 10, section: str = "v3_int", signer: str = "root"
) -> None:
    """P-256 CA `name`.pem/.key signed by `signer` (the root unless told)."""
    (d / "ext.cnf").write_text(EXTENSIONS)
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key", cwd=d
    )
    _openssl(
        "req", "-new", "-key", f"{name}.key", "-subj", f"/O=Test/CN={name}", "-out", f"{name}.csr", cwd=d
    )
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{signer}.pem", "-CAkey", f"{signer}.key",
        "-CAcreateserial", "-days", str(days), "-sha384", "-extfile", "ext.cnf", "-extensions", section,
        "-out", f"{name}.pem",
        cwd=d,
    )  # fmt: skip


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    _make_root(tmp_path)
    _make_intermediate(tmp_path, "int")
    return tmp_path


def _upstream(d: Path, cert: str = "int.pem", key: str = "int.key", bundle: str = "root.pem", **kw):
    return DiskUpstreamAuthority(str(d / cert), str(d / key), str(d / bundle), **kw)


def _write_pem(path: Path, certs) -> None:
    path.write_bytes(b"".join(c.public_bytes(PEM) for c in certs))


def _now() -> dt.datetime:
    # openssl verify checks validity against the real clock.
    return dt.datetime.now(dt.UTC)


def _ext(cert, cls):
    return cert.extensions.get_extension_for_class(cls).value


@pytest.mark.parametrize("ca_type", [keys.KeyType.EC_P256, keys.KeyType.RSA_2048])
@pytest.mark.parametrize("leaf_type", ["ec", "rsa"])
async def test_chain_verifies_with_openssl(pki: Path, ca_type, leaf_type):
    upstream: UpstreamAuthority = _upstream(pki)
    ca_key = keys.generate_private_key(ca_type)
    now = _now()
    result = await upstream.mint_x509_ca(minting.build_ca_csr(ca_key, TD), 24 * 3600, now)

    intermediate = x509.load_pem_x509_certificate((pki / "int.pem").read_bytes())
    root = x509.load_pem_x509_certificate((pki / "root.pem").read_bytes())
    assert result.upstream_chain == [intermediate]
    assert result.roots == [root]
    ca = result.ca_cert
    ca.verify_directly_issued_by(intermediate)
    assert ca.issuer == intermediate.subject
    assert ca.public_key() == ca_key.public_key()
    bc = _ext(ca, x509.BasicConstraints)
    assert bc.ca and bc.path_length == 0
    assert _ext(ca, x509.SubjectAlternativeName).get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org"
    ]
    assert (
        _ext(ca, x509.AuthorityKeyIdentifier).key_identifier
        == _ext(intermediate, x509.SubjectKeyIdentifier).digest
    )

    leaf_key = (
        ec.generate_private_key(ec.SECP256R1())
        if leaf_type == "ec"
        else keys.generate_private_key(keys.KeyType.RSA_2048)
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(leaf_key, minting.signature_hash_for(leaf_key))
    )
    minter = minting.X509Minter(ca_key, ca, result.upstream_chain)
    assert minter.fast_path
    leaf = minter.mint_from_csr(
        csr.public_bytes(serialization.Encoding.DER), WORKLOAD, ["web.example.org"], 3600, now
    )
    (pki / "leaf.pem").write_bytes(leaf.public_bytes(PEM))
    _write_pem(pki / "chain.pem", [ca, *result.upstream_chain])
    for purpose in ("sslclient", "sslserver"):
        out = _openssl(
            "verify", "-x509_strict", "-purpose", purpose, "-CAfile", "root.pem", "-untrusted", "chain.pem",
            "leaf.pem",
            cwd=pki,
        )  # fmt: skip
        assert "leaf.pem: OK" in out
    # The chain without the intermediate must not verify: roots alone are not enough.
    _write_pem(pki / "ca-only.pem", [ca])
    assert _openssl_fails("verify", "-CAfile", "root.pem", "-untrusted", "ca-only.pem", "leaf.pem", cwd=pki)


async def test_not_after_clamped_to_upstream(pki: Path):
    ca_key = keys.generate_private_key(keys.KeyType.EC_P256)
    result = await _upstream(pki).mint_x509_ca(minting.build_ca_csr(ca_key, TD), 90 * 24 * 3600, _now())
    intermediate = x509.load_pem_x509_certificate((pki / "int.pem").read_bytes())
    assert result.ca_cert.not_valid_after_utc == intermediate.not_valid_after_utc


async def test_rotated_files_are_picked_up_without_restart(pki: Path):
    upstream = _upstream(pki)
    ca_key = keys.generate_private_key(keys.KeyType.EC_P256)
    first = await upstream.mint_x509_ca(minting.build_ca_csr(ca_key, TD), 3600, _now())
    _make_intermediate(pki, "int2")
    (pki / "int.pem").write_bytes((pki / "int2.pem").read_bytes())
    (pki / "int.key").write_bytes((pki / "int2.key").read_bytes())
    second = await upstream.mint_x509_ca(minting.build_ca_csr(ca_key, TD), 3600, _now())
    new_int = x509.load_pem_x509_certificate((pki / "int2.pem").read_bytes())
    assert second.upstream_chain == [new_int]
    second.ca_cert.verify_directly_issued_by(new_int)
    assert first.ca_cert.issuer != second.ca_cert.issuer


async def test_explicit_trust_domain_sets_san(pki: Path):
    ca_key = keys.generate_private_key(keys.KeyType.EC_P256)
    # A CSR without any SAN: the trust domain comes from the authority's configuration.
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(minting.ca_subject())
        .sign(ca_key, minting.signature_hash_for(ca_key))
    )
    der = csr.public_bytes(serialization.Encoding.DER)
    result = await _upstream(pki, trust_domain=TD).mint_x509_ca(der, 3600, _now())
    assert minting.trust_domain_of(result.ca_cert) == TD
    with pytest.raises(InvalidCsrError, match="URI SAN"):
        await _upstream(pki).mint_x509_ca(der, 3600, _now())


@pytest.mark.parametrize(
    ("uris", "refusal"),
    [
        (["spiffe://example.org/ca"], "without a path"),  # a CA's SPIFFE ID has no path
        (["spiffe://example.org", "spiffe://other.org"], "exactly one"),
        (["https://example.org"], "not a SPIFFE ID"),
    ],
)
async def test_ca_csr_must_name_the_trust_domain_id_only(pki: Path, uris: list[str], refusal: str):
    ca_key = keys.generate_private_key(keys.KeyType.EC_P256)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(minting.ca_subject())
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), False)
        .sign(ca_key, minting.signature_hash_for(ca_key))
    )
    with pytest.raises(InvalidCsrError, match=refusal):
        await _upstream(pki).mint_x509_ca(csr.public_bytes(serialization.Encoding.DER), 3600, _now())


async def test_csr_signature_checked(pki: Path):
    csr = bytearray(minting.build_ca_csr(keys.generate_private_key(keys.KeyType.EC_P256), TD))
    csr[-1] ^= 1
    with pytest.raises(InvalidCsrError, match="signature"):
        await _upstream(pki).mint_x509_ca(bytes(csr), 3600, _now())


async def test_root_as_upstream(pki: Path):
    ca_key = keys.generate_private_key(keys.KeyType.EC_P256)
    result = await _upstream(pki, cert="root.pem", key="root.key").mint_x509_ca(
        minting.build_ca_csr(ca_key, TD), 3600, _now()
    )
    root = x509.load_pem_x509_certificate((pki / "root.pem").read_bytes())
    assert result.upstream_chain == []
    assert result.roots == [root]
    assert isinstance(result.ca_cert.signature_hash_algorithm, hashes.SHA384)  # P-384 signer
    result.ca_cert.verify_directly_issued_by(root)


async def test_cert_file_with_chain(pki: Path):
    """cert_file may carry the chain above the signer; roots in it are not handed out."""
    (pki / "full.pem").write_bytes((pki / "int.pem").read_bytes() + (pki / "root.pem").read_bytes())
    ca_key = keys.generate_private_key(keys.KeyType.EC_P256)
    result = await _upstream(pki, cert="full.pem").mint_x509_ca(
        minting.build_ca_csr(ca_key, TD), 3600, _now()
    )
    assert [c.subject.rfc4514_string() for c in result.upstream_chain] == ["CN=int,O=Test"]


# --------------------------------------------------------------------------- configuration errors


def _csr() -> bytes:
    return minting.build_ca_csr(keys.generate_private_key(keys.KeyType.EC_P256), TD)


def test_missing_file(pki: Path):
    with pytest.raises(ConfigError, match="cannot read") as exc:
        _upstream(pki, cert="missing.pem").mint_x509_ca_sync(_csr(), 3600, _now())
    assert "missing.pem" in str(exc.value)


def test_garbage_files(pki: Path):
    (pki / "junk.pem").write_text("not pem\n")
    with pytest.raises(ConfigError, match="no valid PEM certificates"):
        _upstream(pki, cert="junk.pem").mint_x509_ca_sync(_csr(), 3600, _now())
    with pytest.raises(ConfigError, match="not a valid PEM private key") as exc:
        _upstream(pki, key="junk.pem").mint_x509_ca_sync(_csr(), 3600, _now())
    assert "junk.pem" in str(exc.value)
    (pki / "empty.pem").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        _upstream(pki, bundle="empty.pem").mint_x509_ca_sync(_csr(), 3600, _now())


def test_key_file_readable_by_everyone_is_warned_about(pki: Path, caplog: pytest.LogCaptureFixture):
    (pki / "int.key").chmod(0o600)
    _upstream(pki).mint_x509_ca_sync(_csr(), 3600, _now())
    assert not [r for r in caplog.records if "key_file" in r.getMessage()]
    (pki / "int.key").chmod(0o644)
    _upstream(pki).mint_x509_ca_sync(_csr(), 3600, _now())
    (record,) = [r for r in caplog.records if "key_file" in r.getMessage()]
    assert record.levelname == "WARNING" and str(pki / "int.key") in record.getMessage()


def test_key_does_not_match_cert(pki: Path):
    _make_intermediate(pki, "other")
    with pytest.raises(ConfigError, match="does not match"):
        _upstream(pki, key="other.key").mint_x509_ca_sync(_csr(), 3600, _now())


def test_encrypted_key_refused(pki: Path):
    key = serialization.load_pem_private_key((pki / "int.key").read_bytes(), None)
    (pki / "enc.key").write_bytes(
        key.private_bytes(
            PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
        )
    )
    with pytest.raises(ConfigError, match="encrypted"):
        _upstream(pki, key="enc.key").mint_x509_ca_sync(_csr(), 3600, _now())


def test_pathlen_zero_upstream_refused(pki: Path):
    _make_intermediate(pki, "p0", section="v3_int_pathlen0")
    with pytest.raises(ConfigError, match="pathLenConstraint 0"):
        _upstream(pki, cert="p0.pem", key="p0.key").mint_x509_ca_sync(_csr(), 3600, _now())


def _make_sub(d: Path, parent: str) -> None:
    """CA `sub` (no pathlen of its own) signed by the intermediate `parent`."""
    _make_intermediate(d, "sub", section="v3_sub", signer=parent)
    (d / "sub-chain.pem").write_bytes((d / "sub.pem").read_bytes() + (d / f"{parent}.pem").read_bytes())


def test_pathlen_above_the_signer_is_checked(pki: Path):
    # root -> int (pathlen 1) -> sub -> the issuer's CA -> SVID: two CAs below int. Only the
    # signer's own pathlen was checked, so the CA was minted and no SVID of it verified.
    _make_sub(pki, "int")
    with pytest.raises(ConfigError, match="'CN=int,O=Test' has pathLenConstraint 1, but 2"):
        _upstream(pki, cert="sub-chain.pem", key="sub.key").mint_x509_ca_sync(_csr(), 3600, _now())


def test_pathlen_of_the_root_is_checked(tmp_path: Path):
    _make_root(tmp_path, "CA:TRUE,pathlen:1")
    _make_intermediate(tmp_path, "int")
    with pytest.raises(ConfigError, match=r"bundle_file .* has pathLenConstraint 1, but 2"):
        _upstream(tmp_path).mint_x509_ca_sync(_csr(), 3600, _now())


async def test_deeper_chain_within_pathlen_verifies_with_openssl(pki: Path):
    _make_intermediate(pki, "int2", section="v3_int_pathlen2")
    _make_sub(pki, "int2")
    ca_key = keys.generate_private_key(keys.KeyType.EC_P256)
    now = _now()
    result = await _upstream(pki, cert="sub-chain.pem", key="sub.key").mint_x509_ca(
        minting.build_ca_csr(ca_key, TD), 3600, now)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(leaf_key, hashes.SHA256())
    leaf = minting.X509Minter(ca_key, result.ca_cert, result.upstream_chain).mint_from_csr(
        csr.public_bytes(serialization.Encoding.DER), WORKLOAD, [], 600, now)
    (pki / "leaf.pem").write_bytes(leaf.public_bytes(PEM))
    _write_pem(pki / "chain.pem", [result.ca_cert, *result.upstream_chain])
    out = _openssl("verify", "-x509_strict", "-CAfile", "root.pem", "-untrusted", "chain.pem", "leaf.pem",
                   cwd=pki)
    assert "leaf.pem: OK" in out


def test_non_ca_upstream_refused(pki: Path):
    _make_intermediate(pki, "leafish", section="v3_leafish")
    with pytest.raises(ConfigError, match="not a CA"):
        _upstream(pki, cert="leafish.pem", key="leafish.key").mint_x509_ca_sync(_csr(), 3600, _now())


def test_chain_must_reach_bundle(pki: Path, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    _make_root(other)
    shutil.copy(other / "root.pem", pki / "other-root.pem")
    with pytest.raises(ConfigError, match="no root issued"):
        _upstream(pki, bundle="other-root.pem").mint_x509_ca_sync(_csr(), 3600, _now())


def test_expired_upstream_refused(pki: Path):
    later = _now() + dt.timedelta(days=11)
    with pytest.raises(ConfigError, match="expired"):
        _upstream(pki).mint_x509_ca_sync(_csr(), 3600, later)


# --------------------------------------------------------------------------- self-signed


def test_self_signed_authority(tmp_path: Path):
    ca_key = keys.generate_private_key(keys.KeyType.EC_P384)
    now = _now()
    result = SelfSignedAuthority(TD).mint_self_signed(ca_key, 3600, now)
    assert result.upstream_chain == []
    assert result.roots == [result.ca_cert]
    result.ca_cert.verify_directly_issued_by(result.ca_cert)
    leaf_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = minting.X509Minter(ca_key, result.ca_cert).mint_from_public_key(
        leaf_key.public_key(), WORKLOAD, [], 600, now
    )
    (tmp_path / "root.pem").write_bytes(result.ca_cert.public_bytes(PEM))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(PEM))
    out = _openssl(
        "verify", "-x509_strict", "-purpose", "sslclient", "-CAfile", "root.pem", "leaf.pem", cwd=tmp_path
    )
    assert "leaf.pem: OK" in out
