"""The agent's own identity: node attestation, its X509-SVID (persisted 0600 so a restart
re-uses it), renewal on the shared rotation policy, and re-attestation when it is refused."""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from meshid.errors import AttestationError, ConfigError
from meshid.spiffe_id import SpiffeId
from meshid.tls import pem_chain, pem_key, spiffe_id_of_cert
from workload_api.config import AgentConfig
from workload_api.keys import csr_for, new_key
from workload_api.rotation import RenewalSchedule, RotationPolicy
from workload_api.server_client import ServerClient, certs_from_json

log = logging.getLogger("meshid.agent.node")

SVID_FILE = "agent_svid.pem"
KEY_FILE = "agent_svid.key"
STATE_FILE = "agent_svid.json"
BUNDLE_FILE = "bundle.json"


def write_private(path: Path, data: bytes) -> None:
    """Write a file only the agent can read, atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


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

    def _persist(self) -> None:
        assert self.key is not None and self.schedule is not None
        write_private(self.dir / KEY_FILE, pem_key(self.key))
        write_private(self.dir / SVID_FILE, pem_chain(self.chain))
        write_private(self.dir / STATE_FILE, json.dumps(
            {"renew_at": self.schedule.renew_at, "drawn_with": self.schedule.drawn_with}).encode())

    def _adopt(self, chain: list[x509.Certificate], key: PrivateKeyTypes, stationary: bool) -> None:
        leaf = chain[0]
        schedule = self.policy.schedule(leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp(),
                                        self.rng, stationary=stationary)
        self._set(chain, key, schedule)
        self._persist()

    async def attest(self) -> dict[str, Any]:
        """Node-attest with the configured credentials; returns the server's bundle document."""
        self.client.clear_identity()
        key = new_key()
        csr = csr_for(key)
        kind = self.config.node_attestor.kind
        if kind == "join_token":
            resp = await self.client.attest("join_token", {"token": self._join_token()}, csr)
        elif kind == "x509pop":
            from attestors.node.x509pop import payload_for, sign_challenge

            cfg = self.config.node_attestor.x509pop
            try:
                node_chain = x509.load_pem_x509_certificates(Path(cfg.certificate_path).read_bytes())
                node_key = serialization.load_pem_private_key(Path(cfg.private_key_path).read_bytes(), None)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"node_attestor.x509pop: cannot load certificate/key: {exc}") from None
            first = await self.client.attest("x509pop", payload_for(node_chain), csr)
            nonce = base64.b64decode(first["challenge"])
            resp = await self.client.answer(first["session"], sign_challenge(node_key, nonce))
        elif kind == "k8s_psat":
            from attestors.node.k8s_psat import K8sPsatAgentPlugin

            payload = K8sPsatAgentPlugin.from_config(self.config.node_attestor.k8s_psat).payload()
            resp = await self.client.attest("k8s_psat", payload, csr)
        else:  # pragma: no cover - config validation prevents this
            raise ConfigError(f"unknown node attestor {kind}")
        chain = certs_from_json(resp.get("svid"))
        if chain[0].public_key().public_numbers() != key.public_key().public_numbers():
            raise AttestationError("server returned an SVID for a different key")
        self._adopt(chain, key, stationary=False)
        log.info("node attested as %s", self.agent_id)
        bundle = resp.get("bundle", {})
        return bundle if isinstance(bundle, dict) else {}

    def _join_token(self) -> str:
        cfg = self.config.node_attestor.join_token
        if cfg.token_file:
            try:
                return Path(cfg.token_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"node_attestor.join_token.token_file: {exc.strerror}") from None
        if not cfg.token:
            raise ConfigError("node_attestor: no credentials configured (join_token, x509pop or k8s_psat)")
        return cfg.token

    def due(self) -> bool:
        return self.schedule is not None and self.clock() >= self.schedule.renew_at

    async def renew(self) -> None:
        key = new_key()
        chain = await self.client.renew(csr_for(key))
        self._adopt(chain, key, stationary=False)
        log.info("renewed agent SVID (expires %s)", chain[0].not_valid_after_utc.isoformat())
