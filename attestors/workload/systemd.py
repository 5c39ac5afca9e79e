"""The `systemd` workload attestor: `systemd:id:<unit>` from /proc/<pid>/cgroup, no D-Bus.

The unit is the one the *system* manager would report for the pid (what SPIRE gets from
GetUnitByPID over D-Bus, and what systemd's own cg_path_get_unit computes): skip the
leading run of `*.slice` segments and take the next segment. Taking the *last*
`*.service`/`*.scope` segment instead would be spoofable: a service with Delegate=yes
(or any user manager) owns its subtree and could create a sub-cgroup named
`admin.service` and move itself there. So a process of a user unit attests as
`user@1000.service`, exactly as with SPIRE.

`systemd:fragment_path` is not emitted: without D-Bus it would mean re-implementing
systemd's unit search path, aliases and template rules, and a near miss there silently
changes which entries match.
"""

from __future__ import annotations

import re

from attestors.workload.base import Caller
from attestors.workload.procfs import read_proc_text
from meshid.errors import AttestationError
from meshid.selector import Selector

# systemd unit-name alphabet (unit_name_is_valid): letters, digits, ":-_.\@"; max 255.
_UNIT_RE = re.compile(r"[A-Za-z0-9:_.\\@-]+\.(service|scope)")
_MAX_UNIT_NAME = 255


def unit_from_cgroup_path(path: str) -> str | None:
    """The systemd unit owning a cgroup path, or None if it is not inside a service/scope."""
    segments = [s for s in path.split("/") if s]
    i = 0
    while i < len(segments) and segments[i].endswith(".slice"):
        i += 1
    if i == len(segments):
        return None
    unit = segments[i]
    if len(unit) > _MAX_UNIT_NAME or not _UNIT_RE.fullmatch(unit):
        return None
    return unit


def systemd_cgroup_path(cgroup_file: str) -> str | None:
    """The path systemd manages, from /proc/<pid>/cgroup text (v2, hybrid or v1).

    Lines are `hierarchy-id:controllers:path`; the path may itself contain ':'. systemd
    tracks units in the unified hierarchy (`0::`) when it exists, else in `name=systemd`.
    """
    unified: str | None = None
    named: str | None = None
    for line in cgroup_file.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            unified = path
        elif "name=systemd" in controllers.split(","):
            named = path
    # In hybrid mode both exist and agree; a v1 host's `0::/` line (empty unified tree)
    # would say nothing, so prefer name=systemd there.
    if named is not None and (unified is None or unified == "/"):
        return named
    return unified


class SystemdAttestor:
    """Selector `systemd:id:<unit>`; no selectors for processes outside any unit."""

    name = "systemd"
    local = True  # /proc only: awaited inline (see WorkloadAttestor)

    def __init__(self, *, proc_root: str = "/proc") -> None:
        self._proc_root = proc_root.rstrip("/") or "/"

    async def attest(self, caller: Caller) -> list[Selector]:
        pid = caller.pid
        if pid <= 0:
            raise AttestationError(f"invalid workload pid {pid}")
        try:
            # A small pseudo-file: a thread hop would cost more than the read.
            text = read_proc_text(f"{self._proc_root}/{pid}/cgroup")
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise AttestationError(f"workload process {pid} not found") from exc
        except OSError as exc:
            raise AttestationError(f"cannot read the cgroup of workload process {pid}: {exc}") from exc
        cgroup = systemd_cgroup_path(text)
        unit = unit_from_cgroup_path(cgroup) if cgroup is not None else None
        if unit is None:
            return []
        return [Selector("systemd", f"id:{unit}")]
