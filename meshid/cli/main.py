"""`meshid` command line: a thin layer that turns flags into calls of the same functions tests use."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from meshid.cli.admin_client import DEFAULT_SOCKET, SOCKET_ENV, AdminClient, AdminError, socket_path
from meshid.errors import MeshidError
from meshid.heap import freeze_startup_heap


def _setup_logging(level: str = "info") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=lvl, format=fmt, stream=sys.stderr)
    if lvl > logging.DEBUG:
        # grpclib says "Request was cancelled" at INFO each time a workload closes a
        # Workload API stream: routine, and a line per workload restart across a fleet.
        logging.getLogger("grpclib.server").setLevel(logging.WARNING)


def _print(data: Any) -> None:
    if isinstance(data, bytes):
        sys.stdout.write(data.decode())
    else:
        print(json.dumps(data, indent=2, sort_keys=True))


async def run_until_signalled(
    start: Callable[[], Awaitable[Any]], stop: Callable[[], Awaitable[Any]]
) -> None:
    """Start, wait for SIGINT/SIGTERM, stop cleanly."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    try:
        await start()
        freeze_startup_heap()
        await done.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await stop()


# --------------------------------------------------------------------------- server
async def cmd_server_run(args: argparse.Namespace) -> int:
    from issuer.config import load_server_config
    from issuer.server import Server

    config = load_server_config(args.config)
    _setup_logging(config.log_level)
    server = Server(config)
    await run_until_signalled(server.start, server.stop)
    return 0


