"""k8s workload attestor: pod and container identity through the kubelet (SPIRE-compatible).

The caller's pod UID and container ID come from /proc/<pid>/cgroup; the pod itself from the
kubelet's secure port (`GET /pods`, a v1 PodList), authenticated with the agent's service
account token and verified against the kubelet CA (or not verified, only when the operator
sets `skip_kubelet_verification`). A pod that started a moment ago may not be listed yet,
or list its container without an ID, so the lookup is retried a bounded number of times.
As SPIRE's attestor does, attestations share the pod list: one fetch serves every caller
waiting for it, and answers callers for half the retry interval after it was requested.
A retry sleeps a whole interval, so it never gets the list it saw again, while the retries
of a node's starting workloads share their fetches. A node's list runs to megabytes, and
fetching and parsing it per caller held the event loop for each workload of a starting node.

Selectors (type `k8s`): ns, sa, pod-uid, pod-name, node-name, pod-label:k:v,
pod-owner:Kind:name, pod-owner-uid:Kind:uid, container-name, container-image, pod-image,
pod-init-image, pod-image-count, pod-init-image-count. A process that is not in a pod gets none.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from attestors.k8s_client import (
    IN_CLUSTER_CA_FILE,
    IN_CLUSTER_TOKEN_FILE,
    ApiClient,
    ConfigSection,
    K8sApiError,
    expect_kind,
    get_dict,
    get_list,
    get_str,
)
from attestors.workload.base import Caller
from attestors.workload.cgroups import ContainerInfo, read_container_info
from meshid.errors import AttestationError, ConfigError, InvalidSelectorError
from meshid.selector import Selector

NAME = "k8s"
DEFAULT_KUBELET_PORT = 10250
DEFAULT_MAX_POLL_ATTEMPTS = 60
DEFAULT_POLL_RETRY_INTERVAL = 0.5
# A node runs at most a few hundred pods; their PodList stays well below this.
DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024
_STATUS_LISTS = ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses")


def _container_id(status: Any) -> str | None:
    """`containerd://<id>`, `cri-o://<id>`, `docker://<id>` -> `<id>`."""
    raw = get_str(status, "containerID")
    if raw is None:
        return None
    _, sep, cid = raw.partition("://")
    return cid if sep and cid else None


def find_container(
    pod_list: Mapping[str, Any], info: ContainerInfo
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The (pod, container status) the cgroup info points at, or None if not listed (yet).

    Raises AttestationError if the container is listed under a different pod than the
    cgroup says: the kubelet and the kernel disagree, so nothing is trusted. The whole
    list is read: returning at the first match let a second pod listed later with the same
    container ID go unseen, so the answer depended on the order of the list.
    """
    found: tuple[dict[str, Any], dict[str, Any]] | None = None
    for pod in get_list(pod_list, "items"):
        if not isinstance(pod, dict):
            continue
        for list_name in _STATUS_LISTS:
            for status in get_list(pod, "status", list_name):
                if isinstance(status, dict) and _container_id(status) == info.container_id:
                    if get_str(pod, "metadata", "uid") != info.pod_uid:
                        raise AttestationError("container is listed under a different pod than its cgroup")
                    if found is None:
                        found = pod, status
    return found


