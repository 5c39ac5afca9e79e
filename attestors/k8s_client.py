"""A small JSON-over-HTTP client for the Kubernetes API server, the kubelet and Docker.

Deliberately narrow: GET/POST of JSON objects, a bearer token re-read from its file on
every request (projected tokens rotate), TLS verified against a CA file (or, only when
the operator says so explicitly, not verified), a total timeout, a response size limit
and a check that the body is a JSON object. Unix sockets are supported for Docker.

Errors are `K8sApiError` (an AttestationError) whose messages name the method, path and
status but never the token or the response body (a TokenReview response echoes the token).
"""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path
from typing import Any

import aiohttp

from meshid.errors import AttestationError, ConfigError
from meshid.http_body import read_bounded

IN_CLUSTER_TOKEN_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
IN_CLUSTER_CA_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_TOKEN_BYTES = 64 * 1024


class K8sApiError(AttestationError):
    """A request failed: unreachable, timed out, bad status, too large or not JSON."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class K8sNotFoundError(K8sApiError):
    """The server answered 404."""


def read_token_file(path: str | Path) -> str:
    """Read a bearer token file (small, whitespace-trimmed). Errors never include contents."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise AttestationError(f"cannot read token file {path}: {exc.strerror}") from exc
    if len(data) > MAX_TOKEN_BYTES:
        raise AttestationError(f"token file {path} is too large")
    token = data.decode("ascii", errors="replace").strip()
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise AttestationError(f"token file {path} does not hold a single token")
    return token


