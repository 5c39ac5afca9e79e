"""Rotation storm benchmark: peak-to-mean issuance after N SVIDs are all issued at t0.

Virtual clock, no sleeping, plain Python. Metric as in SPEC-EVENTS "Rotation policy":
renewals (each one issues a fresh SVID) are counted per 60 s bucket over 5 lifetimes,
the t0 mass issuance itself excluded; PMR = max bucket / (N·60/P), P being the policy's
mean renewal interval. P is analytic for every policy (for SPIRE's re-drawn threshold it
is summed exactly over the discrete 5 s checks); the empirical mean is printed beside it.

meshid's policy is the real `workload_api.rotation` code; the comparison policies are
modelled here because they are not meshid policy.

    python bench/rotation_storm.py [N] [--seed S]
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Run as a script, bench/ is first on sys.path and bench/workload_api.py would shadow the
# workload_api package: resolve imports from the repository root first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workload_api.rotation import RotationPolicy

LIFETIME = 3600.0  # X509-SVID TTL, 1 h
BUCKET = 60.0
LIFETIMES = 5
HORIZON = LIFETIMES * LIFETIME
SPIRE_CHECK = 5.0  # SPIRE's rotator tick
SPIRE_LOW, SPIRE_HIGH = 0.45, 0.55  # fraction of lifetime remaining, re-drawn per check
FLOOR_SEEDS = 5

# (issued_at, expires_at, rng, first_after_burst) -> renewal time
NextRenewal = Callable[[float, float, random.Random, bool], float]


def meshid_policy(policy: RotationPolicy) -> NextRenewal:
    def next_renewal(issued_at: float, expires_at: float, rng: random.Random, first: bool) -> float:
        # t0 is a mass issuance, so the first renewal is drawn stationary; later ones uniform.
        return policy.schedule(issued_at, expires_at, rng, stationary=first).renew_at

    return next_renewal


def half_life(issued_at: float, expires_at: float, rng: random.Random, first: bool) -> float:
    return issued_at + 0.5 * (expires_at - issued_at)


def drawn_once(lo: float, hi: float) -> NextRenewal:
    """Istio (0.5 ± 0.01) and kubelet (70-90 %): a fraction of lifetime drawn once per SVID."""

    def next_renewal(issued_at: float, expires_at: float, rng: random.Random, first: bool) -> float:
        return issued_at + rng.uniform(lo, hi) * (expires_at - issued_at)

    return next_renewal


def spire(issued_at: float, expires_at: float, rng: random.Random, first: bool) -> float:
    """Checks every 5 s from issuance; rotate once remaining ≤ U(0.45, 0.55)·L, re-drawn per check."""
    lifetime = expires_at - issued_at
    # Before remaining drops to 0.55·L no draw can fire; start at the first check that can.
    k = max(1, math.ceil((1 - SPIRE_HIGH) * lifetime / SPIRE_CHECK))
    while True:
        t = issued_at + k * SPIRE_CHECK
        if expires_at - t <= rng.uniform(SPIRE_LOW, SPIRE_HIGH) * lifetime:
            return t
        k += 1


def spire_mean_interval(lifetime: float) -> float:
    """Exact E[interval] for `spire`: sum over checks of t·P(first fire at t)."""
    mean, survive, k = 0.0, 1.0, 1
    while survive > 1e-15:
        remaining = lifetime - k * SPIRE_CHECK
        p_fire = min(
            1.0, max(0.0, (SPIRE_HIGH * lifetime - remaining) / ((SPIRE_HIGH - SPIRE_LOW) * lifetime))
        )
        mean += k * SPIRE_CHECK * survive * p_fire
        survive *= 1.0 - p_fire
        k += 1
    return mean


@dataclass(frozen=True)
class Result:
    name: str
    counts: list[int]
    mean_interval: float  # P used for the PMR
    p_how: str
    empirical_interval: float  # mean of completed steady-state intervals

    @property
    def issuances(self) -> int:
        return sum(self.counts)


def simulate(n: int, next_renewal: NextRenewal, rng: random.Random) -> tuple[list[int], float]:
    """Per-bucket renewal counts over the horizon and the empirical mean steady interval."""
    counts = [0] * int(HORIZON // BUCKET)
    interval_sum, intervals = 0.0, 0
    for _ in range(n):
        issued, first = 0.0, True  # every SVID issued at t0 = 0 (not counted)
        while True:
            renew = next_renewal(issued, issued + LIFETIME, rng, first)
            if renew >= HORIZON:
                break
            counts[int(renew // BUCKET)] += 1
            if not first:  # the post-burst draw is not a steady-state interval
                interval_sum += renew - issued
                intervals += 1
            issued, first = renew, False
    return counts, (interval_sum / intervals if intervals else math.nan)


def pmr(counts: list[int], n: int, mean_interval: float) -> float:
    return max(counts) / (n * BUCKET / mean_interval)


def poisson_floor(n: int, mean_interval: float, buckets: int, seed: int) -> float:
    """max/mean of homogeneous Poisson arrivals at rate N/P over the same buckets, seed-averaged."""
    rate = n / mean_interval
    horizon = buckets * BUCKET
    ratios = []
    for s in range(FLOOR_SEEDS):
        rng = random.Random(seed * 1000 + s)
        counts = [0] * buckets
        t = rng.expovariate(rate)
        while t < horizon:
            counts[int(t // BUCKET)] += 1
            t += rng.expovariate(rate)
        ratios.append(max(counts) / (n * BUCKET / mean_interval))
    return sum(ratios) / len(ratios)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("n", nargs="?", type=int, default=10_000, help="number of SVIDs (default 10000)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    n: int = args.n
    if n <= 0:
        parser.error("N must be positive")

    policy = RotationPolicy()
    policies: list[tuple[str, NextRenewal, float, str]] = [
        (
            "meshid",
            meshid_policy(policy),
            policy.mean_fraction * LIFETIME,
            f"analytic (a+b)/2·L, [a,b]=[{policy.a},{policy.b}], first draw stationary",
        ),
        ("half_life", half_life, 0.5 * LIFETIME, "analytic 0.5·L"),
        ("spire", spire, spire_mean_interval(LIFETIME), "analytic, exact sum over 5 s checks"),
        ("istio", drawn_once(0.49, 0.51), 0.5 * LIFETIME, "analytic 0.5·L, U(0.49,0.51) drawn once"),
        ("kubelet", drawn_once(0.70, 0.90), 0.8 * LIFETIME, "analytic 0.8·L, U(0.70,0.90) drawn once"),
    ]
    started = time.perf_counter()
    print(
        f"N={n} lifetime={LIFETIME:.0f}s horizon={LIFETIMES} lifetimes "
        f"buckets={int(HORIZON // BUCKET)}x{BUCKET:.0f}s seed={args.seed}"
    )
    results: dict[str, float] = {}
    for i, (name, fn, mean_interval, how) in enumerate(policies):
        counts, empirical = simulate(n, fn, random.Random(args.seed * 7919 + i))
        value = pmr(counts, n, mean_interval)
        results[name] = value
        peak_bucket = counts.index(max(counts))
        print(
            f"{name:<9} pmr={value:6.2f} peak={max(counts):6d} at t={peak_bucket * BUCKET:7.0f}s "
            f"mean/bucket={n * BUCKET / mean_interval:8.1f} P={mean_interval:7.1f}s ({how}; "
            f"empirical {empirical:.1f}s) issuances={sum(counts)}"
        )
    floor = poisson_floor(n, policies[0][2], int(HORIZON // BUCKET), args.seed)
    print(
        f"floor     pmr={floor:6.2f} (Poisson at rate N/P_meshid, {int(HORIZON // BUCKET)} buckets, "
        f"mean of {FLOOR_SEEDS} seeds) elapsed={time.perf_counter() - started:.1f}s"
    )
    print(
        f"pmr meshid={results['meshid']:.2f} half_life={results['half_life']:.2f} "
        f"spire={results['spire']:.2f} istio={results['istio']:.2f} "
        f"kubelet={results['kubelet']:.2f} floor={floor:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
