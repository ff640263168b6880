"""Intervals against references: Wilson against scipy, Newcombe against its published example,
and the (paired, seed-nested) bootstrap against the exact bootstrap distribution enumerated."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import binomtest, multinomial

from evaluation.intervals import bootstrap_gap, bootstrap_replicates, newcombe_diff, wilson


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (10, 10), (512, 1000), (6213, 10000)])
def test_wilson_matches_scipy(k, n):
    want = binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert wilson(k, n) == pytest.approx((want.low, want.high), abs=1e-9)


def test_wilson_rejects_bad_counts():
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson(11, 10)


def test_newcombe_matches_the_published_example():
    # Newcombe (1998), Statistics in Medicine 17:873, Table II example (a): 56/70 - 48/80,
    # method 10 (hybrid score): 0.0524 to 0.3339.
    low, high = newcombe_diff(56, 70, 48, 80)
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)


def exact_paired_cdf(d: np.ndarray) -> dict[float, float]:
    """The exact bootstrap distribution of the mean of n draws (with replacement) from the
    per-image differences d in {-1, 0, 1}: (n+, n0, n-) is multinomial."""
    n = len(d)
    p = [np.mean(d == 1), np.mean(d == 0), np.mean(d == -1)]
    mass: dict[float, float] = {}
    for up in range(n + 1):
        for down in range(n + 1 - up):
            v = (up - down) / n
            mass[v] = mass.get(v, 0.0) + multinomial.pmf([up, n - up - down, down], n, p)
    return _cdf(mass)


def _cdf(mass: dict[float, float]) -> dict[float, float]:
    out, total = {}, 0.0
    for v in sorted(mass):
        total += mass[v]
        out[v] = total
    return out


def _max_cdf_gap(samples: np.ndarray, cdf: dict[float, float]) -> float:
    s = np.sort(samples)
    return max(
        abs(np.searchsorted(s, v + 1e-12, side="right") / len(s) - c) for v, c in cdf.items()
    )


def test_paired_bootstrap_matches_the_exact_distribution():
    rng = np.random.default_rng(0)
    a = rng.random(25) < 0.7
    b = rng.random(25) < 0.5
    reps = bootstrap_replicates(a, b, n_boot=40_000, seed=1)
    exact = exact_paired_cdf(a.astype(int) - b.astype(int))
    assert _max_cdf_gap(reps, exact) < 0.01
    est = bootstrap_gap(a, b, n_boot=40_000, seed=1)
    assert est.value == pytest.approx(a.mean() - b.mean())
    lo = min(v for v, c in exact.items() if c >= 0.025)
    hi = min(v for v, c in exact.items() if c >= 0.975)
    assert est.low == pytest.approx(lo, abs=1 / 25 + 1e-9)
    assert est.high == pytest.approx(hi, abs=1 / 25 + 1e-9)


def test_seed_nested_bootstrap_matches_exhaustive_enumeration():
    # 2 seeds a side, 3 images: every (image tuple, seed tuple a, seed tuple b) is equally
    # likely: 27 x 4 x 4 = 432 outcomes, enumerated.
    a = np.array([[1, 1, 0], [1, 0, 0]], float)
    b = np.array([[0, 1, 0], [0, 0, 0]], float)
    mass: dict[float, float] = {}
    for imgs in itertools.product(range(3), repeat=3):
        for sa in itertools.product(range(2), repeat=2):
            for sb in itertools.product(range(2), repeat=2):
                va = np.mean([a[s, list(imgs)].mean() for s in sa])
                vb = np.mean([b[s, list(imgs)].mean() for s in sb])
                key = round(va - vb, 9)
                mass[key] = mass.get(key, 0.0) + 1 / 432
    reps = np.round(bootstrap_replicates(a, b, n_boot=60_000, seed=2), 9)
    assert _max_cdf_gap(reps, _cdf(mass)) < 0.01
    est = bootstrap_gap(a, b, n_boot=2000)
    assert est.value == pytest.approx(0.5 - 1 / 6)
    assert est.sd_a == pytest.approx(np.std([2 / 3, 1 / 3], ddof=1))
    assert (est.n_seeds_a, est.n_seeds_b) == (2, 2)


def test_seed_spread_widens_the_interval():
    rng = np.random.default_rng(3)
    base = rng.random(2000) < 0.6
    flip = rng.random((3, 2000)) < np.array([[0.0], [0.1], [0.2]])  # seeds that differ
    a = np.where(flip, ~base, base)
    b = np.tile(rng.random(2000) < 0.5, (3, 1))
    one = bootstrap_gap(a[:1], b[:1])
    three = bootstrap_gap(a, b)
    assert (three.high - three.low) > (one.high - one.low)
    own = bootstrap_gap(a[:1])  # one side alone: the interval of its accuracy
    lo, hi = wilson(int(a[0].sum()), 2000)
    assert own.low == pytest.approx(lo, abs=0.006) and own.high == pytest.approx(hi, abs=0.006)


def test_bootstrap_rejects_different_images():
    with pytest.raises(ValueError, match="same images"):
        bootstrap_gap(np.ones(5), np.ones(6))
    assert math.isfinite(bootstrap_gap(np.ones(5), np.zeros(5)).value)