def in_cluster_api_server() -> str:
    """The API server URL from the environment every pod gets."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise ConfigError("api_server: not set and KUBERNETES_SERVICE_HOST is not in the environment")
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"https://{host}:{port}"


class ApiClient:
    """One base URL, one credential set, one lazily-created aiohttp session.

    `token` (a fixed string) or `token_file` (re-read per request) give the bearer token;
    `ca_file` is the CA bundle to verify the server with; `insecure_skip_verify` turns
    verification off (for kubelets with self-signed serving certs; never the default);
    `unix_socket` sends requests over a Unix socket (base_url then only sets the Host).
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        token_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        insecure_skip_verify: bool = False,
        unix_socket: str | Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        if not base_url.startswith(("https://", "http://")):
            raise ConfigError(f"base URL {base_url!r} must be http(s)://")
        if base_url.startswith("http://") and unix_socket is None:
            # Tokens and identities never travel in clear text over TCP.
            raise ConfigError(f"base URL {base_url!r}: plain HTTP is only allowed over a Unix socket")
        if token is not None and token_file is not None:
            raise ConfigError("give either a token or a token file, not both")
        if timeout <= 0:
            raise ConfigError("timeout must be positive")
        if max_body_bytes <= 0:
            raise ConfigError("max_body_bytes must be positive")
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._token_file = token_file
        self._ca_file = ca_file
        self._insecure = insecure_skip_verify
        self._unix_socket = str(unix_socket) if unix_socket is not None else None
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_body = max_body_bytes
        self._session: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | None = None
        if self.base_url.startswith("https://"):
            self._ssl = self._make_ssl_context()

    def _make_ssl_context(self) -> ssl.SSLContext:
        if self._insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        try:
            ctx = ssl.create_default_context(cafile=str(self._ca_file) if self._ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"ca_file {self._ca_file}: cannot load CA certificates ({exc})") from exc
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector: aiohttp.BaseConnector
            if self._unix_socket is not None:
                connector = aiohttp.UnixConnector(path=self._unix_socket)
            else:
                connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else False)
            # trust_env stays off: an HTTP(S)_PROXY in the environment must not see tokens.
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self._token
        if token is None and self._token_file is not None:
            token = read_token_file(self._token_file)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def get_json(self, path: str) -> dict[str, Any]:
        return await self._request("GET", path, None)

    async def post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._request("POST", path, body)

    async def _request(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        if not path.startswith("/"):
            raise ValueError("path must start with '/'")
        what = f"{method} {path}"
        headers = self._headers()
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        try:
            async with self._get_session().request(
                method, self.base_url + path, headers=headers, data=data, allow_redirects=False
            ) as resp:
                raw = await self._read_limited(resp, what)
                status = resp.status
        except K8sApiError:
            raise
        except TimeoutError as exc:
            raise K8sApiError(f"{what}: timed out") from exc
        except aiohttp.ClientSSLError as exc:
            raise K8sApiError(f"{what}: TLS verification failed") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise K8sApiError(f"{what}: unreachable ({type(exc).__name__})") from exc
        if status == 404:
            raise K8sNotFoundError(f"{what}: not found", status)
        if not 200 <= status < 300:
            raise K8sApiError(f"{what}: HTTP {status}", status)
        return _decode_object(raw, what)

    async def _read_limited(self, resp: aiohttp.ClientResponse, what: str) -> bytes:
        body = await read_bounded(resp, self._max_body)
        if body is None:
            raise K8sApiError(f"{what}: response larger than {self._max_body} bytes")
        return body


def _decode_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise K8sApiError(f"{what}: response is not valid JSON") from exc
    if not isinstance(obj, dict):
        raise K8sApiError(f"{what}: response is not a JSON object")
    return obj


def expect_kind(obj: dict[str, Any], kind: str, api_version: str, what: str) -> None:
    """Check `kind`/`apiVersion` when the server sent them (the kubelet's /pods may omit them)."""
    got_kind = obj.get("kind")
    got_version = obj.get("apiVersion")
    if got_kind is not None and got_kind != kind:
        raise K8sApiError(f"{what}: expected kind {kind}, got {str(got_kind)[:64]!r}")
    if got_version is not None and got_version != api_version:
        raise K8sApiError(f"{what}: expected apiVersion {api_version}, got {str(got_version)[:64]!r}")


def get_str(obj: Any, *keys: str) -> str | None:
    """Walk nested JSON objects; the value at the end if it is a non-empty string, else None."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj if isinstance(obj, str) and obj else None


def get_dict(obj: Any, *keys: str) -> dict[str, Any]:
    """Walk nested JSON objects; the object at the end, or {} when absent or not an object."""
    for key in keys:
        if not isinstance(obj, dict):
            return {}
        obj = obj.get(key)
    return obj if isinstance(obj, dict) else {}


def get_list(obj: Any, *keys: str) -> list[Any]:
    """Walk nested JSON objects; the list at the end, or [] when absent or not a list."""
    for key in keys:
        if not isinstance(obj, dict):
            return []
        obj = obj.get(key)
    return obj if isinstance(obj, list) else []


# --- Config-section reading shared by the attestors built on this client -------------------

_MISSING: Any = object()


class ConfigSection:
    """Typed access to one plain-dict config section; errors name `section.key` and the reason.

    Call `done()` at the end: unknown keys are errors, so a typo cannot silently leave a
    security setting at its default.
    """

    def __init__(self, name: str, data: Any) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{name}: must be a table")
        self.name = name
        self._data = data
        self._seen: set[str] = set()

    def _get(self, key: str, default: Any) -> Any:
        self._seen.add(key)
        if key in self._data:
            return self._data[key]
        if default is _MISSING:
            raise ConfigError(f"{self.name}.{key}: required")
        return default

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.name}.{key}: {reason}")

    def string(self, key: str, default: Any = _MISSING) -> Any:
        value = self._get(key, default)
        if value is not default and (not isinstance(value, str) or not value):
            raise self.error(key, "must be a non-empty string")
        return value

    def string_list(self, key: str, default: Any = _MISSING) -> list[str]:
        value = self._get(key, default)
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, "must be a list of non-empty strings")
        return list(value)

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, "must be true or false")
        return value

    def number(self, key: str, default: Any = _MISSING, *, minimum: float = 0.0) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            raise self.error(key, f"must be a number >= {minimum}")
        return float(value)

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int = 0) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"must be an integer >= {minimum}")
        return value

    def table(self, key: str, default: Any = _MISSING) -> dict[str, Any]:
        value = self._get(key, default)
        if not isinstance(value, dict):
            raise self.error(key, "must be a table")
        return value

    def done(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise ConfigError(f"{self.name}: unknown key(s) {', '.join(map(repr, unknown))}")
