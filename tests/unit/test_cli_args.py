"""What the admin commands send for the flags an operator types (no server needed)."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from meshid.cli import main as cli


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, Any]]:
    calls: list[tuple[str, str, Any]] = []

    async def fake_admin(
        args: argparse.Namespace, method: str, path: str, body: Any = None, params: Any = None
    ) -> Any:
        calls.append((method, path, body))
        return {"agent_id": "spiffe://example.org/meshid/agent/join_token/x", "token": "t"}

    monkeypatch.setattr(cli, "_admin", fake_admin)
    return calls


@pytest.mark.parametrize(
    ("argv", "body"),
    [
        ([], {}),  # the server's default_ttl
        (["--ttl", "0"], {"ttl": 0}),  # refused by the server, not silently the default
        (["--ttl", "600"], {"ttl": 600}),
        (["--ttl", "1h"], {"ttl": 3600}),  # durations as in the config files
    ],
)
def test_token_create_ttl(sent: list[tuple[str, str, Any]], argv: list[str], body: dict[str, Any]) -> None:
    assert cli.main(["token", "create", *argv]) == 0
    assert sent == [("POST", "/v1/tokens", body)]


def test_entry_ttls_take_durations(sent: list[tuple[str, str, Any]]) -> None:
    argv = ["entry", "create", "--spiffe-id", "spiffe://example.org/a", "--parent-id", "spiffe://example.org/p",
            "--selector", "unix:uid:0", "--x509-svid-ttl", "30m", "--jwt-svid-ttl", "300"]
    assert cli.main(argv) == 0
    assert sent[0][2]["x509_svid_ttl"] == 1800 and sent[0][2]["jwt_svid_ttl"] == 300


def test_bad_ttl_is_a_usage_error(
    sent: list[tuple[str, str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["token", "create", "--ttl", "1x"])
    assert info.value.code == 2
    assert "--ttl" in capsys.readouterr().err and not sent


@pytest.mark.parametrize(
    ("argv", "body"),
    [
        ([], {}),  # unchanged
        (["--admin"], {"admin": True}),
        (["--no-admin", "--no-downstream"], {"admin": False, "downstream": False}),  # could not be undone
        (["--downstream"], {"downstream": True}),
    ],
)
def test_entry_update_flags(sent: list[tuple[str, str, Any]], argv: list[str], body: dict[str, Any]) -> None:
    assert cli.main(["entry", "update", "e1", *argv]) == 0
    assert sent == [("PUT", "/v1/entries/e1", body)]


@pytest.mark.parametrize(
    "value",
    ["unix://host/run/api.sock", "unix:///run/api.sock?x=1", "unix:///run/api.sock#f", "unix:run/api.sock",
     "tcp://127.0.0.1:8081", "run/api.sock"],
)
def test_spiffe_endpoint_socket_must_be_an_absolute_unix_path(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshid.cli.workload_client import socket_from
    from meshid.errors import ConfigError

    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", value)
    with pytest.raises(ConfigError, match="unix:///absolute/path"):
        socket_from(None)


def test_spiffe_endpoint_socket_gives_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshid.cli.workload_client import socket_from

    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", "unix:///run/meshid/api.sock")
    assert socket_from(None) == "/run/meshid/api.sock"
    assert socket_from("unix:///tmp/other.sock") == "/tmp/other.sock"  # --socket wins
