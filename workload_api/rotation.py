"""The rotation policy the agent applies to every SVID (workload X509, agent SVID, JWT cache).

Pure: no clock reads, no I/O, randomness only through the `random.Random` passed in, so
the scheduler, the tests and `bench/rotation_storm.py` all drive the same code.

An SVID of lifetime L issued at t0 is renewed at t0 + u·L, u ~ U[a, b], drawn ONCE per
SVID (SPEC-EVENTS "Rotation policy"). Re-drawing on every check would bias renewals
toward the start of the window and keep the fleet synchronised.

After a burst (agent start, forced rotation, CA taint: many SVIDs issued together) the
first renewal instead comes from the stationary residual-life distribution of that
renewal process, so the fleet starts in the steady state and there is no wave to decay.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

DrawnWith = Literal["uniform", "stationary"]
_DRAWN_WITH: frozenset[str] = frozenset({"uniform", "stationary"})


@dataclass(frozen=True, slots=True)
class RenewalSchedule:
    """When to renew one SVID; stored beside the SVID so syncs and restarts never re-draw."""

    renew_at: float
    drawn_with: DrawnWith

    def __post_init__(self) -> None:
        if not math.isfinite(self.renew_at):
            raise ValueError(f"renew_at must be a finite timestamp, got {self.renew_at!r}")
        if self.drawn_with not in _DRAWN_WITH:
            raise ValueError(f"drawn_with must be 'uniform' or 'stationary', got {self.drawn_with!r}")


def should_renew(schedule: RenewalSchedule, now: float) -> bool:
    """True once `now` has reached the stored renewal time (the caller owns the clock)."""
    return now >= schedule.renew_at


def _lifetime(issued_at: float, expires_at: float) -> float:
    if not (math.isfinite(issued_at) and math.isfinite(expires_at)):
        raise ValueError("issued_at and expires_at must be finite timestamps")
    lifetime = expires_at - issued_at
    if lifetime <= 0:
        raise ValueError(f"expires_at ({expires_at}) must be after issued_at ({issued_at})")
    return lifetime


def effective_issued_at(not_before: float, not_after: float, received_at: float) -> float:
    """Where an SVID's lifetime starts for scheduling: when it was obtained, not notBefore.

    The server backdates notBefore for clock skew; measuring from it would put a share of
    stationary draws (backdate / mean interval: ~12 % for a 120 s SVID with a 10 s
    backdate) in the past, i.e. a second burst right after the first. If the caller's
    clock says the SVID is already over, notBefore is all there is.
    """
    issued = max(not_before, received_at)
    return issued if issued < not_after else not_before


@dataclass(frozen=True, slots=True)
class RotationPolicy:
    """Renew at a fraction of the lifetime drawn from [a, b]; 0 < a ≤ b < 1."""

    a: float = 0.5
    b: float = 0.8

    def __post_init__(self) -> None:
        for name, value in (("a", self.a), ("b", self.b)):
            # bool is an int subclass; True would silently mean 1.0.
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"rotation window bound {name} must be a number, got {value!r}")
        # Written so NaN fails too: every comparison with NaN is False.
        if not (0.0 < self.a <= self.b < 1.0):
            raise ValueError(
                f"rotation window must satisfy 0 < a <= b < 1 (fractions of the SVID lifetime), "
                f"got a={self.a!r}, b={self.b!r}"
            )

    @property
    def mean_fraction(self) -> float:
        """Mean renewal interval as a fraction of the lifetime: (a + b) / 2."""
        return (self.a + self.b) / 2

    def renew_at(self, issued_at: float, expires_at: float, rng: random.Random) -> float:
        """Steady-state renewal time: issued_at + u·L, u ~ U[a, b]. Call once per SVID."""
        lifetime = _lifetime(issued_at, expires_at)
        u = self.a + (self.b - self.a) * rng.random()
        return issued_at + u * lifetime

    def renew_at_stationary(self, issued_at: float, expires_at: float, rng: random.Random) -> float:
        """First renewal after a mass issuance at `issued_at`: the stationary residual life.

        A renewal process with intervals X ~ U[a, b]·L, observed at a random moment, is
        inside an interval whose length is length-biased (density ∝ x) and at a uniform
        point V within it; the time left is (1 - V)·X, which has the same law as V·X.
        Every SVID in the burst was issued at `issued_at`, so that residual is measured
        from `issued_at`: the fleet's renewals then form a stationary process with
        constant rate 1/E[X] from the start. The mean first wait is E[X²]/(2E[X]) (≈ 0.33·L
        for the defaults), i.e. about half a cycle of extra issuance once per burst.
        """
        lifetime = _lifetime(issued_at, expires_at)
        a, b = self.a, self.b
        # Inverse CDF of density ∝ x on [a, b]: F(x) = (x² - a²) / (b² - a²).
        x = math.sqrt(a * a + rng.random() * (b * b - a * a))
        v = rng.random()
        return issued_at + v * x * lifetime

    def schedule(
        self,
        issued_at: float,
        expires_at: float,
        rng: random.Random,
        *,
        stationary: bool = False,
    ) -> RenewalSchedule:
        """Draw the one renewal time for a freshly issued SVID, ready to store with it."""
        if stationary:
            return RenewalSchedule(self.renew_at_stationary(issued_at, expires_at, rng), "stationary")
        return RenewalSchedule(self.renew_at(issued_at, expires_at, rng), "uniform")


DEFAULT_POLICY = RotationPolicy()
