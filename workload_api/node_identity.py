"""The agent's own identity: node attestation, its X509-SVID (persisted 0600 so a restart
re-uses it), renewal on the shared rotation policy, and re-attestation when it is refused.

The SVID is persisted together with its drawn renewal time, so a restarted agent renews
at the moment drawn when the SVID was issued instead of drawing again (SPEC-EVENTS
"Rotation policy": drawn once per SVID).
"""

from __future__ import annotations

import base64
import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from meshid.durable_files import replace_together, write_off_loop
from meshid.errors import ConfigError
from meshid.spiffe_id import SpiffeId, TrustDomain
from meshid.tls import pem_chain, pem_key, spiffe_id_of_cert
from workload_api.config import AgentConfig
from workload_api.keys import authority_key_id, csr_for, issued_svid_problem, new_key
from workload_api.rotation import RenewalSchedule, RotationPolicy, effective_issued_at
from workload_api.server_client import ServerClient, bad_response, certs_from_json

log = logging.getLogger("meshid.agent.node")

SVID_FILE = "agent_svid.pem"
KEY_FILE = "agent_svid.key"
STATE_FILE = "agent_svid.json"
BUNDLE_FILE = "bundle.json"


def _x509pop_challenge(answer: dict[str, Any]) -> tuple[bytes, str]:
    """The nonce to sign and the session to answer, from the server's first x509pop answer."""
    challenge, session = answer.get("challenge"), answer.get("session")
    if not isinstance(challenge, str) or not isinstance(session, str) or not session:
        raise bad_response("x509pop answer has no challenge and session strings")
    try:
        nonce = base64.b64decode(challenge, validate=True)
    except ValueError:  # binascii.Error
        raise bad_response("x509pop challenge is not base64") from None
    if not nonce:
        raise bad_response("x509pop challenge is empty")
    return nonce, session


