"""Agent configuration: built once from TOML (+ env overrides) and validated up front."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshid.configload import Duration, Port, build, check_identity_basics, check_spiffe_ids, doc, load_file
from meshid.errors import ConfigError
from meshid.spiffe_id import TrustDomain
from workload_api.keys import WORKLOAD_KEY_TYPES


@dataclass
class JoinTokenAgentConfig:
    token: str = doc("join token from `meshid token create` (single use)", default="", secret=True)
    token_file: str = doc("file holding the join token (preferred over `token`)", default="")


@dataclass
class X509PopAgentConfig:
    certificate_path: str = doc("node certificate chain (PEM, leaf first)", default="")
    private_key_path: str = doc("node private key (PEM)", default="")


@dataclass
class NodeAttestorConfig:
    join_token: JoinTokenAgentConfig = field(default_factory=JoinTokenAgentConfig)
    x509pop: X509PopAgentConfig = field(default_factory=X509PopAgentConfig)
    k8s_psat: dict[str, Any] = doc("k8s_psat: cluster, token_path", default_factory=dict)

    def validate(self) -> None:
        chosen = [n for n, on in (
            ("join_token", bool(self.join_token.token or self.join_token.token_file)),
            ("x509pop", bool(self.x509pop.certificate_path)),
            ("k8s_psat", bool(self.k8s_psat)),
        ) if on]
        if len(chosen) > 1:
            raise ConfigError(f"node_attestor: configure exactly one of join_token, x509pop, k8s_psat "
                              f"(got {', '.join(chosen)})")
        if self.x509pop.certificate_path and not self.x509pop.private_key_path:
            raise ConfigError("node_attestor.x509pop.private_key_path: required with certificate_path")

    @property
    def kind(self) -> str:
        if self.x509pop.certificate_path:
            return "x509pop"
        if self.k8s_psat:
            return "k8s_psat"
        return "join_token"


@dataclass
class UnixAttestorConfig:
    discover_workload_path: bool = doc("add unix:path and unix:sha256 selectors", default=False)
    workload_size_limit: int = doc(
        "largest binary hashed for unix:sha256 (bytes); 0 = no limit, negative = never hash",
        default=64 * 1024 * 1024,
    )


@dataclass
class WorkloadAttestorsConfig:
    unix: UnixAttestorConfig = field(default_factory=UnixAttestorConfig)
    systemd: bool = doc("add systemd:id selectors", default=True)
    # A table's presence turns its attestor on, as a plugin block does in SPIRE: an empty
    # [workload_attestors.docker] means "on, with the defaults", not "off".
    k8s: dict[str, Any] | None = doc(
        "k8s workload attestor settings (see docs/kubernetes.md); on when the table is present, "
        "even empty (all defaults)",
        default=None,
    )
    docker: dict[str, Any] | None = doc(
        "docker workload attestor settings (see docs/kubernetes.md); on when the table is present, "
        "even empty (all defaults)",
        default=None,
    )


@dataclass
class RotationConfig:
    window_start: float = doc("renew at a uniformly drawn fraction of lifetime, from here…", default=0.5)
    window_end: float = doc("…to here", default=0.8)

    def validate(self) -> None:
        if not 0 < self.window_start <= self.window_end < 1:
            raise ConfigError("rotation: need 0 < window_start <= window_end < 1")


@dataclass
class HealthConfig:
    enabled: bool = doc("serve /live, /ready and /metrics over plain HTTP", default=True)
    address: str = doc("bind address (loopback by default)", default="127.0.0.1")
    port: Port = doc("port; 0 = any free port", default=8089)


@dataclass
class AgentConfig:
    trust_domain: str = doc("trust domain name", default="")
    data_dir: str = doc("agent state: its own SVID and key (0600)", default="")
    log_level: str = doc("debug, info, warning, error", default="info")
    server_address: list[str] = doc("server agent-API addresses host:port; tried in order (failover)",
                                    default_factory=list)
    trust_bundle_path: str = doc("PEM root bundle used to authenticate the server at bootstrap", default="")
    socket_path: str = doc("Workload API socket", default="/run/meshid/sockets/agent.sock")
    admin_socket_path: str = doc("Delegated Identity API socket (empty = off)", default="")
    authorized_delegates: list[str] = doc("SPIFFE IDs allowed on the admin socket (e.g. Cilium)",
                                          default_factory=list)
    allow_unauthenticated_verifiers: bool = doc(
        "release the own trust domain's bundle (FetchX509Bundles, FetchJWTBundles) to workloads "
        "matching no entry, which are otherwise refused (SPIRE's option of the same name)",
        default=False)
    allowed_foreign_jwt_claims: list[str] = doc(
        "claims ValidateJWTSVID returns from another trust domain's JWT-SVIDs besides sub, exp and "
        "aud; all others are dropped (SPIRE's option of the same name)", default_factory=list)
    sync_interval: Duration = doc("how often entries and bundle are synced", default=Duration(5))
    max_connections_per_uid: int = doc(
        "Workload API (and SDS) connections one caller uid may hold open; its further ones are closed "
        "at once, so one local user cannot take every file descriptor the agent has. All connections "
        "together are also held to the agent's RLIMIT_NOFILE (raised to the hard limit at start) "
        "minus 256", default=2048)
    max_streams_per_uid: int = doc(
        "Workload API (and SDS) streams one caller uid may have open across its connections (each costs "
        "the agent ~17 KB); further ones end at once with RESOURCE_EXHAUSTED", default=4096)
    jwt_svid_mint_rate_per_uid: float = doc(
        "new JWT-SVIDs (not yet cached: each is a signing by the server, charged to this agent's "
        "signing budget there) one caller uid may ask for per second; beyond, RESOURCE_EXHAUSTED",
        default=10.0)
    jwt_svid_mint_burst_per_uid: int = doc("new JWT-SVIDs one caller uid may ask for at once", default=100)
    workload_x509_svid_key_type: str = doc(
        f"key type of workload X509-SVIDs: {', '.join(WORKLOAD_KEY_TYPES)} (SPIRE's option of the "
        "same name); RSA keys are made on a thread, one at a time", default="ec-p256")
    node_attestor: NodeAttestorConfig = field(default_factory=NodeAttestorConfig)
    workload_attestors: WorkloadAttestorsConfig = field(default_factory=WorkloadAttestorsConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    health: HealthConfig = field(default_factory=HealthConfig)

    def validate(self) -> None:
        check_identity_basics(self.trust_domain, self.data_dir)
        if not self.server_address:
            raise ConfigError("server_address: at least one host:port is required")
        for i, addr in enumerate(self.server_address):
            host, sep, port = addr.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ConfigError(f"server_address[{i}]: expected host:port, got {addr!r}")
        if not self.trust_bundle_path:
            raise ConfigError("trust_bundle_path: required (the agent never bootstraps trust insecurely)")
        if not self.socket_path.startswith("/"):
            raise ConfigError("socket_path: must be an absolute path")
        check_spiffe_ids(self.authorized_delegates, "authorized_delegates")
        if self.sync_interval < 0.05:
            raise ConfigError("sync_interval: must be at least 50ms")
        for name in ("max_connections_per_uid", "max_streams_per_uid", "jwt_svid_mint_burst_per_uid"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1")
        if self.workload_x509_svid_key_type not in WORKLOAD_KEY_TYPES:
            raise ConfigError(
                f"workload_x509_svid_key_type: {self.workload_x509_svid_key_type!r} is not one of "
                f"{', '.join(WORKLOAD_KEY_TYPES)}"
            )
        if not self.jwt_svid_mint_rate_per_uid > 0:
            raise ConfigError("jwt_svid_mint_rate_per_uid: must be above 0")

    @property
    def td(self) -> TrustDomain:
        return TrustDomain.parse(self.trust_domain)

    @property
    def state_dir(self) -> Path:
        return Path(self.data_dir)


def load_agent_config(path: str | Path, env: dict[str, str] | None = None) -> AgentConfig:
    return build(AgentConfig, load_file(path), str(path), env)


def agent_config_from_dict(data: dict[str, Any], source: str = "<config>") -> AgentConfig:
    return build(AgentConfig, data, source, {})
