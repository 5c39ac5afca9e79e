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


def test_a_bad_socket_is_named_after_where_it_came_from(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshid.cli.workload_client import socket_from
    from meshid.errors import ConfigError

    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", "unix:///run/api.sock")
    with pytest.raises(ConfigError, match=r"^invalid --socket 'unix:run/api\.sock'"):
        socket_from("unix:run/api.sock")  # was called an invalid SPIFFE_ENDPOINT_SOCKET
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", "tcp://127.0.0.1:8081")
    with pytest.raises(ConfigError, match=r"^SPIFFE_ENDPOINT_SOCKET 'tcp://127\.0\.0\.1:8081': .* only"):
        socket_from(None)


def test_spiffe_endpoint_socket_gives_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from meshid.cli.workload_client import socket_from

    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", "unix:///run/meshid/api.sock")
    assert socket_from(None) == "/run/meshid/api.sock"
    assert socket_from("unix:///tmp/other.sock") == "/tmp/other.sock"  # --socket wins


@pytest.fixture
def closing_agent(tmp_path: Any) -> Any:
    """A Unix socket that accepts each connection and closes it at once, as the agent does
    to a uid over max_connections_per_uid."""
    import socket
    import threading

    path = str(tmp_path / "api.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path
    stop.set()
    thread.join(5)
    server.close()


@pytest.mark.parametrize(
    "argv",
    [["fetch", "x509"], ["fetch", "jwt", "--audience", "a"], ["fetch", "bundles"],
     ["validate", "jwt", "--audience", "a", "--token", "a.b.c"]],
)
def test_workload_api_that_closes_the_connection_is_one_line(
    argv: list[str], closing_agent: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([*argv, "--socket", closing_agent]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"meshid: the Workload API at {closing_agent} closed the connection"), err


@pytest.mark.parametrize(
    "argv", [["fetch", "x509"], ["validate", "jwt", "--audience", "a", "--token", "a.b.c"]]
)
def test_no_agent_names_the_socket(
    argv: list[str], tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    missing = str(tmp_path / "missing.sock")
    assert cli.main([*argv, "--socket", missing]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"meshid: cannot connect to the Workload API at {missing}: No such file or directory "
        "(is the agent running?)\n"
    )
    dead = str(tmp_path / "dead.sock")  # bound, nobody listening: a stopped agent's socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(dead)
        assert cli.main([*argv, "--socket", dead]) == 1
    assert f"at {dead}: Connection refused" in capsys.readouterr().err


async def test_admin_socket_that_never_answers_is_a_message(tmp_path: Any) -> None:
    """aiohttp's total timeout is a bare TimeoutError, which `meshid` printed as "meshid: "."""
    import asyncio

    from meshid.cli.admin_client import AdminClient, AdminError

    path = str(tmp_path / "admin.sock")
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_unix_server(silent, path)
    try:
        with pytest.raises(AdminError) as info:
            async with AdminClient(path, timeout=0.3) as client:
                await client.call("GET", "/v1/entries")
        assert str(info.value) == f"the server did not answer on {path} within 0.3 s"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