class NodeIdentity:
    def __init__(
        self, config: AgentConfig, client: ServerClient, policy: RotationPolicy, rng: random.Random,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.client = client
        self.policy = policy
        self.rng = rng
        self.clock = clock
        self.dir = config.state_dir
        self.chain: list[x509.Certificate] = []
        self.key: PrivateKeyTypes | None = None
        self.schedule: RenewalSchedule | None = None
        self.agent_id: SpiffeId | None = None

    @property
    def valid(self) -> bool:
        return bool(self.chain) and self.chain[0].not_valid_after_utc.timestamp() > self.clock()

    @property
    def authority_key_id(self) -> str:
        """AKI (hex) of the agent SVID: which CA key signed it, to match against tainted keys."""
        return authority_key_id(self.chain[0]) if self.chain else ""

    def load(self) -> bool:
        """Re-use a persisted agent SVID if it is still valid."""
        try:
            chain = x509.load_pem_x509_certificates((self.dir / SVID_FILE).read_bytes())
            key = serialization.load_pem_private_key((self.dir / KEY_FILE).read_bytes(), None)
            state = json.loads((self.dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return False
        if chain[0].not_valid_after_utc.timestamp() <= self.clock():
            return False
        self._set(chain, key, RenewalSchedule(float(state["renew_at"]), state.get("drawn_with", "uniform")))
        log.info("re-using persisted agent SVID %s", self.agent_id)
        return True

    def _set(self, chain: list[x509.Certificate], key: PrivateKeyTypes, schedule: RenewalSchedule) -> None:
        self.chain, self.key, self.schedule = chain, key, schedule
        self.agent_id = spiffe_id_of_cert(chain[0])
        self.client.set_identity(chain, key)

    async def _persist(
        self, chain: list[x509.Certificate], key: PrivateKeyTypes, schedule: RenewalSchedule
    ) -> None:
        """Every file is written and synced before any replaces its predecessor: a write
        that fails (disk full) left the new key beside the old SVID, a pair a restarted
        agent could not use, while the old SVID was still the one the server accepts.
        Written on a thread: its fsyncs on a slow disk would hold every workload's stream."""
        state = json.dumps({"renew_at": schedule.renew_at, "drawn_with": schedule.drawn_with}).encode()
        await write_off_loop(replace_together, [
            (self.dir / KEY_FILE, pem_key(key), 0o600),
            (self.dir / SVID_FILE, pem_chain(chain), 0o600),
            (self.dir / STATE_FILE, state, 0o600),
        ])

    async def _adopt(
        self, chain: list[x509.Certificate], key: PrivateKeyTypes, stationary: bool, renewal: bool
    ) -> None:
        leaf = chain[0]
        # Checked before anything is replaced: a renewed SVID over another key was adopted
        # and persisted, and every mTLS context built from it failed from then on, across
        # restarts; one without a SPIFFE ID replaced the chain and then raised.
        wrong = _unusable(leaf, key, self.config.td, self.clock())
        if wrong:
            raise bad_response(f"server returned an agent SVID {wrong}")
        not_before, not_after = leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
        issued_at = effective_issued_at(not_before, not_after, self.clock())
        schedule = self.policy.schedule(issued_at, not_after, self.rng, stationary=stationary)
        if renewal:
            # On disk before in use: the server accepts the previous SVID until this one is
            # presented, so if it cannot be saved the agent goes on with the previous one (a
            # restart would otherwise bring back an SVID the server then refuses).
            await self._persist(chain, key, schedule)
            self._set(chain, key, schedule)
        else:
            # An attestation has replaced the previous SVID on the server already (and a
            # join token is spent): the new one is used even if it cannot be saved.
            self._set(chain, key, schedule)
            await self._persist(chain, key, schedule)

    async def attest(self) -> dict[str, Any]:
        """Node-attest with the configured credentials; returns the server's bundle document.

        The current identity stays in place until a new one is adopted: attestation runs on
        the anonymous session anyway, and if it fails (a used join token, say) the agent
        keeps what it had rather than being left with no identity at all.
        """
        key = new_key()
        csr = csr_for(key)
        kind = self.config.node_attestor.kind
        if kind == "join_token":
            resp = await self.client.attest("join_token", {"token": self._join_token()}, csr)
        elif kind == "x509pop":
            from attestors.node.x509pop import payload_for, sign_challenge

            node_chain, node_key = self._x509pop_credentials()
            first = await self.client.attest("x509pop", payload_for(node_chain), csr)
            nonce, session = _x509pop_challenge(first)
            resp = await self.client.answer(session, sign_challenge(node_key, nonce))
        elif kind == "k8s_psat":
            from attestors.node.k8s_psat import K8sPsatAgentPlugin

            payload = K8sPsatAgentPlugin.from_config(self.config.node_attestor.k8s_psat).payload()
            resp = await self.client.attest("k8s_psat", payload, csr)
        else:  # pragma: no cover - config validation prevents this
            raise ConfigError(f"unknown node attestor {kind}")
        chain = certs_from_json(resp.get("svid"))
        await self._adopt(chain, key, stationary=False, renewal=False)  # checks the SVID is for `key` first
        log.info("node attested as %s", self.agent_id)
        bundle = resp.get("bundle", {})
        return bundle if isinstance(bundle, dict) else {}

    def _x509pop_credentials(self) -> tuple[list[x509.Certificate], PrivateKeyTypes]:
        # Re-read on every attestation so a node certificate renewed on disk is picked up.
        cfg = self.config.node_attestor.x509pop
        try:
            node_chain = x509.load_pem_x509_certificates(Path(cfg.certificate_path).read_bytes())
            node_key = serialization.load_pem_private_key(Path(cfg.private_key_path).read_bytes(), None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"node_attestor.x509pop: cannot load certificate/key: {exc}") from None
        return node_chain, node_key

    def _join_token(self) -> str:
        cfg = self.config.node_attestor.join_token
        if cfg.token_file:
            try:
                return Path(cfg.token_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"node_attestor.join_token.token_file {cfg.token_file}: cannot read it ({exc.strerror})"
                ) from None
        if not cfg.token:
            raise ConfigError("node_attestor: no credentials configured (join_token, x509pop or k8s_psat)")
        return cfg.token

    def due(self) -> bool:
        return self.schedule is not None and self.clock() >= self.schedule.renew_at

    async def renew(self, stationary: bool = False) -> None:
        """Renew over mTLS; `stationary` after a mass event (CA taint) so agents do not stay in step."""
        key = new_key()
        chain = await self.client.renew(csr_for(key))
        await self._adopt(chain, key, stationary=stationary, renewal=True)
        log.info("renewed agent SVID (expires %s)", chain[0].not_valid_after_utc.isoformat())


def _unusable(leaf: x509.Certificate, key: PrivateKeyTypes, td: TrustDomain, now: float) -> str:
    """Why `leaf` cannot be the agent's SVID over `key` in `td` at `now` ("" if it can)."""
    why, agent_id = issued_svid_problem(leaf, key, now)
    if not why and agent_id is not None and not agent_id.member_of(td):
        why = f"for {agent_id}, outside trust domain {td}"
    return why
