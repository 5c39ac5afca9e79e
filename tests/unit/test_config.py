"""Server configuration: mistakes fail up front naming the file, the key and the reason;
environment variables override file values."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from issuer.config import ServerConfig, load_server_config, server_config_from_dict
from meshid.errors import ConfigError

BASE = """\
trust_domain = "example.org"
data_dir = "/var/lib/meshid"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "server.toml"
    p.write_text(BASE + text)
    return p


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_server_config(path, env={})
    return str(info.value)


def test_minimal_file_loads_with_spire_defaults(tmp_path: Path) -> None:
    cfg = load_server_config(write(tmp_path, ""), env={})
    assert isinstance(cfg, ServerConfig)
    assert cfg.td.name == "example.org"
    assert cfg.ca.ca_ttl == 24 * 3600 and cfg.ca.x509_svid_ttl == 3600 and cfg.ca.jwt_svid_ttl == 300
    assert cfg.server.agent_api_port == 8443
    assert str(cfg.server_spiffe_id) == "spiffe://example.org/meshid/server"
    assert cfg.admin_socket_path == "/var/lib/meshid/admin.sock"


def test_durations_accept_units_and_seconds(tmp_path: Path) -> None:
    text = '[ca]\nca_ttl = "48h"\nx509_svid_ttl = "30m"\njwt_svid_ttl = 90\n'
    cfg = load_server_config(write(tmp_path, text), env={})
    assert (cfg.ca.ca_ttl, cfg.ca.x509_svid_ttl, cfg.ca.jwt_svid_ttl) == (48 * 3600, 1800, 90)


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        # unknown keys, at the top level and in a section
        ('trust_domian = "x"\n', "trust_domian", "unknown key"),
        ("[server]\nagent_api_prot = 9000\n", "server.agent_api_prot", "unknown key"),
        ("[ca]\nttl = 5\n", "ca.ttl", "unknown key"),
        ("[upstream.disk]\ncert = 'x'\n", "upstream.disk.cert", "unknown key"),
        # wrong types
        ('[server]\nagent_api_port = "8443"\n', "server.agent_api_port", "expected an integer"),
        ("[server]\nagent_api_port = 8443.5\n", "server.agent_api_port", "expected an integer"),
        ("[server]\nagent_api_port = true\n", "server.agent_api_port", "expected an integer"),
        ('[server]\ngrpc_enabled = "yes"\n', "server.grpc_enabled", "expected true or false"),
        ("[server]\nbind_address = 1\n", "server.bind_address", "expected a string"),
        ('[server]\nadmin_ids = "spiffe://example.org/admin"\n', "server.admin_ids", "expected a list"),
        ('[ca]\nca_ttl = "one day"\n', "ca.ca_ttl", "duration"),
        # TOML's inf and nan passed every range check (nan compares false with everything)
        ("[ca]\nca_ttl = inf\n", "ca.ca_ttl", "finite"),
        ("[ca]\nx509_svid_ttl = nan\n", "ca.x509_svid_ttl", "finite"),
        ("[admission]\nglobal_rate = nan\n", "admission.global_rate", "finite"),
        ("[ca]\nca_ttl = -5\n", "ca.ca_ttl", "negative"),
        # a date past year 9999: the server failed at start with a traceback
        ('[ca]\nca_ttl = "99999999999d"\n', "ca.ca_ttl", "at most 100 years"),
        ("[ca]\nca_ttl = 1e300\n", "ca.ca_ttl", "at most 100 years"),
        ("server = 5\n", "server", "expected a table"),
        # values out of range
        ('[ca]\nkey_type = "ec-p521"\n', "ca.key_type", "must be one of"),
        # a port out of range failed only at bind, naming no key
        ("[server]\nagent_api_port = 70000\n", "server.agent_api_port", "0 (any free port) to 65535"),
        ("[server]\nhealth_port = -1\n", "server.health_port", "0 (any free port) to 65535"),
        ("[federation.bundle_endpoint]\nport = 65536\n", "federation.bundle_endpoint.port", "65535"),
        ('[server]\nadmin_ids = ["spiffe://Example.org/admin"]\n', "server.admin_ids[0]", "lowercase"),
        ('log_level = "verbose"\n', "log_level", "must be"),
        ('[upstream.disk]\ncert_file = "/x.pem"\n', "upstream.disk", "must be set"),
        # a default that would make every `meshid token create` fail
        ('[node_attestors.join_token]\ndefault_ttl = "0s"\n', "join_token.default_ttl", "between"),
        ('[node_attestors.join_token]\ndefault_ttl = "8d"\n', "join_token.default_ttl", "between"),
    ],
)
def test_mistakes_name_file_key_and_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write(tmp_path, text)
    msg = load_error(path)
    assert str(path) in msg
    assert key in msg
    assert reason in msg