def _refuse_if_running(admin_socket: str) -> None:
    """MeshidError when a server answers on `admin_socket` (blocking: run it in a thread)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        if probe.connect_ex(admin_socket) == 0:
            raise MeshidError(f"the server is running (admin socket {admin_socket}); stop it first")


async def cmd_server_rewrap(args: argparse.Namespace) -> int:
    from issuer.ca.sealing import load_master_secret
    from issuer.config import load_server_config
    from issuer.server import rewrap

    config = load_server_config(args.config)
    if not (args.new_secret_file or args.new_secret_env):
        # load_master_secret's own message names the config keys, not these flags.
        raise MeshidError("no new master secret: pass --new-secret-file or --new-secret-env")
    new_secret = load_master_secret(args.new_secret_file, args.new_secret_env)
    # A running server keeps sealing the keys it makes under the old secret: afterwards
    # neither secret opens every key and the server cannot start again.
    await asyncio.to_thread(_refuse_if_running, config.admin_socket_path)
    n = await rewrap(config, new_secret)
    print(f"re-encrypted {n} CA keys under the new master secret; update the server's secret before restart")
    return 0


async def cmd_server_backup(args: argparse.Namespace) -> int:
    from issuer.config import load_server_config
    from issuer.datastore.factory import open_datastore

    config = load_server_config(args.config)
    parent = Path(args.output).resolve().parent  # noqa: ASYNC240 - a one-shot CLI command
    if not parent.is_dir():  # else the error names the temporary file written first
        raise MeshidError(f"--output {args.output}: directory {parent} does not exist")
    ds = await open_datastore(config.dsn)
    try:
        backup = getattr(ds, "backup", None)
        if backup is None:
            raise MeshidError(
                "online backup is built in for SQLite only; for PostgreSQL use pg_dump (see README)"
            )
        await backup(args.output)
    finally:
        await ds.close()
    print(
        f"backup written to {args.output} (its CA keys are encrypted: restoring needs the master "
        "secret, which you should store apart from the backups)"
    )
    return 0


async def cmd_server_restore(args: argparse.Namespace) -> int:
    from issuer.config import load_server_config
    from issuer.datastore.factory import datastore_for
    from issuer.datastore.sqlite import MEMORY, RestoreError, SqliteDataStore, restore_backup

    config = load_server_config(args.config)
    store = datastore_for(config.dsn)  # the same DSN parsing as the server, without connecting
    if not isinstance(store, SqliteDataStore) or store.path == MEMORY:
        raise MeshidError(
            "restore is built in for an SQLite file only; for PostgreSQL use pg_restore (see README)"
        )
    target, admin_socket = store.path, config.admin_socket_path

    def restore() -> None:
        # A server still running on the file would keep writing to the old database's WAL.
        _refuse_if_running(admin_socket)
        if os.path.exists(target) and not args.force:
            raise MeshidError(f"{target} exists; stop the server and pass --force to overwrite it")
        try:
            restore_backup(args.input, target)
        except RestoreError as exc:
            raise MeshidError(f"nothing restored: {exc}") from None

    await asyncio.to_thread(restore)
    print(f"restored {args.input} to {target}")
    return 0


# --------------------------------------------------------------------------- admin
async def _admin(
    args: argparse.Namespace, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
) -> Any:
    async with AdminClient(socket_path(args.server_socket)) as client:
        return await client.call(method, path, body, params)


def _entry_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for field in ("spiffe_id", "parent_id", "hint"):
        if getattr(args, field, None) is not None:
            body[field] = getattr(args, field)
    if args.selector:
        body["selectors"] = args.selector
    if args.dns_name:
        body["dns_names"] = args.dns_name
    if args.federates_with:
        body["federates_with"] = args.federates_with
    for field in ("x509_svid_ttl", "jwt_svid_ttl"):
        if getattr(args, field, None) is not None:
            body[field] = getattr(args, field)
    for flag in ("admin", "downstream"):  # unset: not sent (create: off; update: unchanged)
        if getattr(args, flag) is not None:
            body[flag] = getattr(args, flag)
    return body


async def cmd_entry(args: argparse.Namespace) -> int:
    op = args.entry_op
    if op == "create":
        _print(await _admin(args, "POST", "/v1/entries", _entry_body(args)))
    elif op == "list":
        params = {k: v for k, v in (("spiffe_id", args.spiffe_id), ("parent_id", args.parent_id)) if v}
        _print(await _admin(args, "GET", "/v1/entries", params=params))
    elif op == "show":
        _print(await _admin(args, "GET", f"/v1/entries/{args.id}"))
    elif op == "update":
        _print(await _admin(args, "PUT", f"/v1/entries/{args.id}", _entry_body(args)))
    elif op == "delete":
        _print(await _admin(args, "DELETE", f"/v1/entries/{args.id}"))
    return 0


async def cmd_token_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.ttl is not None:  # 0 is the server's to refuse, not a silent "use the default"
        body["ttl"] = args.ttl
    out = await _admin(args, "POST", "/v1/tokens", body)
    if args.spiffe_id:
        # Like SPIRE: register an alias for the agent this token will attest.
        await _admin(
            args,
            "POST",
            "/v1/entries",
            {
                "spiffe_id": args.spiffe_id,
                "parent_id": out["agent_id"],
                "selectors": [f"meshid:agent_id:{out['agent_id']}"],
            },
        )
    _print(out)
    return 0


async def cmd_agent_admin(args: argparse.Namespace) -> int:
    if args.agent_op == "list":
        _print(await _admin(args, "GET", "/v1/agents"))
    else:
        _print(await _admin(args, "POST", f"/v1/agents/{args.agent_op}", {"agent_id": args.agent_id}))
    return 0


async def cmd_bundle_show(args: argparse.Namespace) -> int:
    _print(await _admin(args, "GET", "/v1/bundle", params={"format": args.format}))
    return 0


async def cmd_ca(args: argparse.Namespace) -> int:
    op = args.ca_op
    if op == "show":
        _print(await _admin(args, "GET", "/v1/ca"))
    elif op in ("prepare", "activate"):
        _print(await _admin(args, "POST", f"/v1/ca/{op}", {"kind": args.kind}))
    else:
        body: dict[str, Any] = {"key_id": args.key_id}
        if op == "revoke":
            body["force"] = args.force
        _print(await _admin(args, "POST", f"/v1/ca/{op}", body))
    return 0


# --------------------------------------------------------------------------- agent, dev, workload client
async def cmd_agent_run(args: argparse.Namespace) -> int:
    from workload_api.agent import Agent
    from workload_api.config import load_agent_config

    config = load_agent_config(args.config)
    _setup_logging(config.log_level)
    agent = Agent(config)
    await run_until_signalled(agent.start, agent.stop)
    return 0


async def cmd_dev(args: argparse.Namespace) -> int:
    from meshid.cli.dev import run_dev

    _setup_logging("info")
    return await run_dev(args)


async def cmd_fetch(args: argparse.Namespace) -> int:
    from meshid.cli import workload_client

    return await workload_client.fetch(args)


async def cmd_validate(args: argparse.Namespace) -> int:
    from meshid.cli import workload_client

    return await workload_client.validate(args)


async def cmd_events_tail(args: argparse.Namespace) -> int:
    from issuer.config import load_server_config
    from issuer.datastore.factory import open_datastore
    from issuer.events.cloudevents import server_source
    from issuer.events.relay import tail_outbox
    from issuer.server import event_source_id, read_server_id

    config = load_server_config(args.config)
    ds = await open_datastore(config.dsn)
    try:
        # The relay's source, so event ids printed here are the ids Kafka consumers see.
        source_id = await ds.get_meta("event_source_id") or read_server_id(config)
        if source_id is None:
            raise MeshidError(f"no server id: set server.server_id or start the server once with data_dir "
                              f"{config.data_dir} (it keeps its id there)")
        source_id = await event_source_id(ds, source_id)
        await tail_outbox(ds, follow=args.follow, source=server_source(config.td.name, source_id))
    finally:
        await ds.close()
    return 0


async def cmd_detect(args: argparse.Namespace) -> int:
    from issuer.events.detector import run_detector_cli

    _setup_logging("info")
    return await run_detector_cli(args)


# --------------------------------------------------------------------------- parser
def _seconds(text: str) -> int:
    """argparse type of a lifetime: seconds, or a duration as in the config files ("1h", "30m")."""
    from meshid.configload import parse_duration

    try:
        return int(parse_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshid", description="SPIFFE-compatible mesh identity issuer")
    sub = p.add_subparsers(dest="command", required=True)

    def admin_parser(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--server-socket",
            help=f"the server's admin socket (server.admin_socket_path); default ${SOCKET_ENV}, "
            f"else {DEFAULT_SOCKET}",
        )

    dev = sub.add_parser("dev", help="server + agent in one process on SQLite, for one machine")
    dev.add_argument("--trust-domain", default="example.org")
    dev.add_argument("--socket", help="Workload API socket path (default <data-dir>/agent/public/api.sock)")
    dev.add_argument("--svid-ttl", default="1h", help="X509-SVID lifetime, e.g. 1h, 10m, 120s")
    dev.add_argument(
        "--data-dir",
        help="state directory (default $XDG_DATA_HOME/meshid/dev, else ~/.local/share/meshid/dev)",
    )
    dev.set_defaults(func=cmd_dev)

    server = sub.add_parser("server", help="run and maintain the server").add_subparsers(
        dest="server_op", required=True
    )
    s = server.add_parser("run", help="run the server (CA, agent API, admin socket) until SIGINT/SIGTERM")
    s.add_argument("--config", required=True, help="server TOML (keys: issuer/config.py)")
    s.set_defaults(func=cmd_server_run)
    s = server.add_parser(
        "rewrap",
        help="re-encrypt every CA key under a new master secret (every server on the datastore stopped)",
    )
    s.add_argument("--config", required=True)
    s.add_argument("--new-secret-file", help="file holding the new master secret")
    s.add_argument("--new-secret-env", help="environment variable holding the new master secret")
    s.set_defaults(func=cmd_server_rewrap)
    s = server.add_parser("backup", help="online, consistent backup of the SQLite datastore")
    s.add_argument("--config", required=True)
    s.add_argument("--output", required=True, help="backup file to write (0600)")
    s.set_defaults(func=cmd_server_backup)
    s = server.add_parser("restore", help="restore a SQLite backup (server stopped)")
    s.add_argument("--config", required=True)
    s.add_argument("--input", required=True, help="backup file to restore")
    s.add_argument("--force", action="store_true", help="replace an existing database")
    s.set_defaults(func=cmd_server_restore)

    entry = sub.add_parser("entry", help="registration entries").add_subparsers(
        dest="entry_op", required=True
    )
    entry_help = {"create": "register a workload or node alias", "list": "list entries (filters optional)",
                  "show": "show one entry", "update": "change the given fields of an entry",
                  "delete": "delete an entry"}
    for op in ("create", "list", "show", "update", "delete"):
        e = entry.add_parser(op, help=entry_help[op])
        admin_parser(e)
        if op in ("show", "update", "delete"):
            e.add_argument("id", help="entry id")
        if op in ("create", "update", "list"):
            e.add_argument("--spiffe-id", dest="spiffe_id", help="the workload's SPIFFE ID")
            e.add_argument("--parent-id", dest="parent_id",
                           help="the agent (or node alias) it is issued through")
        if op in ("create", "update"):
            e.add_argument("--selector", action="append", default=[], help="type:value (repeatable)")
            e.add_argument("--dns-name", action="append", default=[], help="DNS SAN (repeatable)")
            e.add_argument("--federates-with", action="append", default=[],
                           help="trust domain whose bundle the workload also gets (repeatable)")
            e.add_argument("--x509-svid-ttl", type=_seconds, help="seconds or e.g. 30m (default: server's)")
            e.add_argument("--jwt-svid-ttl", type=_seconds, help="seconds or e.g. 5m (default: the server's)")
            e.add_argument("--hint", help="tells a workload's SVIDs apart (Workload API hint)")
            e.add_argument("--admin", action=argparse.BooleanOptionalAction,
                           help="the SVID may call the admin APIs (--no-admin on update takes it away)")
            e.add_argument("--downstream", action=argparse.BooleanOptionalAction,
                           help="the SVID may sign downstream CAs (--no-downstream takes it away)")
        e.set_defaults(func=cmd_entry)

    token = sub.add_parser("token", help="join tokens").add_subparsers(dest="token_op", required=True)
    t = token.add_parser("create", help="make a single-use join token for one agent")
    admin_parser(t)
    t.add_argument(
        "--ttl", type=_seconds,
        help="token lifetime: seconds or e.g. 1h (default: node_attestors.join_token.default_ttl)",
    )
    t.add_argument("--spiffe-id", help="also register this ID as an alias of the agent")
    t.set_defaults(func=cmd_token_create)

    agent = sub.add_parser("agent", help="run the agent, or manage agents").add_subparsers(
        dest="agent_op", required=True
    )
    a = agent.add_parser("run", help="run the agent (Workload API on a Unix socket) until SIGINT/SIGTERM")
    a.add_argument("--config", required=True, help="agent TOML (keys: workload_api/config.py)")
    a.set_defaults(func=cmd_agent_run)
    agent_help = {"list": "list attested agents", "evict": "forget an agent (it must attest again)",
                  "ban": "refuse an agent until it is evicted"}
    for op in ("list", "evict", "ban"):
        a = agent.add_parser(op, help=agent_help[op])
        admin_parser(a)
        if op != "list":
            a.add_argument("agent_id", help="the agent's SPIFFE ID")
        a.set_defaults(func=cmd_agent_admin)

    bundle = sub.add_parser("bundle", help="the trust bundle").add_subparsers(dest="bundle_op", required=True)
    b = bundle.add_parser("show", help="print the trust domain's bundle")
    admin_parser(b)
    b.add_argument("--format", choices=("pem", "spiffe"), default="pem")
    b.set_defaults(func=cmd_bundle_show)

    ca = sub.add_parser("ca", help="CA keys: show, prepare, activate, taint, revoke").add_subparsers(
        dest="ca_op", required=True
    )
    ca_help = {"show": "list CA keys and their states",
               "prepare": "make the next key (published in the bundle)",
               "activate": "sign with the prepared key", "taint": "re-issue everything signed by a key",
               "revoke": "remove a key from the bundle"}
    for op in ("show", "prepare", "activate", "taint", "revoke"):
        c = ca.add_parser(op, help=ca_help[op])
        admin_parser(c)
        if op in ("prepare", "activate"):
            c.add_argument("--kind", choices=("x509", "jwt"), default="x509")
        if op in ("taint", "revoke"):
            c.add_argument("key_id")
        if op == "revoke":
            c.add_argument("--force", action="store_true", help="revoke even while SVIDs it signed are valid")
        c.set_defaults(func=cmd_ca)

    fetch = sub.add_parser("fetch", help="Workload API client").add_subparsers(dest="fetch_op", required=True)
    socket_help = "Workload API socket, unix:///path (default $SPIFFE_ENDPOINT_SOCKET)"
    f = fetch.add_parser("x509", help="print the X509-SVIDs' SPIFFE IDs and expiry")
    f.add_argument("--socket", help=socket_help)
    f.add_argument("--write", metavar="DIR", help="write svid.pem, svid.key, bundle.pem")
    f.set_defaults(func=cmd_fetch)
    f = fetch.add_parser("jwt", help="print a JWT-SVID")
    f.add_argument("--socket", help=socket_help)
    f.add_argument("--audience", action="append", required=True, help="audience (repeatable)")
    f.add_argument("--spiffe-id", help="which of the workload's identities (default: one JWT-SVID for each)")
    f.set_defaults(func=cmd_fetch)
    f = fetch.add_parser("bundles", help="print the X.509 and JWT bundles")
    f.add_argument("--socket", help=socket_help)
    f.set_defaults(func=cmd_fetch)

    validate = sub.add_parser("validate", help="Workload API: validate a token").add_subparsers(
        dest="validate_op", required=True)
    v = validate.add_parser("jwt", help="validate a JWT-SVID (ValidateJWTSVID)")
    v.add_argument("--socket", help=socket_help)
    v.add_argument("--audience", required=True, help="the audience the token must name")
    v.add_argument("--token", required=True, help="the JWT-SVID")
    v.set_defaults(func=cmd_validate)

    events = sub.add_parser("events", help="issuance events").add_subparsers(dest="events_op", required=True)
    ev = events.add_parser("tail", help="read the event outbox (works without Kafka)")
    ev.add_argument("--config", required=True, help="the server's TOML (for its datastore)")
    ev.add_argument("--follow", action="store_true", help="keep printing new events")
    ev.set_defaults(func=cmd_events_tail)

    det = sub.add_parser("detect", help="reference anomaly detector (Kafka consumer group)")
    det.add_argument("--bootstrap", required=True, help="HOST:PORT")
    det.add_argument("--config", help="detector TOML (thresholds)")
    det.add_argument("--state", default="meshid-detector-state.json", help="where its state is kept")
    det.add_argument("--group", default="meshid-detector", help="Kafka consumer group")
    det.add_argument("--events-topic", default="meshid.events", help="topic to read")
    det.add_argument("--alerts-topic", default="meshid.alerts", help="topic to write alerts to")
    det.set_defaults(func=cmd_detect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(args.func(args))
    except AdminError as exc:
        print(f"meshid: {exc}", file=sys.stderr)
        return 1
    except MeshidError as exc:
        print(f"meshid: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `meshid entry list | head`: the reader left; say nothing more, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        print(f"meshid: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
