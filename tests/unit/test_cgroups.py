"""cgroup parsing on real-world /proc/<pid>/cgroup shapes (v1 and v2, each runtime and driver)."""

from __future__ import annotations

from pathlib import Path

import pytest

from attestors.workload.cgroups import (
    MAX_CGROUP_FILE_BYTES,
    ContainerInfo,
    parse_cgroup,
    process_start_time,
    read_container_info,
)
from meshid.errors import AttestationError

CID = "4f3e2d1c0b9a88776655443322110ffeeddccbbaa99887766554433221100aab"
CID2 = "7be3c1f0a2d94e5b8c6a1f2e3d4c5b6a7980f1e2d3c4b5a6978877665544332a"
UID = "0d6a3c12-5c1e-4e57-9a5e-2a7d5f1c9b11"
UID_ = UID.replace("-", "_")

V1_CONTROLLERS = [
    "12:pids",
    "11:hugetlb",
    "10:net_cls,net_prio",
    "9:perf_event",
    "8:memory",
    "7:devices",
    "6:cpuset",
    "5:blkio",
    "4:cpu,cpuacct",
    "3:freezer",
    "2:rdma",
    "1:name=systemd",
]


def v1(path: str, *, with_unified: bool = True) -> str:
    """A cgroup v1 file: the same path in every hierarchy (plus `0::/` on hybrid hosts)."""
    lines = [f"{c}:{path}" for c in V1_CONTROLLERS]
    if with_unified:
        lines.append("0::/")
    return "\n".join(lines) + "\n"


# (case name, file content, expected container ID, expected pod UID, runtime hint)
REAL_WORLD: list[tuple[str, str, str | None, str | None, str | None]] = [
    (
        "v2 runc systemd form unexpanded (containerd without SystemdCgroup)",
        f"0::/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{CID}\n",
        CID,
        UID,
        "containerd",
    ),
    (
        "v1 runc systemd form under containerd.service",
        v1(f"/system.slice/containerd.service/kubepods-pod{UID_}.slice:cri-containerd:{CID}"),
        CID,
        UID,
        "containerd",
    ),
    (
        "v2 systemd containerd burstable",
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
        f"cri-containerd-{CID}.scope\n",
        CID,
        UID,
        "containerd",
    ),
    (
        "v2 systemd containerd besteffort",
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/"
        f"cri-containerd-{CID}.scope\n",
        CID,
        UID,
        "containerd",
    ),
    (
        "v2 systemd containerd guaranteed (no QoS slice)",
        f"0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
        CID,
        UID,
        "containerd",
    ),
    (
        "v2 systemd CRI-O",
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope\n",
        CID,
        UID,
        "cri-o",
    ),
    (
        "v2 cgroupfs containerd",
        f"0::/kubepods/burstable/pod{UID}/{CID}\n",
        CID,
        UID,
        None,
    ),
    (
        "v2 cgroupfs guaranteed",
        f"0::/kubepods/pod{UID}/{CID}\n",
        CID,
        UID,
        None,
    ),
    (
        "v1 cgroupfs (dockershim / containerd) besteffort",
        v1(f"/kubepods/besteffort/pod{UID}/{CID}"),
        CID,
        UID,
        None,
    ),
    (
        "v1 systemd containerd",
        v1(
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
            f"cri-containerd-{CID}.scope"
        ),
        CID,
        UID,
        "containerd",
    ),
    (
        "v1 systemd CRI-O (OpenShift)",
        v1(f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope"),
        CID,
        UID,
        "cri-o",
    ),
    (
        "v1 systemd docker under kubepods",
        v1(
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/docker-{CID}.scope"
        ),
        CID,
        UID,
        "docker",
    ),
    (
        "v1 cgroupfs, no unified line",
        v1(f"/kubepods/burstable/pod{UID}/{CID}", with_unified=False),
        CID,
        UID,
        None,
    ),
    (
        "kind: kubelet nested under kubelet.slice",
        f"0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
        f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n",
        CID,
        UID,
        "containerd",
    ),
    (
        "v2 systemd docker",
        f"0::/system.slice/docker-{CID}.scope\n",
        CID,
        None,
        "docker",
    ),
    (
        "v2 cgroupfs docker",
        f"0::/docker/{CID}\n",
        CID,
        None,
        None,
    ),
    (
        "v1 cgroupfs docker",
        v1(f"/docker/{CID}"),
        CID,
        None,
        None,
    ),
    (
        "v1 docker, name=systemd line only",
        f"1:name=systemd:/docker/{CID}\n",
        CID,
        None,
        None,
    ),
    (
        "systemd running inside a docker container",
        f"0::/system.slice/docker-{CID}.scope/init.scope\n",
        CID,
        None,
        "docker",
    ),
    (
        "docker-in-docker: innermost container wins",
        f"0::/docker/{CID2}/docker/{CID}\n",
        CID,
        None,
        None,
    ),
    (
        "podman rootless",
        f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope\n",
        CID,
        None,
        "podman",
    ),
    (
        "CRI-O conmon: in the pod, not in a container",
        f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{CID}.scope\n",
        None,
        UID,
        None,
    ),
    (
        "host login session",
        "0::/user.slice/user-1000.slice/session-3.scope\n",
        None,
        None,
        None,
    ),
    (
        "host system service (v1)",
        v1("/system.slice/sshd.service"),
        None,
        None,
        None,
    ),
    (
        "private cgroup namespace",
        "0::/\n",
        None,
        None,
        None,
    ),
    ("empty file", "", None, None, None),
]

GARBAGE_LINES = [
    "",
    "garbage",
    "::",
    "12:pids",
    f"x:pids:/docker/{CID2}",  # hierarchy ID not a number
    f"0::relative/docker/{CID2}",  # path not absolute
    f"0::/docker/{CID2[:-1]}",  # 63 hex characters
    f"0::/docker/{CID2.upper()}",  # container IDs are lowercase
    f"0::/docker/{CID2}g",
    f"0::/kubepods/podnot-a-uuid/{CID2[:12]}",
    "0::/kubepods/pod0d6a3c12-5c1e-4e57-9a5e/abc",  # truncated UID
    "\x00\x01\x02binary\xff",
    "9" * 5000,
    "0::/" + "a/" * 2000,
]


@pytest.mark.parametrize(
    ("name", "text", "cid", "uid", "runtime"), REAL_WORLD, ids=[c[0] for c in REAL_WORLD]
)
def test_real_world_shapes(
    name: str, text: str, cid: str | None, uid: str | None, runtime: str | None
) -> None:
    info = parse_cgroup(text)
    assert info == ContainerInfo(container_id=cid, pod_uid=uid, runtime=runtime)
    assert info.in_pod == (uid is not None)


@pytest.mark.parametrize(
    ("name", "text", "cid", "uid", "runtime"), REAL_WORLD, ids=[c[0] for c in REAL_WORLD]
)
def test_garbage_lines_do_not_change_the_result(
    name: str, text: str, cid: str | None, uid: str | None, runtime: str | None
) -> None:
    noisy = "\n".join(GARBAGE_LINES) + "\n" + text + "\n".join(GARBAGE_LINES)
    assert parse_cgroup(noisy) == ContainerInfo(container_id=cid, pod_uid=uid, runtime=runtime)


@pytest.mark.parametrize("line", GARBAGE_LINES)
def test_garbage_alone_is_not_a_container(line: str) -> None:
    assert parse_cgroup(line) == ContainerInfo()


def test_uid_spelling_is_normalised() -> None:
    # systemd replaces '-' with '_' in the slice name; the pod UID is reported with dashes.
    info = parse_cgroup(f"0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope")
    assert info.pod_uid == UID


def test_two_containers_is_refused() -> None:
    text = f"12:pids:/docker/{CID}\n11:memory:/docker/{CID2}\n"
    with pytest.raises(AttestationError, match="more than one container"):
        parse_cgroup(text)


def test_two_pods_is_refused() -> None:
    other = "11111111-2222-4333-8444-555555555555"
    text = f"12:pids:/kubepods/pod{UID}/{CID}\n11:memory:/kubepods/pod{other}/{CID}\n"
    with pytest.raises(AttestationError, match="more than one pod"):
        parse_cgroup(text)


def _write_proc(root: Path, pid: int, cgroup: str, start_time: int = 123456) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "cgroup").write_text(cgroup)
    # A command name with spaces and ')' must not shift the fields.
    fields = ["S", "1", str(pid), str(pid), "0", "-1", "4194560"] + ["0"] * 12 + [str(start_time), "0"]
    (d / "stat").write_text(f"{pid} (evil) name) " + " ".join(fields) + "\n")


