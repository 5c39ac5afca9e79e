"""Client of the server's admin Unix socket, used by the CLI and by tests."""

from __future__ import annotations

import os
from typing import Any

import aiohttp

from meshid.errors import MeshidError

SOCKET_ENV = "MESHID_SERVER_SOCKET"
# Where deploy/systemd/server.toml (and README's minimal config) put the server's admin socket.
DEFAULT_SOCKET = "/run/meshid/admin.sock"


class AdminError(MeshidError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def socket_path(explicit: str | None) -> str:
    return explicit or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class AdminClient:
    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.path = path
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminClient:
        if not os.path.exists(self.path):  # noqa: ASYNC240 - a CLI, before any I/O starts
            raise AdminError(
                0,
                "unavailable",
                f"no server admin socket at {self.path} (is the server running? "
                f"set --server-socket or {SOCKET_ENV})",
            )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=self.path), timeout=aiohttp.ClientTimeout(total=self.timeout)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> Any:
        assert self._session is not None
        try:
            async with self._session.request(
                method, "http://meshid" + path, json=body, params=params
            ) as resp:
                if resp.content_type == "application/json":
                    data = await resp.json()
                else:
                    data = await resp.read()
                if resp.status >= 400:
                    err = data.get("error", {}) if isinstance(data, dict) else {}
                    raise AdminError(resp.status, err.get("code", "error"), err.get("message", str(data)))
                return data
        except aiohttp.ClientConnectionError as exc:
            raise AdminError(
                0, "unavailable", f"cannot reach server admin socket {self.path}: {exc}"
            ) from None
        except TimeoutError:
            # aiohttp's total timeout is a bare TimeoutError: the CLI printed "meshid: " and nothing.
            raise AdminError(
                0, "timeout", f"the server did not answer on {self.path} within {self.timeout:g} s"
            ) from None
