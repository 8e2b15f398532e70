"""Sparsity schedules as pure functions of the step: linear (eq. 3), AGP cubic (eq. 4), movement ramp."""

from __future__ import annotations


def linear_sparsity(k: int, n: int, initial: float, final: float) -> float:
    """Sparsity after the k-th of n mask updates, linear in k.

    The paper's eq. 3, zeta_0 + (t - t0) / (n dt) * zeta_f with t - t0 = k dt, written as
    zeta_0 + (zeta_f - zeta_0) k / n: identical for zeta_0 = 0 (the paper's case) and it never
    overshoots the target otherwise.
    """
    frac = min(max(k / n, 0.0), 1.0)
    return initial + (final - initial) * frac


def agp_sparsity(k: int, n: int, initial: float, final: float) -> float:
    """Sparsity after the k-th of n mask updates, cubic (Zhu & Gupta's AGP, the paper's eq. 4)."""
    frac = min(max(k / n, 0.0), 1.0)
    return final + (initial - final) * (1.0 - frac) ** 3


def cubic_sparsity(
    it: int, *, total: int, warmup: int, cooldown: int, initial: float, final: float
) -> float:
    """Movement pruning's schedule over iterations: `initial` during warm-up, a cubic ramp, then
    `final` for the last `cooldown` iterations (Sanh et al. 2020)."""
    ramp = total - warmup - cooldown
    if it <= warmup:
        return initial
    if it >= warmup + ramp:
        return final
    return final + (initial - final) * (1.0 - (it - warmup) / ramp) ** 3
