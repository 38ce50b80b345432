"""Kaplan et al. 2020: pure power laws in N, D and C on the lower envelope of the points.

Notation: N parameters, D training tokens, L loss (nats per token), C training FLOPs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from llm_jax.scaling.numerics import exp_or_none, one_blas_thread
from llm_jax.scaling.results import Points, group_by_budget


def frontier(x: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Indices (ascending x) of the points that no point with x' <= x matches or beats in loss."""
    order = np.lexsort((loss, x))
    best_so_far = math.inf
    on_frontier = []
    for index in order:
        if loss[index] < best_so_far:
            on_frontier.append(int(index))
            best_so_far = float(loss[index])
    return np.array(on_frontier, dtype=int)


def compute_frontier(points: Points) -> np.ndarray:
    """Indices (ascending C) of the compute frontier: the best run of each budget (runs whose C
    agree within BUDGET_TOLERANCE), kept where no smaller budget's best matches or beats it. Taking
    one run per budget first matters: runs planned for one budget differ in C by a fraction of a
    percent, and a frontier over raw C would keep every run of a budget that beats its cheaper
    neighbours, whatever its size."""
    best = np.array([group[np.argmin(points.L[group])] for group in group_by_budget(points.C)], dtype=int)
    return best[frontier(points.C[best], points.L[best])]


def _power_law(x: np.ndarray, loss: np.ndarray) -> tuple[float, float | None] | None:
    """(alpha, x_c) of L = (x_c / x)^alpha by least squares in log space, or None where the
    points cannot give a falling law (fewer than two distinct x, or a rising fit)."""
    if len(np.unique(x)) < 2:
        return None
    slope, offset = np.polyfit(np.log(x), np.log(loss), 1)
    alpha = -float(slope)
    if not alpha > 0:
        return None
    # ln L = alpha ln x_c - alpha ln x, so ln x_c = offset / alpha.
    return alpha, exp_or_none(float(offset) / alpha)


@one_blas_thread
def fit_kaplan(points: Points) -> tuple[dict[str, Any], list[str]]:
    """Kaplan et al.'s L(N) = (N_c/N)^alpha_N, L(D) = (D_c/D)^alpha_D and L(C) = (C_c/C)^alpha_C.

    Kaplan fitted L(N) on models trained near convergence, L(D) on large models with early
    stopping, and L(C) on the envelope of learning curves. A results table has one final loss per
    run, so each law here is fitted on the table's lower envelope along its variable (the points
    no smaller-or-equal N, D or C beats). On an IsoFLOP grid these are approximations of Kaplan's
    setup: the envelope over N is limited by each budget's data, and the L(C) frontier holds only
    the best run of each budget, not the best point of every learning curve."""
    result: dict[str, Any] = {}
    notes = []
    for variable, values in (("N", points.N), ("D", points.D), ("C", points.C)):
        on_frontier = compute_frontier(points) if variable == "C" else frontier(values, points.L)
        fitted = _power_law(values[on_frontier], points.L[on_frontier])
        if fitted is None:
            notes.append(f"Kaplan L({variable}) unavailable: {len(on_frontier)} frontier point(s) give no falling law")
        alpha, scale = fitted if fitted is not None else (None, None)
        result[f"alpha_{variable}"] = alpha
        result[f"{variable}_c"] = scale
        result[f"frontier_{variable}"] = [points.names[i] for i in on_frontier]
    return result, notes
