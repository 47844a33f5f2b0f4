"""Small statistics shared by the diagnosis: AP points, shares and rank correlation."""

from __future__ import annotations

import numpy as np


def points(x: float) -> float | None:
    """An evaluator AP (0-1, -1 = undefined) as AP points (0-100) or None."""
    return None if x < 0 else 100.0 * float(x)


def share(mask: np.ndarray) -> float:
    """The fraction of True in ``mask``; 0 when it is empty."""
    return float(mask.mean()) if len(mask) else 0.0


def spearman(x, y) -> float | None:
    """Spearman rank correlation (ties get their average rank); None when undefined."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def average_ranks(v: np.ndarray) -> np.ndarray:
    """0-based ranks of ``v``; tied values share the mean of their ranks."""
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    first = np.r_[True, sorted_v[1:] != sorted_v[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(v)]
    ranks = np.empty(len(v))
    ranks[order] = ((starts + ends - 1) / 2.0)[group]
    return ranks
