"""The process's open-file limit, raised at start as Go programs (SPIRE among them) do.

A server holds a connection per agent and an agent one per workload stream: under the common
soft limit of 1024 (hard limits are far higher), the 1000th would fail with EMFILE, and with it
the process's own file opens."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("meshid.fdlimit")


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # e.g. a hard limit of RLIM_INFINITY refused
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)
    return soft
