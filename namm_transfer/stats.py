"""Paired comparisons: per-unit differences, a stratified paired bootstrap interval, and sample sizes.

Every comparison the toolkit reports is paired: both policies ran on the same units (prompts, episode seeds,
video questions), and what is summarized is the per-unit difference ``a[u] - b[u]``. Units are grouped in
strata (tasks, envs, lengths): the statistic is the **mean over strata of the within-stratum mean
difference**, the same weighting as the tables' ``score`` (mean over tasks / envs). A stratum with one
unit counts as much as one with fifty, exactly as in the score.

A stratum with a single unit has no spread to resample, so a stratified bootstrap would give it none: when any
stratum holds fewer than two units, the strata are pooled (every unit weighs the same, the statistic is the mean
difference over units) and the interval says so (``stratified`` is false).

The interval is a percentile bootstrap: each resample draws, within every stratum independently, as many
units as it holds, with replacement; the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the
resampled statistic (numpy's ``inverted_cdf`` quantile: the smallest resampled value whose empirical CDF
reaches the level, so a bound is always a value the statistic can take) bound it. The generator is
``numpy.random.default_rng(seed)`` with a fixed default seed, so a summary is reproducible byte for byte.

Worked example (tests/test_stats.py): differences ``[0, 0, 3]`` in one stratum. A resample's mean is ``k``
where ``k ~ Binomial(3, 1/3)`` counts the draws of the 3: P(0) = 8/27, P(1) = 12/27, P(2) = 6/27,
P(3) = 1/27. The 90% interval's upper bound is the 0.95 quantile: CDF(1) = 20/27 = 0.74, CDF(2) = 26/27 =
0.963 >= 0.95, so 2; the lower bound is the 0.05 quantile, 0 (CDF(0) = 0.296). At 95% the upper bound is 3
(0.963 < 0.975).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_RESAMPLES",
    "DEFAULT_SEED",
    "PairedInterval",
    "paired_bootstrap",
    "paired_differences",
    "compare_policies",
    "required_units",
]

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class PairedInterval:
    """Mean paired difference and its bootstrap interval.

    Attributes:
        mean: mean over strata of the within-stratum mean difference.
        lo, hi: the interval's bounds (``lo <= mean <= hi`` up to the bootstrap's granularity).
        n: paired units used (over all strata).
        level: the interval's coverage (0.95 by default).
        resamples: bootstrap resamples drawn.
        excludes_zero: ``lo > 0`` or ``hi < 0``: a difference the data can tell from none.
        stratified: the units were resampled within their strata (false: pooled, see the module docstring).
    """

    mean: float
    lo: float
    hi: float
    n: int
    level: float = DEFAULT_LEVEL
    resamples: int = DEFAULT_RESAMPLES
    excludes_zero: bool = False
    stratified: bool = True

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_bootstrap(
    differences: Sequence[float] | Mapping[Hashable, Sequence[float]],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    level: float = DEFAULT_LEVEL,
) -> PairedInterval:
    """Bootstrap interval of the mean paired difference.

    Args:
        differences: per-unit differences, one sequence (one stratum) or ``{stratum: differences}``.
        resamples: bootstrap resamples (at least 1).
        seed: seed of ``numpy.random.default_rng``.
        level: coverage in (0, 1).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    strata = dict(differences) if isinstance(differences, Mapping) else {None: differences}
    arrays = [np.asarray(list(v), dtype=np.float64) for v in strata.values()]
    arrays = [a for a in arrays if a.size]
    if not arrays:
        raise ValueError("no paired units to compare")
    if any(not np.all(np.isfinite(a)) for a in arrays):
        raise ValueError("differences must be finite")
    stratified = len(arrays) == 1 or all(a.size >= 2 for a in arrays)
    if not stratified:
        arrays = [np.concatenate(arrays)]
    rng = np.random.default_rng(seed)
    mean = float(np.mean([a.mean() for a in arrays]))
    boot = np.zeros(resamples, dtype=np.float64)
    for a in arrays:  # strata in insertion order: the draws are reproducible for a given input
        idx = rng.integers(0, a.size, size=(resamples, a.size))
        boot += a[idx].mean(axis=1)
    boot /= len(arrays)
    tail = (1.0 - level) / 2
    lo, hi = (float(q) for q in np.quantile(boot, [tail, 1.0 - tail], method="inverted_cdf"))
    lo, hi = min(lo, mean), max(hi, mean)  # rounding of a constant difference
    n = int(sum(a.size for a in arrays))
    return PairedInterval(mean, lo, hi, n, level, resamples, bool(lo > 0 or hi < 0), stratified)


