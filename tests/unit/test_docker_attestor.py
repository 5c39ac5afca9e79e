"""docker workload attestor against a Docker Engine API shape served on a real Unix socket."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from attestors.workload.base import Caller
from attestors.workload.docker import DockerWorkloadAttestor, container_selectors
from meshid.errors import AttestationError, ConfigError

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "k8s" / "docker" / "container-inspect.json"
CID = "7be3c1f0a2d94e5b8c6a1f2e3d4c5b6a7980f1e2d3c4b5a6978877665544332a"
OTHER_CID = "c" * 64


def inspect_fixture() -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(FIXTURE.read_text())
    return obj


@dataclass
class FakeDocker:
    containers: dict[str, dict[str, Any]] = field(default_factory=dict)
    mode: str | None = None  # "malformed", "wrong-id", "error"
    paths: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/containers/{id}/json", self.inspect)
        return app

    async def inspect(self, request: web.Request) -> web.StreamResponse:
        self.paths.append(request.path)
        cid = request.match_info["id"]
        if self.mode == "malformed":
            return web.Response(text="{'Id': ", content_type="application/json")
        if self.mode == "error":
            return web.json_response({"message": "daemon is shutting down"}, status=500)
        container = self.containers.get(cid)
        if container is None:
            # Docker's error body for an unknown container.
            return web.json_response({"message": f"No such container: {cid}"}, status=404)
        body = copy.deepcopy(container)
        if self.mode == "wrong-id":
            body["Id"] = OTHER_CID
        return web.json_response(body)


def write_proc(root: Path, pid: int, cgroup: str) -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "cgroup").write_text(cgroup)
    fields = ["S", "1", str(pid), str(pid), "0", "-1", "4194560"] + ["0"] * 12 + ["777", "0"]
    (d / "stat").write_text(f"{pid} (nginx) " + " ".join(fields) + "\n")


@dataclass
class DockerEnv:
    docker: FakeDocker
    socket: Path
    proc: Path
    attestors: list[DockerWorkloadAttestor]

    def make(self, **overrides: Any) -> DockerWorkloadAttestor:
        config: dict[str, Any] = {
            "docker_socket_path": f"unix://{self.socket}",
            "env_allow_list": ["SERVICE_NAME", "NGINX_VERSION"],
            "proc_root": str(self.proc),
            "timeout": 5,
        }
        config.update(overrides)
        attestor = DockerWorkloadAttestor.from_config(config)
        self.attestors.append(attestor)
        return attestor


@pytest.fixture
async def docker_env(tmp_path: Path) -> AsyncIterator[DockerEnv]:
    docker = FakeDocker(containers={CID: inspect_fixture()})
    sock = tmp_path / "docker.sock"
    runner = web.AppRunner(docker.app())
    await runner.setup()
    await web.UnixSite(runner, str(sock)).start()
    proc = tmp_path / "proc"
    write_proc(proc, 10, f"0::/system.slice/docker-{CID}.scope\n")  # cgroup v2, systemd driver
    write_proc(proc, 11, f"12:pids:/docker/{CID}\n1:name=systemd:/docker/{CID}\n0::/\n")  # v1, cgroupfs
    write_proc(proc, 12, "0::/user.slice/user-1000.slice/session-2.scope\n")
    write_proc(proc, 13, f"0::/kubepods.slice/kubepods-podx.slice/cri-containerd-{OTHER_CID}.scope\n")
    env = DockerEnv(docker, sock, proc, [])
    yield env
    for attestor in env.attestors:
        await attestor.close()
    await runner.cleanup()


EXPECTED = {
    "docker:label:com.docker.compose.project:shop",
    "docker:label:com.docker.compose.service:frontend",
    "docker:label:maintainer:NGINX Docker Maintainers <docker-maint@nginx.com>",
    "docker:image_id:nginx:1.27",
    "docker:image_id:sha256:5ef79149e0ec84a7a9f9284c3f91aa3c20608f8391f5445eabe92ef07dbda03c",
    "docker:env:SERVICE_NAME=frontend",
    "docker:env:NGINX_VERSION=1.27.5",
}


@pytest.mark.parametrize("pid", [10, 11])
async def test_docker_selectors(docker_env: DockerEnv, pid: int) -> None:
    attestor = docker_env.make()
    selectors = await attestor.attest(Caller(pid=pid, uid=101, gid=101, start_time=777))
    assert {str(s) for s in selectors} == EXPECTED
    assert docker_env.docker.paths == [f"/containers/{CID}/json"]


async def test_docker_env_only_allow_listed(docker_env: DockerEnv) -> None:
    attestor = docker_env.make(env_allow_list=[])
    values = {s.value for s in await attestor.attest(Caller(pid=10, uid=0, gid=0))}
    assert not any(v.startswith("env:") for v in values)
    # A secret in the environment never becomes a selector unless allow-listed by name.
    assert not any("hunter2" in v for v in values)


async def test_docker_not_in_a_container(docker_env: DockerEnv) -> None:
    attestor = docker_env.make()
    assert await attestor.attest(Caller(pid=12, uid=1000, gid=1000)) == []
    assert docker_env.docker.paths == []


async def test_docker_unknown_container_gets_nothing(docker_env: DockerEnv) -> None:
    # A container of another runtime (here containerd) that Docker does not know.
    attestor = docker_env.make()
    assert await attestor.attest(Caller(pid=13, uid=0, gid=0)) == []
    assert docker_env.docker.paths == [f"/containers/{OTHER_CID}/json"]


@pytest.mark.parametrize(
    ("mode", "match"),
    [("malformed", "not valid JSON"), ("wrong-id", "does not match"), ("error", "HTTP 500")],
)
async def test_docker_fails_closed(docker_env: DockerEnv, mode: str, match: str) -> None:
    docker_env.docker.mode = mode
    attestor = docker_env.make()
    with pytest.raises(AttestationError, match=match):
        await attestor.attest(Caller(pid=10, uid=0, gid=0))


async def test_docker_socket_missing(docker_env: DockerEnv, tmp_path: Path) -> None:
    attestor = docker_env.make(docker_socket_path=str(tmp_path / "absent.sock"))
    with pytest.raises(AttestationError, match="unreachable"):
        await attestor.attest(Caller(pid=10, uid=0, gid=0))


async def test_docker_recycled_pid(docker_env: DockerEnv) -> None:
    attestor = docker_env.make()
    with pytest.raises(AttestationError, match="reused"):
        await attestor.attest(Caller(pid=10, uid=0, gid=0, start_time=1))


def test_container_selectors_pure() -> None:
    container = inspect_fixture()
    container["Config"]["Labels"]["bad"] = "a\x00b"
    container["Config"]["Env"].append("NOEQUALS")
    values = {str(s) for s in container_selectors(container, frozenset({"SERVICE_NAME", "NOEQUALS"}))}
    assert "docker:env:SERVICE_NAME=frontend" in values
    assert not any(v.startswith(("docker:label:bad", "docker:env:NOEQUALS")) for v in values)
    assert container_selectors({}, frozenset()) == []


def test_container_label_keys_with_a_colon_are_left_out() -> None:
    """`label:<key>:<value>` with a ':' in the key reads two ways: an image carrying label
    `role:web`=`x` produced the same selector as the operator's `role`=`web:x`."""
    container = inspect_fixture()
    container["Config"]["Labels"] = {"role:web": "x", "tier": "web:x"}
    values = {str(s) for s in container_selectors(container, frozenset())}
    assert "docker:label:tier:web:x" in values
    assert not any(v.startswith("docker:label:role") for v in values)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"docker_socket_path": "tcp://127.0.0.1:2375"}, "absolute path"),
        ({"env_allow_list": ["A=B"]}, "without '='"),
        ({"env_allow_list": "SERVICE_NAME"}, "list of non-empty strings"),
        ({"docker_host": "x"}, "unknown key"),
    ],
)
def test_docker_config_errors(config: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DockerWorkloadAttestor.from_config(config)


def test_docker_config_defaults() -> None:
    attestor = DockerWorkloadAttestor.from_config({})
    assert attestor.name == "docker"
    assert attestor._docker._unix_socket == "/var/run/docker.sock"
