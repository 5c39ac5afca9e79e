"""docker workload attestor: container identity from the Docker Engine API (SPIRE-compatible).

The container ID comes from /proc/<pid>/cgroup; the container from
`GET /containers/{id}/json` on the Docker Unix socket. Selectors (type `docker`):
`label:<k>:<v>` for every container label, `image_id:<Config.Image>` (the reference the
container was started from, as SPIRE spells it) and `image_id:<Image>` (the content ID,
`sha256:…`), and `env:<NAME>=<value>` only for variables on the allow-list (environments
often carry secrets). A process in no container, or in a container Docker does not know
(another runtime), gets no docker selectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from attestors.k8s_client import (
    ApiClient,
    ConfigSection,
    K8sApiError,
    K8sNotFoundError,
    get_dict,
    get_list,
    get_str,
)
from attestors.workload.base import Caller
from attestors.workload.cgroups import read_container_info
from meshid.errors import AttestationError, InvalidSelectorError
from meshid.selector import Selector

NAME = "docker"
DEFAULT_SOCKET_PATH = "/var/run/docker.sock"


def container_selectors(container: Mapping[str, Any], env_allow_list: frozenset[str]) -> list[Selector]:
    """Selectors for one inspected container (pure)."""
    values: list[str] = []
    for key, value in get_dict(container, "Config", "Labels").items():
        # A ':' in the key makes `label:a:b:c` ambiguous (a=b:c or a:b=c): an image's own
        # label `role:web`=`x` matched an entry meant for the operator's `role`=`web:x`.
        if isinstance(value, str) and ":" not in key:
            values.append(f"label:{key}:{value}")
    for image in (get_str(container, "Config", "Image"), get_str(container, "Image")):
        if image:
            values.append(f"image_id:{image}")
    for item in get_list(container, "Config", "Env"):
        if isinstance(item, str):
            name, sep, _ = item.partition("=")
            if sep and name in env_allow_list:
                values.append(f"env:{item}")
    selectors = set()
    for value in values:
        try:
            selectors.add(Selector(NAME, value))
        except InvalidSelectorError:
            continue  # over-long or control characters: leave it out
    return sorted(selectors)


class DockerWorkloadAttestor:
    """Agent-side docker workload attestor. Owns its Docker client; call close()."""

    name = NAME

    def __init__(
        self,
        docker: ApiClient,
        *,
        env_allow_list: frozenset[str] = frozenset(),
        proc_root: str | Path = "/proc",
    ) -> None:
        self._docker = docker
        self._env_allow = frozenset(env_allow_list)
        self._proc_root = proc_root

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DockerWorkloadAttestor:
        """Build from `[workload_attestors.docker]`.

        Keys: `docker_socket_path` (default /var/run/docker.sock, `unix://` prefix allowed),
        `env_allow_list` (variable names; default none), `timeout` (5 s), `proc_root`.
        """
        section = ConfigSection("workload_attestors.docker", dict(config))
        socket_path = section.string("docker_socket_path", DEFAULT_SOCKET_PATH)
        socket_path = socket_path.removeprefix("unix://")
        if not socket_path.startswith("/"):
            raise section.error("docker_socket_path", "must be an absolute path to a Unix socket")
        env_allow = section.string_list("env_allow_list", [])
        for name in env_allow:
            if "=" in name:
                raise section.error("env_allow_list", f"{name!r} must be a variable name without '='")
        timeout = section.number("timeout", 5.0, minimum=0.1)
        proc_root = section.string("proc_root", "/proc")
        section.done()
        # Docker answers plain HTTP on its socket; the host part only fills the Host header.
        client = ApiClient(
            "http://docker", unix_socket=socket_path, timeout=timeout, max_body_bytes=4 * 1024 * 1024
        )
        return cls(client, env_allow_list=frozenset(env_allow), proc_root=proc_root)

    async def close(self) -> None:
        await self._docker.close()

    async def attest(self, caller: Caller) -> list[Selector]:
        info = read_container_info(caller.pid, self._proc_root, caller.start_time)
        if info.container_id is None:
            return []
        try:
            container = await self._docker.get_json(f"/containers/{info.container_id}/json")
        except K8sNotFoundError:
            return []
        except K8sApiError as exc:
            raise AttestationError(f"docker: {exc}") from exc
        # Docker also resolves names and ID prefixes; insist on the exact container.
        if get_str(container, "Id") != info.container_id:
            raise AttestationError("docker: inspected container ID does not match the cgroup")
        return container_selectors(container, self._env_allow)
