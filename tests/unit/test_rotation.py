"""The rotation policy: drawn once, bounds, stationary start, validation."""

from __future__ import annotations

import math
import random

import pytest

from workload_api.rotation import DEFAULT_POLICY, RenewalSchedule, RotationPolicy, should_renew

L = 3600.0
T0 = 1_700_000_000.0


def test_defaults() -> None:
    assert (DEFAULT_POLICY.a, DEFAULT_POLICY.b) == (0.5, 0.8)
    assert RotationPolicy().mean_fraction == pytest.approx(0.65)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (0.0, 0.8),
        (-0.1, 0.5),
        (0.5, 1.0),
        (0.5, 1.2),
        (0.8, 0.5),
        (math.nan, 0.8),
        (0.5, math.nan),
        (0.5, math.inf),
        (True, 0.8),
        ("0.5", 0.8),
    ],
)
def test_invalid_window_is_rejected(a: object, b: object) -> None:
    with pytest.raises(ValueError, match="a"):
        RotationPolicy(a, b)  # type: ignore[arg-type]


def test_degenerate_window_is_allowed() -> None:
    p = RotationPolicy(0.6, 0.6)
    assert p.renew_at(T0, T0 + L, random.Random(1)) == pytest.approx(T0 + 0.6 * L)


@pytest.mark.parametrize(("issued", "expires"), [(T0, T0), (T0, T0 - 1), (T0, math.inf), (math.nan, T0)])
def test_invalid_lifetime_is_rejected(issued: float, expires: float) -> None:
    with pytest.raises(ValueError):
        DEFAULT_POLICY.renew_at(issued, expires, random.Random(1))
    with pytest.raises(ValueError):
        DEFAULT_POLICY.renew_at_stationary(issued, expires, random.Random(1))


def test_uniform_draw_respects_bounds_and_mean() -> None:
    rng = random.Random(7)
    fractions = [(DEFAULT_POLICY.renew_at(T0, T0 + L, rng) - T0) / L for _ in range(20_000)]
    assert min(fractions) >= 0.5
    assert max(fractions) <= 0.8
    assert sum(fractions) / len(fractions) == pytest.approx(0.65, abs=0.005)
    # Uniform, not piled at one end: each third of the window gets about a third.
    low = sum(f < 0.6 for f in fractions) / len(fractions)
    assert low == pytest.approx(1 / 3, abs=0.02)


def test_drawn_once_and_stored() -> None:
    rng = random.Random(3)
    schedule = DEFAULT_POLICY.schedule(T0, T0 + L, rng)
    assert schedule.drawn_with == "uniform"
    state = rng.getstate()
    # Re-evaluating the stored schedule (every sync, every check) draws nothing and never moves.
    answers = [should_renew(schedule, T0 + s) for s in range(0, int(L), 5)]
    assert rng.getstate() == state
    first_true = answers.index(True)
    assert all(answers[first_true:]) and not any(answers[:first_true])
    assert should_renew(schedule, schedule.renew_at)
    assert not should_renew(schedule, schedule.renew_at - 1e-3)
    # Restart with the stored value: same schedule, no new draw.
    restored = RenewalSchedule(schedule.renew_at, schedule.drawn_with)
    assert restored == schedule


def test_same_rng_state_same_draw() -> None:
    a = DEFAULT_POLICY.renew_at(T0, T0 + L, random.Random(42))
    b = DEFAULT_POLICY.renew_at(T0, T0 + L, random.Random(42))
    assert a == b


def test_stationary_bounds_and_label() -> None:
    rng = random.Random(5)
    for _ in range(5_000):
        t = DEFAULT_POLICY.renew_at_stationary(T0, T0 + L, rng)
        assert T0 <= t <= T0 + 0.8 * L
    assert DEFAULT_POLICY.schedule(T0, T0 + L, rng, stationary=True).drawn_with == "stationary"


def test_stationary_residual_distribution() -> None:
    a, b = DEFAULT_POLICY.a, DEFAULT_POLICY.b
    rng = random.Random(11)
    n = 100_000
    residual = [(DEFAULT_POLICY.renew_at_stationary(T0, T0 + L, rng) - T0) / L for _ in range(n)]
    # Mean residual life of the renewal process: E[X²] / (2 E[X]) for X ~ U[a, b].
    ex, ex2 = (a + b) / 2, (a * a + a * b + b * b) / 3
    assert sum(residual) / n == pytest.approx(ex2 / (2 * ex), abs=0.003)
    # Residual density is (1 - F(r)) / E[X]: flat at 1/E[X] below a, so P(R < a) = a / E[X].
    assert sum(r < a for r in residual) / n == pytest.approx(a / ex, abs=0.005)
    # ... and P(R < (a+b)/2) = (a + ∫_a^m (b-x)/(b-a) dx) / E[X].
    m = (a + b) / 2
    expected = (a + ((b - a) ** 2 - (b - m) ** 2) / (2 * (b - a))) / ex
    assert sum(r < m for r in residual) / n == pytest.approx(expected, abs=0.005)


def test_stationary_start_has_no_wave() -> None:
    """A fleet started stationary renews at a flat rate from the first minute on."""
    rng = random.Random(13)
    n, bucket = 4_000, 0.1 * L
    counts = [0] * 30  # three lifetimes
    for _ in range(n):
        issued, first = T0, True
        while True:
            renew = (DEFAULT_POLICY.renew_at_stationary if first else DEFAULT_POLICY.renew_at)(
                issued, issued + L, rng
            )
            idx = int((renew - T0) // bucket)
            if idx >= len(counts):
                break
            counts[idx] += 1
            issued, first = renew, False
    expected = n * bucket / (DEFAULT_POLICY.mean_fraction * L)  # ≈ 615 per bucket
    assert max(counts) / expected < 1.15
    assert min(counts) / expected > 0.85


def test_renewal_schedule_validates() -> None:
    with pytest.raises(ValueError):
        RenewalSchedule(math.nan, "uniform")
    with pytest.raises(ValueError):
        RenewalSchedule(T0, "sometimes")  # type: ignore[arg-type]