def test_read_container_info_and_start_time(tmp_path: Path) -> None:
    _write_proc(tmp_path, 4242, f"0::/system.slice/docker-{CID}.scope\n", start_time=987654)
    assert process_start_time(4242, tmp_path) == 987654
    assert read_container_info(4242, tmp_path, start_time=987654).container_id == CID
    with pytest.raises(AttestationError, match="reused"):
        read_container_info(4242, tmp_path, start_time=1)


def test_read_container_info_errors(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="gone"):
        read_container_info(999, tmp_path)
    with pytest.raises(AttestationError, match="invalid pid"):
        read_container_info(0, tmp_path)
    _write_proc(tmp_path, 5, "0::/" + "x" * (MAX_CGROUP_FILE_BYTES + 10))
    with pytest.raises(AttestationError, match="large"):
        read_container_info(5, tmp_path)


def test_own_process_parses() -> None:
    # Whatever this machine is, reading our own cgroup must not raise.
    import os

    read_container_info(os.getpid())



OTHER_UID = "11111111-2222-4333-8444-555555555555"


@pytest.mark.parametrize(
    ("text", "runtime"),
    [
        (f"0::/kubepods/besteffort/pod{UID}/{CID}/pod{OTHER_UID}/{CID2}\n", None),
        (f"0::/kubepods/besteffort/pod{UID}/{CID}/{CID2}\n", None),
        (
            f"0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope/"
            f"cri-containerd-{CID2}.scope\n",
            "containerd",
        ),
        (v1(f"/kubepods/pod{UID}/{CID}/pod{OTHER_UID}/{CID2}"), None),
        (
            f"0::/kubepods-pod{UID_}.slice:cri-containerd:{CID}/"
            f"kubepods-pod{OTHER_UID.replace('-', '_')}.slice:cri-containerd:{CID2}\n",
            "containerd",
        ),
    ],
)
def test_cgroups_below_the_container_do_not_count(text: str, runtime: str | None) -> None:
    """A workload with a writable cgroupfs may make cgroups below its container's and name
    them after another pod's container (or a sibling's): the last match won, so it attested
    as that container. The container is the pod cgroup's direct child."""
    assert parse_cgroup(text) == ContainerInfo(container_id=CID, pod_uid=UID, runtime=runtime)