def paired_differences(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> tuple[list[Hashable], list[float]]:
    """Units present (with a finite value) in both ``a`` and ``b``, in ``a``'s order, and ``a[u] - b[u]``."""
    units, diffs = [], []
    for u, va in a.items():
        vb = b.get(u)
        if _finite(va) and _finite(vb):
            units.append(u)
            diffs.append(float(va) - float(vb))  # type: ignore[arg-type]
    return units, diffs


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def compare_policies(
    records: Iterable[Mapping[str, Any]],
    *,
    unit: Callable[[Mapping[str, Any]], Hashable],
    value: str | Callable[[Mapping[str, Any]], float | None] = "score",
    stratum: Callable[[Mapping[str, Any]], Hashable] | None = None,
    group: Callable[[Mapping[str, Any]], Hashable] | None = None,
    references: Sequence[str] = ("full", "namm"),
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    level: float = DEFAULT_LEVEL,
) -> dict[Hashable, dict[str, dict[str, Any]]]:
    """Paired intervals of every row against each reference policy.

    A row is ``group(record)``: the policy by default, or a ``(protocol, policy)`` tuple. A row is compared
    with the reference row of the same protocol (``(protocol, ref)``), else with a protocol-free reference
    (``(None, ref)`` or ``ref``: the full cache runs once and is shared by every protocol). Values are paired
    by ``unit(record)``, grouped by ``stratum(record)`` (see :func:`paired_bootstrap`).

    Returns ``{row: {"vs_<ref>": PairedInterval.as_dict()}}``; a row is not compared with itself, and a
    comparison without paired units is left out.
    """
    get = (lambda r: r.get(value)) if isinstance(value, str) else value
    row_of = group or (lambda r: r.get("policy"))
    stratum_of = stratum or (lambda r: None)
    table: dict[Hashable, dict[Hashable, tuple[Hashable, float]]] = {}
    for rec in records:
        v = get(rec)
        if not _finite(v):
            continue
        table.setdefault(row_of(rec), {})[unit(rec)] = (stratum_of(rec), float(v))  # type: ignore[arg-type]
    out: dict[Hashable, dict[str, dict[str, Any]]] = {}
    for row, values in table.items():
        for ref in references:
            ref_row = _reference_row(row, ref, table)
            if ref_row is None or ref_row == row:
                continue
            ref_values = table[ref_row]
            by_stratum: dict[Hashable, list[float]] = {}
            for u, (s, v) in values.items():
                if u in ref_values:
                    by_stratum.setdefault(s, []).append(v - ref_values[u][1])
            if not by_stratum:
                continue
            ci = paired_bootstrap(by_stratum, resamples=resamples, seed=seed, level=level)
            out.setdefault(row, {})[f"vs_{ref}"] = ci.as_dict()
    return out


def _reference_row(row: Hashable, ref: str, table: Mapping[Hashable, Any]) -> Hashable | None:
    """The row to compare ``row`` with: ``ref`` itself for plain policy rows; for ``(protocol, policy)`` rows,
    ``(protocol, ref)`` if present, else a protocol-free reference row ``ref`` or ``(None, ref)`` (the full
    cache is run once and shared by every protocol)."""
    if isinstance(row, tuple) and len(row) == 2:
        for cand in ((row[0], ref), (None, ref), ref):
            if cand in table:
                return cand
        return None
    return ref if ref in table else None


def required_units(sd: float, half_width: float, *, level: float = DEFAULT_LEVEL) -> int:
    """Units needed for a normal-approximation interval of the mean difference no wider than ``+-half_width``,
    given the per-unit difference's standard deviation ``sd``: ``ceil((z * sd / half_width) ** 2)``."""
    if half_width <= 0:
        raise ValueError("half_width must be > 0")
    from statistics import NormalDist

    z = NormalDist().inv_cdf((1 + level) / 2)
    return max(2, math.ceil((z * sd / half_width) ** 2))
