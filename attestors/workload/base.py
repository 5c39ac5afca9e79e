"""The one interface every workload attestor implements (agent side)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from meshid.selector import Selector


@dataclass(frozen=True)
class Caller:
    """A Workload API caller as seen through SO_PEERCRED at accept time."""

    pid: int
    uid: int
    gid: int
    # /proc/<pid>/stat field 22, recorded at accept time to detect PID reuse.
    start_time: int | None = None


class WorkloadAttestor(Protocol):
    """Turns a caller into selectors. Raises `meshid.errors.AttestationError` on failure.

    An attestor may set `local = True` when it only reads this host's /proc (no network
    round trip): the agent then awaits it inline instead of in its own task, which on
    every Workload API call saves more than the attestor itself costs."""

    name: str

    async def attest(self, caller: Caller) -> list[Selector]: ...
