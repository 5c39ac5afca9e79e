"""deploy/: every kustomization renders with `kubectl kustomize`, every object passes strict
kubernetes-validate, the embedded TOML loads through the real config loaders, and the
pieces agree with each other (ports, paths, audiences, service accounts).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from attestors.node.k8s_psat import K8sPsatAgentPlugin, _parse_cluster
from attestors.workload.k8s import K8sWorkloadAttestor
from issuer.config import server_config_from_dict
from workload_api.config import agent_config_from_dict

K8S_VERSION = "1.33"
ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
SYSTEMD = ROOT / "deploy" / "systemd"
KUSTOMIZATIONS = sorted(p.parent.relative_to(KUBE).as_posix() for p in KUBE.rglob("kustomization.yaml"))
OVERLAYS = ["base", "overlays/postgres-kafka", "overlays/cilium"]


def _tool(name: str, purpose: str) -> str:
    """The path of command `name`; a failure under CI when it is missing, else a skip."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI to {purpose}")
        pytest.skip(f"{name} not installed (set CI=1 to make this a failure)")
    return path


def _kubectl() -> str:
    return _tool("kubectl", "render deploy/kubernetes")


def _systemd_analyze() -> str:
    return _tool("systemd-analyze", "verify deploy/systemd")


@cache
def _render(kubectl: str, directory: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [kubectl, "kustomize", str(KUBE / directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render(directory: str) -> tuple[dict[str, Any], ...]:
    return _render(_kubectl(), directory)


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    """The one object of that kind and name (generated ConfigMaps: name plus kustomize's hash)."""

    def named(doc: dict[str, Any]) -> bool:
        got: str = doc["metadata"]["name"]
        if kind == "ConfigMap":
            base, _, suffix = got.rpartition("-")
            return base == name and len(suffix) == 10
        return got == name

    matches = [d for d in docs if d["kind"] == kind and named(d)]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def volume(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (v,) = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == name]
    return v


def config_toml(docs: tuple[dict[str, Any], ...], name: str, key: str) -> dict[str, Any]:
    return tomllib.loads(find(docs, "ConfigMap", name)["data"][key])


def test_layout() -> None:
    assert {"base", "base/server", "base/agent", "overlays/postgres-kafka", "overlays/cilium"} <= set(
        KUSTOMIZATIONS
    )


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_renders_and_validates(directory: str) -> None:
    docs = render(directory)
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{directory}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding", "Namespace"):
            assert doc["metadata"].get("namespace") == "meshid", doc["metadata"]["name"]


@pytest.mark.parametrize("directory", OVERLAYS)
def test_server_wiring(directory: str) -> None:
    docs = render(directory)
    sts = find(docs, "StatefulSet", "meshid-server")
    server = container(sts, "meshid-server")
    cfg = server_config_from_dict(
        config_toml(docs, "meshid-server-config", "server.toml"),
        directory,
        env={"MESHID_DATASTORE__DSN": "postgresql://meshid@db/meshid"},
    )
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {
        "agent-api": cfg.server.agent_api_port,
        "grpc": cfg.server.grpc_port,
        "health": cfg.server.health_port,
    }
    assert (cfg.server.agent_api_port, cfg.server.grpc_port, cfg.server.health_port) == (8443, 8081, 8088)
    # Kubelet probes reach the pod IP, not the container's loopback.
    assert cfg.server.health_address == "0.0.0.0"
    assert server["livenessProbe"]["httpGet"] == {"path": "/live", "port": "health"}
    assert server["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "health"}
    svc = find(docs, "Service", "meshid-server")
    assert {(p["name"], p["port"]) for p in svc["spec"]["ports"]} == {("agent-api", 8443), ("grpc", 8081)}
    assert sts["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert server["securityContext"]["readOnlyRootFilesystem"] is True

    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    assert cfg.server.master_secret_file.startswith(mounts["master-secret"] + "/")
    for path in (cfg.upstream.disk.cert_file, cfg.upstream.disk.key_file, cfg.upstream.disk.bundle_file):
        assert path.startswith(mounts["upstream"] + "/")
    assert cfg.data_dir == mounts["data"]
    assert cfg.admin_socket_path.startswith(mounts["admin-socket"] + "/")
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["MESHID_SERVER_SOCKET"] == cfg.admin_socket_path

    role = find(docs, "ClusterRole", "meshid-server")
    rules = {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert rules == {
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("", "pods", "get"),
        ("", "nodes", "get"),
    }
    binding = find(docs, "ClusterRoleBinding", "meshid-server")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "meshid-server", "namespace": "meshid"}]
    assert sts["spec"]["template"]["spec"]["serviceAccountName"] == "meshid-server"


@pytest.mark.parametrize("directory", OVERLAYS)
def test_agent_wiring(directory: str, tmp_path: Path) -> None:
    docs = render(directory)
    ds = find(docs, "DaemonSet", "meshid-agent")
    spec = ds["spec"]["template"]["spec"]
    agent = container(ds, "meshid-agent")
    raw = config_toml(docs, "meshid-agent-config", "agent.toml")
    cfg = agent_config_from_dict(raw, directory)
    server_raw = config_toml(docs, "meshid-server-config", "server.toml")
    server_cfg = server_config_from_dict(server_raw, directory, env={})
    assert cfg.trust_domain == server_cfg.trust_domain

    assert spec["hostPID"] is True
    assert spec["serviceAccountName"] == "meshid-agent"
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    # The Workload API socket lives in a host directory that workloads can mount.
    socket_dir = str(Path(cfg.socket_path).parent)
    (socket_volume,) = [n for n, p in mounts.items() if p == socket_dir]
    assert host_paths[socket_volume] == socket_dir

    # Projected token: audience the server expects, at the path the agent reads.
    (source,) = volume(ds, "meshid-agent-token")["projected"]["sources"]
    sat = source["serviceAccountToken"]
    psat = K8sPsatAgentPlugin.from_config(cfg.node_attestor.k8s_psat)
    assert psat.token_path == f"{mounts['meshid-agent-token']}/{sat['path']}"
    clusters = server_raw["node_attestors"]["k8s_psat"]["clusters"]
    assert psat.cluster in clusters
    server_cluster = _parse_cluster(psat.cluster, clusters[psat.cluster])
    assert sat["audience"] in server_cluster.audiences
    assert ("meshid", "meshid-agent") in server_cluster.service_account_allow_list
    assert 600 <= sat["expirationSeconds"] <= 86400

    # Workload attestor config builds; the kubelet host comes from the downward API.
    env_names = {e["name"] for e in agent["env"]}
    assert cfg.workload_attestors.k8s is not None
    k8s_cfg = dict(cfg.workload_attestors.k8s)
    assert k8s_cfg["kubelet_host_env"] in env_names
    ca = tmp_path / "ca.pem"
    _write_test_ca(ca)
    k8s_cfg["kubelet_ca_path"] = str(ca)
    attestor = K8sWorkloadAttestor.from_config(k8s_cfg, environ={k8s_cfg["kubelet_host_env"]: "10.0.0.11"})
    assert attestor._kubelet.base_url == "https://10.0.0.11:10250"

    # Probes on the health listener (host network: the node's loopback is the agent's).
    assert spec["hostNetwork"] is True
    for probe, path in (("livenessProbe", "/live"), ("readinessProbe", "/ready")):
        get = agent[probe]["httpGet"]
        assert (get["path"], get["port"], get["host"]) == (path, cfg.health.port, cfg.health.address)
    assert cfg.health.port == 8088

    role = find(docs, "ClusterRole", "meshid-agent")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes/proxy"], "verbs": ["get"]}]


def test_postgres_kafka_overlay() -> None:
    docs = render("overlays/postgres-kafka")
    sts = find(docs, "StatefulSet", "meshid-server")
    assert sts["spec"]["replicas"] >= 2
    env = {e["name"]: e for e in container(sts, "meshid-server")["env"]}
    assert env["MESHID_DATASTORE__DSN"]["valueFrom"]["secretKeyRef"] == {
        "name": "meshid-postgres",
        "key": "dsn",
    }
    assert "MESHID_SERVER_SOCKET" in env  # the base env survives the patch
    raw = config_toml(docs, "meshid-server-config", "server.toml")
    assert "dsn" not in raw.get("datastore", {})  # the password never sits in a ConfigMap
    cfg = server_config_from_dict(
        raw, "pk", env={"MESHID_DATASTORE__DSN": "postgresql://meshid@db:5432/meshid"}
    )
    assert cfg.dsn == "postgresql://meshid@db:5432/meshid"
    assert cfg.events.kafka.bootstrap_servers and cfg.events.kafka.topic == "meshid.events"
    mounts = {m["name"]: m["mountPath"] for m in container(sts, "meshid-server")["volumeMounts"]}
    assert cfg.events.kafka.ssl_cafile.startswith(mounts["kafka-tls"] + "/")


def test_cilium_overlay() -> None:
    docs = render("overlays/cilium")
    agent_cfg = agent_config_from_dict(config_toml(docs, "meshid-agent-config", "agent.toml"), "cilium")
    server_cfg = server_config_from_dict(
        config_toml(docs, "meshid-server-config", "server.toml"), "cilium", env={}
    )
    assert agent_cfg.trust_domain == server_cfg.trust_domain == "spiffe.cilium"
    assert agent_cfg.authorized_delegates == ["spiffe://spiffe.cilium/cilium-agent"]
    assert server_cfg.server.admin_ids == ["spiffe://spiffe.cilium/cilium-operator"]
    # Cilium's defaults: adminSocketPath and agentSocketPath.
    assert agent_cfg.admin_socket_path == "/run/spire/sockets/admin.sock"
    assert agent_cfg.socket_path == "/run/spire/sockets/agent/agent.sock"
    ds = find(docs, "DaemonSet", "meshid-agent")
    mounts = {m["mountPath"]: m["name"] for m in container(ds, "meshid-agent")["volumeMounts"]}
    for path in (agent_cfg.admin_socket_path, agent_cfg.socket_path):
        name = mounts[str(Path(path).parent)]
        assert volume(ds, name)["hostPath"]["path"] == str(Path(path).parent)

    sts = find(docs, "StatefulSet", "meshid-server")
    sidecar = container(sts, "cilium-entries")
    side_mounts = {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}
    server_mounts = {m["name"]: m["mountPath"] for m in container(sts, "meshid-server")["volumeMounts"]}
    assert side_mounts["admin-socket"] == server_mounts["admin-socket"]
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["MESHID_SERVER_SOCKET"] == server_cfg.admin_socket_path
    assert env["TRUST_DOMAIN"] == server_cfg.trust_domain
    script = find(docs, "ConfigMap", "meshid-cilium-entries")["data"]["register-entries.sh"]
    assert sidecar["command"] == ["/bin/sh", f"{side_mounts['cilium-entries']}/register-entries.sh"]
    assert "meshid entry create" in script
    # The cluster name the script selects on is one the server accepts.
    clusters = config_toml(docs, "meshid-server-config", "server.toml")["node_attestors"]["k8s_psat"][
        "clusters"
    ]
    assert env["CLUSTER_NAME"] in clusters


def _stub_bin(tmp_path: Path, entries_json: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    listing = tmp_path / "list.json"
    listing.write_text(entries_json)
    meshid = bin_dir / "meshid"
    meshid.write_text(
        '#!/bin/sh\necho "$*" >> "$STUB_LOG"\n'
        'if [ "$1 $2" = "entry list" ]; then cat "$STUB_LIST"; fi\nexit 0\n'
    )
    # Ends the script's endless loop after one round.
    sleep = bin_dir / "sleep"
    sleep.write_text("#!/bin/sh\nkill -TERM $PPID\n")
    for f in (meshid, sleep):
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_LOG": str(log), "STUB_LIST": str(listing)}


def _run_script(tmp_path: Path, entries_json: str) -> list[str]:
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no /bin/sh")
    env = _stub_bin(tmp_path, entries_json)
    env.update(
        {"TRUST_DOMAIN": "spiffe.cilium", "CLUSTER_NAME": "meshid-cluster", "MESHID_NAMESPACE": "meshid"}
    )
    script = KUBE / "overlays" / "cilium" / "register-entries.sh"
    subprocess.run([sh, str(script)], env=env, capture_output=True, timeout=30, check=False)
    log = Path(env["STUB_LOG"])
    return log.read_text().splitlines() if log.exists() else []


def test_cilium_entries_script_creates_what_cilium_expects(tmp_path: Path) -> None:
    calls = _run_script(tmp_path, '{\n  "entries": []\n}\n')
    creates = [c for c in calls if c.startswith("entry create")]
    node = "spiffe://spiffe.cilium/ns/meshid/sa/meshid-agent"
    assert creates == [
        f"entry create --spiffe-id {node} --parent-id spiffe://spiffe.cilium/meshid/server "
        "--selector k8s_psat:cluster:meshid-cluster --selector k8s_psat:agent_ns:meshid "
        "--selector k8s_psat:agent_sa:meshid-agent",
        f"entry create --spiffe-id spiffe://spiffe.cilium/cilium-agent --parent-id {node} "
        "--selector k8s:ns:kube-system --selector k8s:sa:cilium",
        f"entry create --spiffe-id spiffe://spiffe.cilium/cilium-operator --parent-id {node} "
        "--selector k8s:ns:kube-system --selector k8s:sa:cilium-operator",
    ]


def test_cilium_entries_script_is_idempotent(tmp_path: Path) -> None:
    existing = "\n".join(
        f'      "spiffe_id": "spiffe://spiffe.cilium/{p}",'
        for p in ("ns/meshid/sa/meshid-agent", "cilium-agent", "cilium-operator")
    )
    calls = _run_script(tmp_path, '{\n  "entries": [\n' + existing + "\n  ]\n}\n")
    assert [c for c in calls if c.startswith("entry list")] and not [c for c in calls if "create" in c]


# --- systemd -------------------------------------------------------------------------------------


def _unit(name: str) -> dict[str, list[str]]:
    """Directive -> values (directives may repeat) of one unit file."""
    values: dict[str, list[str]] = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        values.setdefault(key, []).append(value)
    return values


@pytest.mark.parametrize("name", ["meshid-server.service", "meshid-agent.service"])
def test_systemd_units_are_hardened(name: str) -> None:
    unit = _unit(name)
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
        "User": "meshid",
        "CapabilityBoundingSet": "",
    }.items():
        assert unit.get(key) == [value], f"{name}: {key}"
    assert "@system-service" in unit["SystemCallFilter"]
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    (exec_start,) = unit["ExecStart"]
    assert "--config /etc/meshid/" in exec_start


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    paths = []
    for name in ("meshid-server.service", "meshid-agent.service"):
        # verify insists the binary exists; the directives are what is checked here.
        text = (SYSTEMD / name).read_text().replace("/opt/meshid/bin/meshid", "/bin/true")
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    out = subprocess.run([analyze, "verify", *paths], capture_output=True, text=True, timeout=60, check=False)
    problems = [
        line
        for line in out.stderr.splitlines()
        if any(w in line for w in ("Unknown", "Invalid", "Failed", "bad-setting", "Ignoring"))
    ]
    assert out.returncode == 0 and not problems, out.stderr


@cache
def _syscall_group(name: str) -> frozenset[str]:
    """The system calls of one systemd syscall group, nested groups expanded."""
    out = subprocess.run(["systemd-analyze", "syscall-filter", name], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        line = line.strip()
        if line and not line.startswith("#"):
            calls |= _syscall_group(line) if line.startswith("@") else {line}
    return frozenset(calls)


def _allowed_syscalls(filters: list[str]) -> set[str]:
    """The allow-list systemd builds from SystemCallFilter= lines that start with one: each
    later `~` line removes from it, each later plain line adds to it (systemd.exec(5))."""
    allowed: set[str] = set()
    for i, value in enumerate(filters):
        deny = value.startswith("~")
        assert i > 0 or not deny, "the first SystemCallFilter= must be an allow-list"
        calls: set[str] = set()
        for name in value.lstrip("~").split():
            calls |= _syscall_group(name) if name.startswith("@") else {name}
        allowed = allowed - calls if deny else allowed | calls
    return allowed


def test_systemd_server_unit_lets_the_relay_process_lower_its_priority() -> None:
    # The Kafka relay's child calls nice(10) (setpriority): @resources alone refused it.
    _systemd_analyze()
    allowed = _allowed_syscalls(_unit("meshid-server.service")["SystemCallFilter"])
    assert {"setpriority", "getpriority"} <= allowed
    assert "setrlimit" not in allowed and "sched_setscheduler" not in allowed  # the rest stays out


def test_systemd_example_configs_load() -> None:
    server = server_config_from_dict(
        tomllib.loads((SYSTEMD / "server.toml").read_text()), "server.toml", env={}
    )
    agent = agent_config_from_dict(tomllib.loads((SYSTEMD / "agent.toml").read_text()), "agent.toml")
    # Secrets come from systemd credentials of the matching unit.
    assert server.server.master_secret_file.startswith("/run/credentials/meshid-server.service/")
    creds = {v.split(":", 1)[0] for v in _unit("meshid-server.service")["LoadCredential"]}
    assert Path(server.server.master_secret_file).name in creds
    assert Path(server.upstream.disk.key_file).name in creds
    agent_creds = {v.split(":", 1)[0] for v in _unit("meshid-agent.service")["LoadCredential"]}
    assert Path(agent.node_attestor.x509pop.private_key_path).name in agent_creds
    assert Path(agent.socket_path).parent == Path("/run/meshid/sockets")


def _write_test_ca(path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _readme_minimal_server_config() -> dict[str, Any]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Minimal server config:", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    return tomllib.loads(block)


def test_admin_commands_find_the_documented_admin_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """`meshid entry ...` without --server-socket or MESHID_SERVER_SOCKET reaches the server
    configured as README's minimal config and deploy/systemd/server.toml say."""
    from meshid.cli.admin_client import SOCKET_ENV, socket_path

    monkeypatch.delenv(SOCKET_ENV, raising=False)
    readme = server_config_from_dict(_readme_minimal_server_config(), "README.md", env={})
    systemd = server_config_from_dict(
        tomllib.loads((SYSTEMD / "server.toml").read_text()), "server.toml", env={}
    )
    assert socket_path(None) == readme.admin_socket_path == systemd.admin_socket_path


def test_systemd_server_and_agent_can_share_a_host() -> None:
    """Both units on one host: stopping one must not delete the other's sockets (systemd
    removes a unit's RuntimeDirectory on stop without reference counting), starting one
    must not change the mode the other needs, and their listeners must not collide."""
    server_unit, agent_unit = _unit("meshid-server.service"), _unit("meshid-agent.service")
    server_dirs = set(" ".join(server_unit.get("RuntimeDirectory", [])).split())
    agent_dirs = set(" ".join(agent_unit.get("RuntimeDirectory", [])).split())
    if server_dirs & agent_dirs:
        for unit in (server_unit, agent_unit):
            assert unit.get("RuntimeDirectoryPreserve") == ["yes"]
        assert server_unit["RuntimeDirectoryMode"] == agent_unit["RuntimeDirectoryMode"] == ["0755"]
    server = server_config_from_dict(
        tomllib.loads((SYSTEMD / "server.toml").read_text()), "server.toml", env={}
    )
    agent = agent_config_from_dict(tomllib.loads((SYSTEMD / "agent.toml").read_text()), "agent.toml")
    server_ports = {server.server.agent_api_port, server.server.grpc_port, server.server.health_port}
    assert agent.health.port not in server_ports
    assert agent.socket_path != server.admin_socket_path
