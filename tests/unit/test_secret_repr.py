"""Objects holding secrets keep them out of their repr: a repr lands in logs and in
exception messages (a dataclass's default repr printed a workload's private key DER)."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestors.node.join_token import new_token
from issuer.events.relay import KafkaConfig
from meshid.spiffe_id import SpiffeId, TrustDomain
from workload_api.cache import X509Svid
from workload_api.config import JoinTokenAgentConfig
from workload_api.manager import JwtSvid
from workload_api.rotation import RenewalSchedule

SCHEDULE = RenewalSchedule(0.0, "uniform")


def test_x509_svid_repr_has_no_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    svid = X509Svid("e1", SpiffeId(TrustDomain.parse("example.org"), "/w"), (), key, SCHEDULE, 1, key_der=der)
    text = repr(svid)
    assert "e1" in text and repr(der) not in text and repr(der[:16])[2:-1] not in text


def test_bearer_credentials_are_not_in_repr() -> None:
    sid = SpiffeId.parse("spiffe://example.org/w")
    jwt = JwtSvid("eyJhbGciOi.secret-claims.signature", sid, 0.0, SCHEDULE)
    assert "secret-claims" not in repr(jwt)
    tok = new_token(60)
    assert tok.token not in repr(tok) and tok.token_id in repr(tok)
    assert "join-secret" not in repr(JoinTokenAgentConfig(token="join-secret"))
    kafka = KafkaConfig(("127.0.0.1:9092",), sasl_username="soc", sasl_password="hunter2")
    assert "hunter2" not in repr(kafka) and "soc" in repr(kafka)