def pod_selectors(pod: Mapping[str, Any], status: Mapping[str, Any]) -> list[Selector]:
    """Selectors for one container of one pod (pure, so tests and benchmarks call it directly)."""
    values: list[str] = []

    def add(key: str, value: str | None) -> None:
        if value:
            values.append(f"{key}:{value}")

    add("ns", get_str(pod, "metadata", "namespace"))
    add("sa", get_str(pod, "spec", "serviceAccountName") or get_str(pod, "spec", "serviceAccount"))
    add("pod-uid", get_str(pod, "metadata", "uid"))
    add("pod-name", get_str(pod, "metadata", "name"))
    add("node-name", get_str(pod, "spec", "nodeName"))
    # Keys and kinds with a ':' would make `pod-label:a:b:c` ambiguous (a=b:c or a:b=c); the
    # API server refuses them, the kubelet's answer is checked all the same.
    for key, value in get_dict(pod, "metadata", "labels").items():
        if isinstance(value, str) and ":" not in key:
            values.append(f"pod-label:{key}:{value}")
    for owner in get_list(pod, "metadata", "ownerReferences"):
        kind, name, uid = get_str(owner, "kind"), get_str(owner, "name"), get_str(owner, "uid")
        if kind and ":" in kind:
            continue
        if kind and name:
            values.append(f"pod-owner:{kind}:{name}")
        if kind and uid:
            values.append(f"pod-owner-uid:{kind}:{uid}")
    add("container-name", get_str(status, "name"))
    # Both the image reference and the resolved image ID, as SPIRE does: entries may pin either.
    add("container-image", get_str(status, "image"))
    add("container-image", get_str(status, "imageID"))
    for list_name, key in (("containerStatuses", "pod-image"), ("initContainerStatuses", "pod-init-image")):
        others = get_list(pod, "status", list_name)
        # SPIRE's pod-image-count / pod-init-image-count (0 included): entries written for
        # SPIRE with them never matched here.
        values.append(f"{key}-count:{len(others)}")
        for other in others:
            add(key, get_str(other, "image"))
            add(key, get_str(other, "imageID"))
    selectors = set()
    for value in values:
        try:
            selectors.add(Selector(NAME, value))
        except InvalidSelectorError:
            # Over-long or control characters (labels are user data): leave it out, never fail open.
            continue
    return sorted(selectors)


