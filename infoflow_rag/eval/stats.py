"""Uncertainty for per-question scores: percentile-bootstrap confidence intervals (numpy only)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A sample mean with a ``1 - alpha`` confidence interval ``[low, high]`` over ``n`` values."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def resolution(self) -> float | None:
        """|mean| / half-width of the interval (above 1: the interval excludes 0); None for a zero-width one."""
        half = (self.high - self.low) / 2
        return abs(self.mean) / half if half > 0 else None


@dataclass(frozen=True)
class WinTieLoss:
    """Per-question comparison counts of ``a`` against ``b``."""

    wins: int
    ties: int
    losses: int

    def __str__(self) -> str:
        return f"{self.wins}/{self.ties}/{self.losses}"


def mean_ci(values: Sequence[float], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> Estimate:
    """Mean of ``values`` with a percentile-bootstrap CI (questions resampled with replacement)."""
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size == 0:
        raise ValueError(f"mean_ci needs a non-empty 1-D list of numbers, got shape {data.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    rng = np.random.default_rng(seed)
    boot_means = data[rng.integers(0, data.size, size=(n_boot, data.size))].mean(axis=1)
    low, high = np.quantile(boot_means, [alpha / 2, 1 - alpha / 2])
    return Estimate(mean=float(data.mean()), low=float(low), high=float(high), n=int(data.size))


def shared_ids(ours: Mapping, theirs: Mapping) -> list:
    """The question ids both methods have, in ``ours``' order (the order its rows were written).

    A paired bootstrap resamples positions, so two pairings of the same questions in different orders state
    different intervals; every table and verdict pairs in this one order, and so states the same interval.
    """
    return [i for i in ours if i in theirs]


def paired_diff(
    a: Sequence[float], b: Sequence[float], n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> Estimate:
    """Mean of the per-question differences ``a[i] - b[i]`` with a bootstrap CI over questions."""
    return mean_ci(_paired_diffs(a, b), n_boot=n_boot, seed=seed, alpha=alpha)


KL_FLOOR = 1e-6  # below float noise of a recompute: keeps a log ratio finite where a KL is exactly 0


def log_kl_diff(a: Sequence[float], b: Sequence[float], n_boot: int = 1000, seed: int = 0) -> Estimate:
    """Paired mean of log10(a[i] / b[i]) for KL divergences (floored at KL_FLOOR), with its bootstrap CI.

    KL is heavy-tailed: a few questions can carry the arithmetic mean. On the log scale each question counts
    once; 10 ** the estimate is the geometric-mean ratio a / b (below 1: ``a`` is closer to the reference).
    """
    return paired_diff(np.log10(np.maximum(a, KL_FLOOR)), np.log10(np.maximum(b, KL_FLOOR)), n_boot, seed)


def win_tie_loss(a: Sequence[float], b: Sequence[float]) -> WinTieLoss:
    """How many questions ``a`` scores higher than, equal to, or lower than ``b``."""
    diffs = _paired_diffs(a, b)
    return WinTieLoss(wins=int((diffs > 0).sum()), ties=int((diffs == 0).sum()), losses=int((diffs < 0).sum()))


def _paired_diffs(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    if len(a) != len(b):
        raise ValueError(f"paired scores must align question by question, got {len(a)} vs {len(b)} values")
    return np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