@pytest.mark.parametrize(
    ("td", "reason"),
    [
        ("Example.org", "lowercase"),
        ("example.org:8443", "port"),
        ("spiffe://example.org/path", "path"),
        ("exa mple.org", "characters"),
        ("", "required"),
    ],
)
def test_bad_trust_domain_is_refused(tmp_path: Path, td: str, reason: str) -> None:
    p = tmp_path / "server.toml"
    p.write_text(f'trust_domain = "{td}"\ndata_dir = "/var/lib/meshid"\n')
    msg = load_error(p)
    assert str(p) in msg and "trust_domain" in msg and reason in msg


@pytest.mark.parametrize("key", ["x509_svid_ttl", "jwt_svid_ttl", "agent_svid_ttl"])
def test_svid_ttl_longer_than_ca_ttl_is_refused(tmp_path: Path, key: str) -> None:
    path = write(tmp_path, f'[ca]\nca_ttl = "2h"\n{key} = "3h"\n')
    msg = load_error(path)
    assert str(path) in msg
    assert f"ca.{key}" in msg
    assert "must not exceed ca.ca_ttl" in msg and "7200" in msg
    # equal is fine
    ok = write(tmp_path, f'[ca]\nca_ttl = "2h"\n{key} = "2h"\n')
    assert getattr(load_server_config(ok, env={}).ca, key) == 7200


def test_unreadable_and_invalid_toml_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert str(missing) in load_error(missing)
    bad = tmp_path / "bad.toml"
    bad.write_text("trust_domain = \n")
    msg = load_error(bad)
    assert str(bad) in msg and "TOML" in msg


def test_env_override_of_agent_api_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[server]\nagent_api_port = 8443\n")
    cfg = load_server_config(path, env={"MESHID_SERVER__AGENT_API_PORT": "9443"})
    assert cfg.server.agent_api_port == 9443
    # From the real process environment (env=None means os.environ), as `meshid server run` does.
    monkeypatch.setenv("MESHID_SERVER__AGENT_API_PORT", "10443")
    monkeypatch.setenv("MESHID_CA__X509_SVID_TTL", "10m")
    monkeypatch.setenv("MESHID_SERVER__GRPC_ENABLED", "false")
    monkeypatch.setenv("MESHID_TRUST_DOMAIN", "prod.example.org")
    monkeypatch.setenv("MESHID_SOMETHING_ELSE", "ignored")  # not a config key: ignored
    cfg = load_server_config(path)
    assert cfg.server.agent_api_port == 10443
    assert cfg.ca.x509_svid_ttl == 600
    assert cfg.server.grpc_enabled is False
    assert cfg.trust_domain == "prod.example.org"


def test_env_override_is_validated_like_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    with pytest.raises(ConfigError) as info:
        load_server_config(path, env={"MESHID_SERVER__AGENT_API_PORT": "nine"})
    assert "server.agent_api_port" in str(info.value) and "expected an integer" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_server_config(path, env={"MESHID_CA__X509_SVID_TTL": "48h"})
    assert "ca.x509_svid_ttl" in str(info.value) and "must not exceed" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_server_config(path, env={"MESHID_SERVER__GRPC_PORT": "99999"})
    assert "server.grpc_port" in str(info.value) and "65535" in str(info.value)