class K8sWorkloadAttestor:
    """Agent-side k8s workload attestor. Owns its kubelet client; call close()."""

    name = NAME

    def __init__(
        self,
        kubelet: ApiClient,
        *,
        proc_root: str | Path = "/proc",
        max_poll_attempts: int = DEFAULT_MAX_POLL_ATTEMPTS,
        poll_retry_interval: float = DEFAULT_POLL_RETRY_INTERVAL,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_poll_attempts < 1:
            raise ConfigError("workload_attestors.k8s.max_poll_attempts: must be >= 1")
        self._kubelet = kubelet
        self._proc_root = proc_root
        self._attempts = max_poll_attempts
        self._interval = poll_retry_interval
        self._sleep = sleep
        self._clock = clock
        # (when the fetch began, the pod list); the fetch under way, by when it began.
        self._cached: tuple[float, Mapping[str, Any]] | None = None
        self._fetching: tuple[float, asyncio.Task[Mapping[str, Any]]] | None = None
        # Every fetch not ended: one a newer fetch superseded still runs for its waiters.
        self._fetches: set[asyncio.Task[Mapping[str, Any]]] = set()

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        environ: Mapping[str, str] | None = None,
    ) -> K8sWorkloadAttestor:
        """Build from `[workload_attestors.k8s]`.

        Keys: `kubelet_host` (explicit host) or `kubelet_host_env` (name of an environment
        variable holding it, e.g. MY_NODE_IP from the downward API), default 127.0.0.1;
        `kubelet_secure_port` (10250); `token_path`, `kubelet_ca_path` (default: the pod's
        service-account token and CA); `skip_kubelet_verification` (false);
        `max_poll_attempts` (60); `poll_retry_interval` (0.5 s); `timeout` (5 s);
        `proc_root` ("/proc").
        """
        env = os.environ if environ is None else environ
        section = ConfigSection("workload_attestors.k8s", dict(config))
        host = section.string("kubelet_host", None)
        host_env = section.string("kubelet_host_env", None)
        if host is not None and host_env is not None:
            raise section.error("kubelet_host_env", "give kubelet_host or kubelet_host_env, not both")
        if host_env is not None:
            host = env.get(host_env)
            if not host:
                raise section.error("kubelet_host_env", f"environment variable {host_env} is not set")
        host = host or "127.0.0.1"
        if any(c in host for c in "/@?#") or host.startswith("["):
            raise section.error("kubelet_host", "must be a host name or IP address")
        port = section.integer("kubelet_secure_port", DEFAULT_KUBELET_PORT, minimum=1)
        if port > 65535:
            raise section.error("kubelet_secure_port", "must be <= 65535")
        skip = section.boolean("skip_kubelet_verification", False)
        token_path = section.string("token_path", IN_CLUSTER_TOKEN_FILE)
        ca_path = section.string("kubelet_ca_path", IN_CLUSTER_CA_FILE)
        attempts = section.integer("max_poll_attempts", DEFAULT_MAX_POLL_ATTEMPTS, minimum=1)
        interval = section.number("poll_retry_interval", DEFAULT_POLL_RETRY_INTERVAL)
        timeout = section.number("timeout", 5.0, minimum=0.1)
        proc_root = section.string("proc_root", "/proc")
        section.done()
        url_host = f"[{host}]" if ":" in host else host
        kubelet = ApiClient(
            f"https://{url_host}:{port}",
            token_file=token_path,
            ca_file=None if skip else ca_path,
            insecure_skip_verify=skip,
            timeout=timeout,
            max_body_bytes=DEFAULT_MAX_RESPONSE_BYTES,
        )
        return cls(
            kubelet,
            proc_root=proc_root,
            max_poll_attempts=attempts,
            poll_retry_interval=interval,
            sleep=sleep,
            clock=clock,
        )

    async def close(self) -> None:
        fetches, self._fetching = set(self._fetches), None
        for task in fetches:
            task.cancel()
        if fetches:
            await asyncio.wait(fetches)
        await self._kubelet.close()

    async def attest(self, caller: Caller) -> list[Selector]:
        info = read_container_info(caller.pid, self._proc_root, caller.start_time)
        if not info.in_pod:
            return []
        if info.container_id is None:
            raise AttestationError(f"process {caller.pid} is in a pod but not in a container cgroup")
        for attempt in range(self._attempts):
            if attempt:
                await self._sleep(self._interval)
            found = find_container(await self._pod_list(self._clock() - self._interval / 2), info)
            if found is not None:
                return pod_selectors(*found)
        raise AttestationError(
            f"pod {info.pod_uid} container {info.container_id[:12]} not listed by the kubelet "
            f"after {self._attempts} attempts"
        )

    async def _pod_list(self, not_before: float) -> Mapping[str, Any]:
        """The kubelet's pod list from a fetch begun at or after `not_before`, shared with
        every caller that can use the same one."""
        if self._cached is not None and self._cached[0] >= not_before:
            return self._cached[1]
        if self._fetching is None or self._fetching[0] < not_before:
            begun = self._clock()
            task = asyncio.create_task(self._fetch(begun))
            self._fetches.add(task)
            task.add_done_callback(self._fetch_ended)
            self._fetching = (begun, task)
        try:
            # Shielded: one caller going away must not cancel the fetch the others wait on.
            return await asyncio.shield(self._fetching[1])
        except K8sApiError as exc:
            raise AttestationError(f"kubelet: {exc}") from exc

    def _fetch_ended(self, task: asyncio.Task[Mapping[str, Any]]) -> None:
        self._fetches.discard(task)
        # Every waiter may have gone (cancelled): its error is then nobody's to report.
        if not task.cancelled():
            task.exception()

    async def _fetch(self, begun: float) -> Mapping[str, Any]:
        try:
            pod_list = await self._kubelet.get_json("/pods")
            expect_kind(pod_list, "PodList", "v1", "kubelet /pods")
        finally:
            if self._fetching is not None and self._fetching[1] is asyncio.current_task():
                self._fetching = None
        if self._cached is None or self._cached[0] < begun:
            self._cached = (begun, pod_list)
        return pod_list
