"""Paired bootstrap against cases worked out by hand; protocol parsing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from namm_transfer.protocols import Protocol, parse_protocols
from namm_transfer.stats import compare_policies, paired_bootstrap, paired_differences, required_units


def test_bootstrap_matches_the_worked_example():
    # differences [0, 0, 3]: a resample's mean is k ~ Binomial(3, 1/3) (see the module docstring)
    ci90 = paired_bootstrap([0.0, 0.0, 3.0], resamples=20000, level=0.90)
    assert ci90.mean == pytest.approx(1.0)
    assert (ci90.lo, ci90.hi) == (0.0, 2.0)
    ci95 = paired_bootstrap([0.0, 0.0, 3.0], resamples=20000, level=0.95)
    assert (ci95.lo, ci95.hi) == (0.0, 3.0)
    assert not ci95.excludes_zero and ci95.n == 3


def test_bootstrap_distribution_matches_the_binomial():
    # the resampled means of [0, 0, 3] follow 3 * Binomial(3, 1/3) / 3: check the empirical frequencies
    rng = np.random.default_rng(0)
    a = np.array([0.0, 0.0, 3.0])
    means = a[rng.integers(0, 3, size=(40000, 3))].mean(axis=1)
    for k, p in enumerate((8 / 27, 12 / 27, 6 / 27, 1 / 27)):
        assert np.mean(np.isclose(means, k)) == pytest.approx(p, abs=0.01)


def test_constant_difference_is_a_point_and_excludes_zero():
    ci = paired_bootstrap([2.5] * 7)
    assert (ci.mean, ci.lo, ci.hi) == (2.5, 2.5, 2.5) and ci.excludes_zero
    assert paired_bootstrap([0.0] * 4).excludes_zero is False


def test_strata_are_weighted_equally_and_resampled_within():
    # stratum a: two units of +10, stratum b: four units of 0 -> mean over strata 5, not 10/3
    ci = paired_bootstrap({"a": [10.0, 10.0], "b": [0.0, 0.0, 0.0, 0.0]})
    assert ci.mean == 5.0 and ci.stratified
    # stratum a cannot resample to anything but 10, b to anything but 0: the interval is the point
    assert (ci.lo, ci.hi) == (5.0, 5.0) and ci.n == 6


def test_a_single_unit_stratum_pools_the_strata():
    # one unit in stratum a has no spread: a stratified bootstrap would report a zero-width interval
    ci = paired_bootstrap({"a": [10.0], "b": [0.0, 0.0, 0.0, 0.0]})
    assert not ci.stratified and ci.mean == 2.0 and ci.n == 5
    assert ci.lo == 0.0 and ci.hi > ci.mean  # resamples of [10, 0, 0, 0, 0]: all zeros is possible
    # one unit per stratum (four categories, one question each): not a point at the mean
    ci = paired_bootstrap({"c1": [25.0], "c2": [0.0], "c3": [0.0], "c4": [-25.0]})
    assert not ci.stratified and ci.lo < 0 < ci.hi and not ci.excludes_zero


def test_bootstrap_is_reproducible_and_seeded():
    d = list(np.random.default_rng(1).normal(size=40))
    assert paired_bootstrap(d) == paired_bootstrap(d)
    assert paired_bootstrap(d, seed=1) != paired_bootstrap(d, seed=2)


def test_bootstrap_interval_is_close_to_the_normal_one_for_many_units():
    d = np.random.default_rng(3).normal(1.0, 2.0, size=400)
    ci = paired_bootstrap(list(d), resamples=4000)
    se = d.std() / math.sqrt(d.size)
    assert ci.half_width == pytest.approx(1.96 * se, rel=0.08)
    assert ci.lo < d.mean() < ci.hi and ci.excludes_zero


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="no paired units"):
        paired_bootstrap([])
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap([1.0, float("nan")])
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap([1.0], level=1.0)


def test_paired_differences_keep_shared_finite_units():
    units, diffs = paired_differences({"u1": 3.0, "u2": 1.0, "u3": None}, {"u2": 0.5, "u1": 1.0, "u3": 2.0})
    assert units == ["u1", "u2"] and diffs == [2.0, 0.5]


def test_compare_policies_pairs_units_within_protocols():
    recs = []
    for seed in range(5):
        recs.append({"policy": "full", "protocol": None, "seed": seed, "env": "e", "score": 10.0 + seed})
        for proto, delta in (("ratio-50", -1.0), ("threshold", 0.0)):
            recs.append({"policy": "namm", "protocol": proto, "seed": seed, "env": "e", "score": 10.0 + seed + delta})
            recs.append({"policy": "l2", "protocol": proto, "seed": seed, "env": "e", "score": 10.0 + seed - 2})
    out = compare_policies(
        recs, unit=lambda r: (r["env"], r["seed"]), group=lambda r: (r["protocol"], r["policy"]), stratum=None
    )
    assert out[("ratio-50", "namm")]["vs_full"]["mean"] == -1.0
    assert out[("threshold", "namm")]["vs_full"]["mean"] == 0.0
    assert out[("ratio-50", "l2")]["vs_namm"]["mean"] == -1.0  # namm of the same protocol
    assert out[("threshold", "l2")]["vs_namm"]["mean"] == -2.0
    assert out[("ratio-50", "l2")]["vs_namm"]["excludes_zero"] is True
    assert "vs_full" not in out.get((None, "full"), {})  # not compared with itself
    assert out[("ratio-50", "l2")]["vs_full"]["n"] == 5


def test_required_units():
    assert required_units(10.0, 3.0) == math.ceil((1.959964 * 10 / 3) ** 2)
    with pytest.raises(ValueError):
        required_units(1.0, 0.0)


def test_protocols_parse_and_label():
    ps = parse_protocols("ratio:0.5, ratio:25%,threshold")
    assert [p.label for p in ps] == ["ratio-50", "ratio-25", "threshold"]
    assert [p.spec for p in ps] == ["ratio:0.5", "ratio:0.25", "threshold"]
    assert ps[0] == Protocol("ratio", 0.5)
    for bad in ("ratio:1.5", "ratio:0", "ratio:x", "topk", "", "threshold,threshold"):
        with pytest.raises(ValueError):
            parse_protocols(bad)
