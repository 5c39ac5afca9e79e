"""Server configuration: built once from TOML (+ env overrides) and validated up front."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from attestors.node.join_token import MAX_TOKEN_TTL, MIN_TOKEN_TTL
from meshid.configload import Duration, Port, build, check_identity_basics, check_spiffe_ids, doc, load_file
from meshid.entry import MIN_SVID_TTL
from meshid.errors import ConfigError
from meshid.spiffe_id import SpiffeId, TrustDomain

KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072")


@dataclass
class DatastoreConfig:
    dsn: str = doc(
        "sqlite:///path, a plain path, or postgresql://...; default <data_dir>/datastore.sqlite3", default=""
    )


@dataclass
class ListenConfig:
    bind_address: str = doc("address of the TLS listeners (agent API, gRPC)", default="0.0.0.0")
    agent_api_port: Port = doc("mutual-TLS agent API port (TLS 1.3); 0 = any free port", default=8443)
    grpc_port: Port = doc(
        "mutual-TLS gRPC port for the SPIRE Entry API (Cilium's default 8081); 0 = any free port",
        default=8081,
    )
    grpc_enabled: bool = doc("serve the SPIRE-compatible Entry API over gRPC", default=True)
    health_address: str = doc(
        "plain-HTTP health/metrics listener address (loopback by default)", default="127.0.0.1"
    )
    health_port: Port = doc("plain-HTTP /live, /ready, /metrics port; 0 = any free port", default=8088)
    health_enabled: bool = doc("serve /live, /ready and /metrics", default=True)
    admin_socket_path: str = doc("admin Unix socket (mode 0600); default <data_dir>/admin.sock", default="")
    admin_ids: list[str] = doc(
        "SPIFFE IDs allowed to manage entries over the gRPC Entry API", default_factory=list
    )
    master_secret_file: str = doc("file holding the master secret that encrypts CA keys at rest", default="")
    master_secret_env: str = doc(
        "environment variable holding the master secret, read when master_secret_file is empty",
        default="MESHID_MASTER_SECRET",
    )
    server_id: str = doc("this replica's id; default: generated once and kept in data_dir", default="")
    max_request_bytes: int = doc(
        "largest JSON body the agent API accepts (node attestation, before the caller has an SVID: "
        "at most 256 KiB whatever this says)",
        default=4 * 1024 * 1024,
    )
    attest_rate_per_minute: int = doc(
        "node attestation attempts allowed per source address per minute", default=30
    )


KEY_MANAGERS = ("disk", "pkcs11")


@dataclass
class Pkcs11Config:
    module_path: str = doc(
        "PKCS#11 module (shared library) of the HSM, e.g. /usr/lib/softhsm/libsofthsm2.so", default=""
    )
    token_label: str = doc("label of the token that holds the CA keys", default="")
    pin_env: str = doc("environment variable holding the token's user PIN", default="MESHID_PKCS11_PIN")
    key_label_prefix: str = doc(
        "CKA_LABEL prefix of the keys meshid makes (then the CA key id)", default="meshid-"
    )

    def validate(self) -> None:
        if self.module_path and not Path(self.module_path).is_absolute():
            raise ConfigError("ca.pkcs11.module_path: must be an absolute path")
        if len(self.key_label_prefix) > 64:
            raise ConfigError("ca.pkcs11.key_label_prefix: at most 64 characters")


@dataclass
class CaConfig:
    key_manager: str = doc(
        "where CA private keys live: disk (sealed under the master secret in the "
        "datastore) or pkcs11 (generated and used inside an HSM token, see [ca.pkcs11])",
        default="disk",
    )
    pkcs11: Pkcs11Config = field(default_factory=Pkcs11Config)
    key_type: str = doc("X509 CA key type: ec-p256, ec-p384, rsa-2048, rsa-3072", default="ec-p256")
    jwt_key_type: str = doc("JWT signing key type", default="ec-p256")
    ca_ttl: Duration = doc("lifetime of each X509 CA / JWT key", default=Duration(24 * 3600))
    x509_svid_ttl: Duration = doc("default X509-SVID lifetime", default=Duration(3600))
    jwt_svid_ttl: Duration = doc("default JWT-SVID lifetime", default=Duration(300))
    agent_svid_ttl: Duration = doc("agent SVID lifetime", default=Duration(3600))
    jwt_issuer: str = doc("`iss` claim of JWT-SVIDs (and OIDC issuer); empty = omit", default="")
    taint_rotation_window: Duration = doc(
        "agents spread re-issuance after a taint over this window", default=Duration(600)
    )

    def validate(self) -> None:
        if self.key_manager not in KEY_MANAGERS:
            raise ConfigError(f"ca.key_manager: must be one of {', '.join(KEY_MANAGERS)}")
        if self.key_manager == "pkcs11":
            missing = [k for k in ("module_path", "token_label", "pin_env") if not getattr(self.pkcs11, k)]
            if missing:
                raise ConfigError(f"ca.pkcs11: {', '.join(missing)} must be set for key_manager pkcs11")
        for name in ("key_type", "jwt_key_type"):
            if getattr(self, name) not in KEY_TYPES:
                raise ConfigError(f"ca.{name}: must be one of {', '.join(KEY_TYPES)}")
        if self.ca_ttl < 120:
            raise ConfigError("ca.ca_ttl: must be at least 2m")
        for name in ("x509_svid_ttl", "jwt_svid_ttl", "agent_svid_ttl"):
            ttl = getattr(self, name)
            if ttl < MIN_SVID_TTL:
                raise ConfigError(f"ca.{name}: must be at least {MIN_SVID_TTL}s")
            if ttl > self.ca_ttl:
                raise ConfigError(f"ca.{name}: must not exceed ca.ca_ttl ({int(self.ca_ttl)}s)")


@dataclass
class DiskUpstreamConfig:
    cert_file: str = doc("upstream intermediate certificate first, then any chain up to the root", default="")
    key_file: str = doc("private key of the upstream intermediate (PEM)", default="")
    bundle_file: str = doc("upstream root certificates (PEM): the trust bundle", default="")

    def validate(self) -> None:
        missing = [k for k in ("cert_file", "key_file", "bundle_file") if not getattr(self, k)]
        if missing and len(missing) < 3:
            raise ConfigError(f"upstream.disk: {', '.join(missing)} must be set as well")


@dataclass
class UpstreamConfig:
    disk: DiskUpstreamConfig = field(default_factory=DiskUpstreamConfig)


@dataclass
class JoinTokenConfig:
    default_ttl: Duration = doc("lifetime of tokens made by `meshid token create`", default=Duration(3600))

    def validate(self) -> None:
        if not MIN_TOKEN_TTL <= self.default_ttl <= MAX_TOKEN_TTL:
            raise ConfigError(
                "node_attestors.join_token.default_ttl: must be between "
                f"{MIN_TOKEN_TTL}s and {MAX_TOKEN_TTL}s"
            )


@dataclass
class X509PopConfig:
    ca_bundle_path: str = doc(
        "PEM CAs that node certificates must chain to; empty = x509pop off. A changed file is "
        "picked up at the next attestation; one that cannot be read keeps the CAs loaded before",
        default="",
    )
    agent_path_template: str = doc(
        "agent ID path: fingerprint (SHA-1 of the leaf) or subject_cn", default="fingerprint"
    )


@dataclass
class NodeAttestorsConfig:
    join_token: JoinTokenConfig = field(default_factory=JoinTokenConfig)
    x509pop: X509PopConfig = field(default_factory=X509PopConfig)
    k8s_psat: dict[str, Any] = doc(
        "k8s_psat attestor settings (see docs/kubernetes.md)", default_factory=dict
    )


@dataclass
class AdmissionConfig:
    max_concurrent_signing: int = doc("signing batches processed at once", default=4)
    agent_rate: float = doc("signing requests (CSRs) per second per agent, sustained", default=200.0)
    agent_burst: int = doc("token bucket size per agent", default=1000)
    global_rate: float = doc("signing requests per second for the whole server", default=5000.0)
    global_burst: int = doc("global token bucket size", default=20000)
    max_queue: int = doc("batches allowed to wait for a signing slot before refusing", default=16)


@dataclass
class KafkaSection:
    bootstrap_servers: list[str] = doc(
        "Kafka bootstrap servers host:port; empty = outbox only", default_factory=list
    )
    topic: str = doc("events topic", default="meshid.events")
    enable_idempotence: bool = doc(
        "idempotent producer (turn off for brokers refusing InitProducerId)", default=True
    )
    mode: str = doc("CloudEvents mode: structured or binary", default="structured")
    auto_create_topics: bool = doc("create the topic when missing", default=False)
    security_protocol: str = doc("PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL", default="PLAINTEXT")
    ssl_cafile: str = doc("CA file for TLS to the broker", default="")
    ssl_certfile: str = doc("client certificate for TLS to the broker", default="")
    ssl_keyfile: str = doc("client key for TLS to the broker", default="")
    sasl_mechanism: str = doc("PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512", default="")
    sasl_username: str = doc("SASL user", default="")
    sasl_password_env: str = doc("environment variable holding the SASL password", default="")
    retention: Duration = doc("keep delivered outbox rows this long", default=Duration(24 * 3600))
    relay_process: bool = doc(
        "publish from a child process, so the Kafka client's CPU is not taken from issuance under the "
        "server's GIL; false = in the server process (always so for a sqlite::memory: datastore)",
        default=True,
    )

    def validate(self) -> None:
        if self.mode not in ("structured", "binary"):
            raise ConfigError("events.kafka.mode: must be 'structured' or 'binary'")


@dataclass
class EventsConfig:
    kafka: KafkaSection = field(default_factory=KafkaSection)


FEDERATION_PROFILES = ("https_spiffe", "https_web")


@dataclass
class BundleEndpointConfig:
    enabled: bool = doc(
        "serve this trust domain's SPIFFE bundle at GET / (TLS 1.3 server-auth, no client certificate)",
        default=False,
    )
    address: str = doc(
        "listen address of the bundle endpoint (also serves OIDC discovery)", default="0.0.0.0"
    )
    port: Port = doc("bundle endpoint port; 0 = any free port", default=8444)
    profile: str = doc(
        "https_spiffe: present the server's X509-SVID; https_web: present cert_file/key_file",
        default="https_spiffe",
    )
    cert_file: str = doc("https_web: serving certificate chain (PEM), re-read when it changes", default="")
    key_file: str = doc("https_web: private key of cert_file (PEM)", default="")
    file_sync_interval: Duration = doc(
        "https_web: how often cert_file/key_file are checked for changes", default=Duration(60)
    )
    refresh_hint: Duration = doc(
        "spiffe_refresh_hint advertised to federated consumers", default=Duration(300)
    )

    def validate(self) -> None:
        if self.profile not in FEDERATION_PROFILES:
            raise ConfigError(
                "federation.bundle_endpoint.profile: must be one of " + ", ".join(FEDERATION_PROFILES)
            )
        if self.profile == "https_web" and self.enabled and not (self.cert_file and self.key_file):
            raise ConfigError("federation.bundle_endpoint: https_web needs cert_file and key_file")
        if self.refresh_hint < 1:
            raise ConfigError("federation.bundle_endpoint.refresh_hint: must be at least 1s")
        if self.file_sync_interval < 1:
            raise ConfigError("federation.bundle_endpoint.file_sync_interval: must be at least 1s")


@dataclass
class FederatedTrustDomainConfig:
    """One `[federation.trust_domains."<td>"]` table (keys checked like every other table)."""

    bundle_endpoint_url: str = doc(
        "https URL of the foreign bundle endpoint; empty = static trust_bundle_path", default=""
    )
    profile: str = doc(
        "https_spiffe (authenticate the endpoint with the foreign bundle) or https_web (Web PKI)",
        default="https_spiffe",
    )
    endpoint_spiffe_id: str = doc("https_spiffe: SPIFFE ID the endpoint must present", default="")
    trust_bundle_path: str = doc(
        "initial foreign bundle (PEM roots or SPIFFE bundle JSON); used until "
        "one is fetched, and always when bundle_endpoint_url is empty",
        default="",
    )
    ca_file: str = doc("https_web: PEM CAs to trust instead of the system store", default="")

    def validate(self) -> None:
        if self.profile not in FEDERATION_PROFILES:
            raise ConfigError(f"profile: must be one of {', '.join(FEDERATION_PROFILES)}")
        url = self.bundle_endpoint_url
        if not url:
            if not self.trust_bundle_path:
                raise ConfigError("set bundle_endpoint_url, trust_bundle_path or both")
            return
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname or parts.fragment:
            raise ConfigError(f"bundle_endpoint_url: must be an https URL, got {url!r}")
        if self.profile == "https_spiffe":
            if not self.endpoint_spiffe_id:
                raise ConfigError("endpoint_spiffe_id: required for https_spiffe")
            try:
                SpiffeId.parse(self.endpoint_spiffe_id)
            except ValueError as exc:
                raise ConfigError(f"endpoint_spiffe_id: {exc}") from None


@dataclass
class FederationConfig:
    bundle_endpoint: BundleEndpointConfig = field(default_factory=BundleEndpointConfig)
    trust_domains: dict[str, Any] = doc(
        'foreign trust domains: [federation.trust_domains."other.org"] with bundle_endpoint_url, profile, '
        "endpoint_spiffe_id, trust_bundle_path, ca_file",
        default_factory=dict,
    )
    min_refresh_interval: Duration = doc(
        "poll a foreign endpoint at most this often, whatever its refresh hint", default=Duration(30)
    )
    max_refresh_interval: Duration = doc(
        "poll a foreign endpoint at least this often", default=Duration(3600)
    )
    fetch_timeout: Duration = doc("time limit of one foreign bundle fetch", default=Duration(30))

    def relationships(self) -> dict[TrustDomain, FederatedTrustDomainConfig]:
        out: dict[TrustDomain, FederatedTrustDomainConfig] = {}
        for name, raw in self.trust_domains.items():
            where = f"federation.trust_domains.{name}"
            try:
                td = TrustDomain.parse(name)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            out[td] = build(FederatedTrustDomainConfig, raw, where, {})
        return out

    def validate(self) -> None:
        if self.min_refresh_interval <= 0 or self.max_refresh_interval < self.min_refresh_interval:
            raise ConfigError("federation: need 0 < min_refresh_interval <= max_refresh_interval")
        if self.fetch_timeout <= 0:
            raise ConfigError("federation.fetch_timeout: must be positive")
        self.relationships()


@dataclass
class OidcConfig:
    enabled: bool = doc(
        "serve OIDC discovery (/.well-known/openid-configuration, /keys) on the bundle "
        "endpoint listener; the issuer is ca.jwt_issuer",
        default=False,
    )
    jwks_uri: str = doc(
        "jwks_uri to advertise (e.g. behind a proxy); default <ca.jwt_issuer>/keys", default=""
    )


@dataclass
class ServerConfig:
    trust_domain: str = doc("trust domain name, e.g. example.org", default="")
    data_dir: str = doc("directory for the SQLite datastore, server id and admin socket", default="")
    log_level: str = doc("debug, info, warning, error", default="info")
    datastore: DatastoreConfig = field(default_factory=DatastoreConfig)
    server: ListenConfig = field(default_factory=ListenConfig)
    ca: CaConfig = field(default_factory=CaConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    node_attestors: NodeAttestorsConfig = field(default_factory=NodeAttestorsConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    oidc: OidcConfig = field(default_factory=OidcConfig)

    def validate(self) -> None:
        check_identity_basics(self.trust_domain, self.data_dir)
        check_spiffe_ids(self.server.admin_ids, "server.admin_ids")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError("log_level: must be debug, info, warning or error")
        if self.td in self.federation.relationships():
            raise ConfigError(f"federation.trust_domains: {self.td} is this server's own trust domain")
        if self.oidc.enabled:
            # OIDC relying parties match `iss` byte for byte against the discovery issuer.
            iss = urlsplit(self.ca.jwt_issuer)
            if iss.scheme != "https" or not iss.hostname or iss.query or iss.fragment:
                raise ConfigError(
                    "oidc.enabled: ca.jwt_issuer must be an https URL without query or fragment"
                )
            if not self.federation.bundle_endpoint.enabled:
                raise ConfigError(
                    "oidc.enabled: OIDC discovery is served by federation.bundle_endpoint; enable it"
                )

    # Derived values, so callers never re-derive defaults.
    @property
    def td(self) -> TrustDomain:
        return TrustDomain.parse(self.trust_domain)

    @property
    def dsn(self) -> str:
        return self.datastore.dsn or str(Path(self.data_dir) / "datastore.sqlite3")

    @property
    def admin_socket_path(self) -> str:
        return self.server.admin_socket_path or str(Path(self.data_dir) / "admin.sock")

    @property
    def server_spiffe_id(self) -> SpiffeId:
        return SpiffeId(self.td, "/meshid/server")


def load_server_config(path: str | Path, env: dict[str, str] | None = None) -> ServerConfig:
    return build(ServerConfig, load_file(path), str(path), env)


def server_config_from_dict(
    data: dict[str, Any], source: str = "<config>", env: dict[str, str] | None = None
) -> ServerConfig:
    return build(ServerConfig, data, source, env if env is not None else {})