def test_env_override_of_a_number_or_a_switch(tmp_path: Path) -> None:
    """A float key's override stayed a string ("expected a number, got '100'"), and a switch
    that was not exactly 1/true/yes/on (a typo, "flase" or "enabled") was quietly false."""
    path = write(tmp_path, "")
    cfg = load_server_config(path, env={"MESHID_ADMISSION__AGENT_RATE": "100",
                                        "MESHID_ADMISSION__GLOBAL_RATE": "2500.5",
                                        "MESHID_SERVER__GRPC_ENABLED": "Off",
                                        "MESHID_SERVER__HEALTH_ENABLED": "0"})
    assert (cfg.admission.agent_rate, cfg.admission.global_rate) == (100.0, 2500.5)
    assert cfg.server.grpc_enabled is False and cfg.server.health_enabled is False
    for name, value, reason in (("MESHID_SERVER__GRPC_ENABLED", "flase", "expected true or false"),
                                ("MESHID_ADMISSION__AGENT_RATE", "fast", "expected a number")):
        with pytest.raises(ConfigError) as info:
            load_server_config(path, env={name: value})
        assert reason in str(info.value) and value in str(info.value), info.value


def test_from_dict_names_the_given_source() -> None:
    with pytest.raises(ConfigError) as info:
        server_config_from_dict({"trust_domain": "example.org", "data_dir": "/d", "ca": {"bogus": 1}},
                                source="unit-test")
    assert str(info.value).startswith("unit-test: ca.bogus: unknown key")
    # from_dict ignores the process environment unless given one
    cfg = server_config_from_dict({"trust_domain": "example.org", "data_dir": "/d"},
                                  env={"MESHID_SERVER__AGENT_API_PORT": "1234"})
    assert cfg.server.agent_api_port == 1234


def _agent_dict(tmp: Path, **over: Any) -> dict[str, Any]:
    """A valid agent config dict under `tmp` (nothing is created), with `over` on top."""
    return {"trust_domain": "example.org", "data_dir": str(tmp / "d"), "server_address": ["127.0.0.1:1"],
            "trust_bundle_path": str(tmp / "root.pem"), "socket_path": str(tmp / "api.sock"), **over}


async def test_data_dir_that_is_a_file_fails_the_start_naming_it(tmp_path: Path) -> None:
    from issuer.server import Server
    from workload_api.agent import Agent
    from workload_api.config import agent_config_from_dict

    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("")
    refused = re.escape(f"data_dir {not_a_dir}: exists and is not a directory")
    server = Server(server_config_from_dict({"trust_domain": "example.org", "data_dir": str(not_a_dir)}))
    with pytest.raises(ConfigError, match=refused):
        await server.start()
    agent = Agent(agent_config_from_dict(_agent_dict(tmp_path, data_dir=str(not_a_dir))))
    try:
        with pytest.raises(ConfigError, match=refused):
            await agent.start()
    finally:
        await agent.stop()


def test_agent_health_port_out_of_range_names_the_key(tmp_path: Path) -> None:
    from workload_api.config import agent_config_from_dict

    with pytest.raises(ConfigError) as info:
        agent_config_from_dict(_agent_dict(tmp_path, health={"port": 100000}))
    assert "health.port" in str(info.value) and "65535" in str(info.value)


def test_agent_workload_key_type_is_one_of_the_listed(tmp_path: Path) -> None:
    from workload_api.config import agent_config_from_dict

    base = _agent_dict(tmp_path)
    assert agent_config_from_dict(base).workload_x509_svid_key_type == "ec-p256"
    assert agent_config_from_dict({**base, "workload_x509_svid_key_type": "rsa-2048"}
                                  ).workload_x509_svid_key_type == "rsa-2048"
    with pytest.raises(ConfigError) as info:
        agent_config_from_dict({**base, "workload_x509_svid_key_type": "rsa-1024"})
    assert "workload_x509_svid_key_type" in str(info.value) and "'rsa-1024'" in str(info.value)
    assert "ec-p256, ec-p384, rsa-2048, rsa-4096" in str(info.value)


async def test_an_empty_attestor_table_turns_the_attestor_on_with_defaults(tmp_path: Path) -> None:
    """As a plugin block in SPIRE: `[workload_attestors.docker]` with nothing in it used to
    leave the attestor off, silently."""
    from attestors.workload.docker import DockerWorkloadAttestor
    from workload_api.agent import Agent
    from workload_api.config import agent_config_from_dict

    cases: list[tuple[dict[str, Any], bool]] = [({}, False), ({"docker": {}}, True)]
    for tables, expected in cases:
        agent = Agent(agent_config_from_dict(_agent_dict(tmp_path, workload_attestors=tables)))
        try:
            kinds = [type(a) for a in agent._attestors()]
        finally:
            await agent.stop()
        assert (DockerWorkloadAttestor in kinds) is expected, (tables, kinds)
