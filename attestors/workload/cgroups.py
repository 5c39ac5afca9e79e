"""Container ID and pod UID from /proc/<pid>/cgroup, shared by the k8s and docker attestors.

Each line of /proc/<pid>/cgroup is `hierarchy-ID:controller-list:cgroup-path`. The path
shapes differ by cgroup version (v1 has one line per hierarchy, v2 a single `0::` line),
runtime (containerd, CRI-O, Docker) and cgroup driver (systemd slices and scopes with `_`
in the pod UID, or cgroupfs directories with `-`). Examples:

    0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope
    12:pids:/kubepods/besteffort/pod<uid>/<id>
    0::/system.slice/docker-<id>.scope
    1:name=systemd:/docker/<id>
    0::/kubepods-besteffort-pod<uid_>.slice:cri-containerd:<id>

The last is runc's systemd form `slice:prefix:name` left unexpanded (containerd without
`SystemdCgroup = true` under a systemd-driver kubelet); SPIRE reads it too.

Parsing is a pure function; reading the file is a thin wrapper around it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from attestors.workload.procfs import parse_stat_start_time
from meshid.errors import AttestationError

# Container IDs of every runtime we know are 64 lowercase hex characters. The optional
# prefix names the runtime (systemd driver); `crio-conmon-<id>` is CRI-O's monitor
# process, not the container, and deliberately does not match.
_CONTAINER_SEGMENT = re.compile(
    r"^(?:(?P<prefix>docker|cri-containerd|crio|libpod|containerd|cri-dockerd)-)?"
    r"(?P<id>[0-9a-f]{64})(?:\.scope)?$"
)
# `pod<uid>` (cgroupfs) or `<anything>-pod<uid_with_underscores>.slice` (systemd); kind
# and other nested setups put extra words in front, e.g. `kubelet-kubepods-...-pod<uid>`.
_POD_SEGMENT = re.compile(
    r"^(?:[a-z0-9_-]*-)?pod(?P<uid>[0-9a-f]{8}(?:[-_][0-9a-f]{4}){3}[-_][0-9a-f]{12})(?:\.slice)?$"
)
_RUNTIMES = {
    "docker": "docker",
    "cri-dockerd": "docker",
    "cri-containerd": "containerd",
    "containerd": "containerd",
    "crio": "cri-o",
    "libpod": "podman",
}
# `<pod slice>:<runtime prefix>:<id>`, read as the pod segment and its container's.
_COLON_SEGMENT = re.compile(r"^(?P<slice>[^:]+\.slice):(?P<prefix>[a-z-]+):(?P<id>[0-9a-f]{64})$")
# /proc/<pid>/cgroup is a few hundred bytes; anything far larger is not what we expect.
MAX_CGROUP_FILE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    """What the cgroup path says about a process. Both fields None: not in a container."""

    container_id: str | None = None
    pod_uid: str | None = None
    # A hint from the systemd scope prefix ("containerd", "cri-o", "docker"); None for cgroupfs.
    runtime: str | None = None

    @property
    def in_pod(self) -> bool:
        return self.pod_uid is not None


def _parse_path(path: str) -> tuple[str | None, str | None, str | None]:
    container_id = pod_uid = runtime = None
    segments = []
    for segment in path.split("/"):
        m = _COLON_SEGMENT.match(segment)
        if m is not None and m.group("prefix") in _RUNTIMES:
            segments += [m.group("slice"), f"{m.group('prefix')}-{m.group('id')}"]
        else:
            segments.append(segment)
    for i, segment in enumerate(segments):
        if m := _POD_SEGMENT.match(segment):
            # The first pod cgroup and its direct child (the container's) are made by the
            # kubelet and the runtime. Below that the workload may make cgroups of its own
            # (a writable cgroupfs) and name them `pod<uid>/<id>` of another pod or of a
            # sibling container: the last match won there, so nothing below counts.
            pod_uid = m.group("uid").replace("_", "-")
            child = _CONTAINER_SEGMENT.match(segments[i + 1]) if i + 1 < len(segments) else None
            if child is None:
                return None, pod_uid, None
            prefix = child.group("prefix")
            return child.group("id"), pod_uid, _RUNTIMES.get(prefix) if prefix else None
        if m := _CONTAINER_SEGMENT.match(segment):
            # The last match wins: in nested setups (docker-in-docker, kind) the innermost
            # container is the one the process actually runs in.
            container_id = m.group("id")
            prefix = m.group("prefix")
            runtime = _RUNTIMES.get(prefix) if prefix else None
    return container_id, pod_uid, runtime


def parse_cgroup(text: str) -> ContainerInfo:
    """Parse the text of /proc/<pid>/cgroup. Lines that are not cgroup lines are ignored.

    Raises AttestationError when lines disagree (two different container IDs or pod UIDs):
    that is either a process in transit between cgroups or a forged view, and we refuse
    to guess.
    """
    container_ids: set[str] = set()
    pod_uids: set[str] = set()
    runtime: str | None = None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3 or not parts[0].isdigit() or not parts[2].startswith("/"):
            continue
        cid, uid, rt = _parse_path(parts[2])
        if cid:
            container_ids.add(cid)
            runtime = runtime or rt
        if uid:
            pod_uids.add(uid)
    if len(container_ids) > 1:
        raise AttestationError("process cgroups name more than one container")
    if len(pod_uids) > 1:
        raise AttestationError("process cgroups name more than one pod")
    return ContainerInfo(
        container_id=next(iter(container_ids), None),
        pod_uid=next(iter(pod_uids), None),
        runtime=runtime,
    )


def _read_proc_file(path: Path) -> str:
    with path.open("rb") as f:
        data = f.read(MAX_CGROUP_FILE_BYTES + 1)
    if len(data) > MAX_CGROUP_FILE_BYTES:
        raise AttestationError(f"{path} is unexpectedly large")
    return data.decode("utf-8", errors="replace")


def process_start_time(pid: int, proc_root: str | Path = "/proc") -> int:
    """Field 22 of /proc/<pid>/stat (clock ticks since boot), used to detect PID reuse."""
    text = _read_proc_file(Path(proc_root) / str(pid) / "stat")
    try:
        return parse_stat_start_time(text)
    except ValueError as exc:
        raise AttestationError(f"cannot parse /proc/{pid}/stat") from exc


def read_container_info(
    pid: int, proc_root: str | Path = "/proc", start_time: int | None = None
) -> ContainerInfo:
    """Read and parse /proc/<pid>/cgroup.

    When `start_time` (recorded at accept time) is given, the process start time is checked
    after the read so that a PID recycled meanwhile is not attested as the original caller.
    """
    if pid <= 0:
        raise AttestationError(f"invalid pid {pid}")
    try:
        text = _read_proc_file(Path(proc_root) / str(pid) / "cgroup")
        if start_time is not None and process_start_time(pid, proc_root) != start_time:
            raise AttestationError(f"process {pid} exited and its pid was reused")
    except FileNotFoundError as exc:
        raise AttestationError(f"process {pid} is gone") from exc
    except OSError as exc:
        raise AttestationError(f"cannot read cgroups of process {pid}: {exc.strerror}") from exc
    return parse_cgroup(text)
