"""Chinchilla approach 2 (Hoffmann et al. 2022): IsoFLOP profiles. A parabola of loss against
log N (and log D) at each compute budget gives the best size there; N_opt ~ C^a and D_opt ~ C^b
by least squares over the budgets, standard errors by bootstrap within the budgets.

Notation: N parameters, D training tokens, L loss (nats per token), C training FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm_jax.scaling.numerics import DEFAULT_RESAMPLES, DEFAULT_SEED, exp_or_none, finite_or_none, one_blas_thread
from llm_jax.scaling.results import Points, group_by_budget

MIN_SIZES_PER_BUDGET = 3
# The parabola at a budget is fitted to the size with the least loss and at most this many sizes
# on each side of it. Over a wide grid the profile is not symmetric in ln N (it climbs steeply on the large side,
# where D becomes small), and a parabola through every size puts its vertex off the real minimum,
# often outside the grid; near the minimum a parabola is a good local model.
PARABOLA_NEIGHBOURS = 2


@dataclass(frozen=True)
class _Vertex:
    """A parabola L = c2 x^2 + c1 x + c0 in x = ln(size), its minimum, or why it has none."""

    coefficients: tuple[float, float, float]
    x_opt: float | None
    loss_opt: float | None
    problem: str | None


def near_minimum(x: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points whose size lies within PARABOLA_NEIGHBOURS distinct sizes (in rank) of the size with
    the least loss: fewer at the grid's edges, where the vertex then tends to fall outside."""
    sizes = np.unique(x)
    best = int(np.searchsorted(sizes, x[np.argmin(loss)]))
    low, high = max(0, best - PARABOLA_NEIGHBOURS), min(len(sizes) - 1, best + PARABOLA_NEIGHBOURS)
    keep = (x >= sizes[low]) & (x <= sizes[high])
    return x[keep], loss[keep]


def _parabola_vertex(x: np.ndarray, loss: np.ndarray) -> _Vertex:
    x, loss = near_minimum(x, loss)
    c2, c1, c0 = (float(c) for c in np.polyfit(x, loss, 2))
    if not c2 > 0:
        return _Vertex((c2, c1, c0), None, None, "the parabola opens downward")
    x_opt = -c1 / (2.0 * c2)
    if not x.min() <= x_opt <= x.max():
        return _Vertex((c2, c1, c0), None, None, "the parabola's minimum lies outside the sampled sizes")
    return _Vertex((c2, c1, c0), x_opt, c0 - c1 * c1 / (4.0 * c2), None)


def _budget_optima(points: Points, group: np.ndarray) -> tuple[_Vertex, _Vertex]:
    """The parabolas of loss against ln N and against ln D at one budget."""
    loss = points.L[group]
    return _parabola_vertex(np.log(points.N[group]), loss), _parabola_vertex(np.log(points.D[group]), loss)


def _slope_fit(log_c: np.ndarray, log_opt: np.ndarray) -> tuple[float, float, float | None]:
    """Least squares log_opt = slope log_c + offset: (slope, offset, the slope's standard error;
    None with two budgets, where the line passes through both)."""
    slope, offset = (float(c) for c in np.polyfit(log_c, log_opt, 1))
    if len(log_c) < 3:
        return slope, offset, None
    residual = log_opt - (slope * log_c + offset)
    spread = float(np.sum((log_c - log_c.mean()) ** 2))
    return slope, offset, finite_or_none(math.sqrt(float(residual @ residual) / (len(log_c) - 2) / spread))


def _exponents(points: Points, groups: list[np.ndarray]) -> tuple[float | None, float | None]:
    """Approach 2's a and b from the given budget groups; None where under two budgets have a vertex."""
    log_c, log_n, log_d = [], [], []
    for group in groups:
        if len(np.unique(points.N[group])) < MIN_SIZES_PER_BUDGET:
            continue
        by_n, by_d = _budget_optima(points, group)
        log_c.append(float(np.log(points.C[group]).mean()))
        log_n.append(by_n.x_opt)
        log_d.append(by_d.x_opt)
    return _slope_or_none(log_c, log_n), _slope_or_none(log_c, log_d)


def _slope_or_none(log_c: list[float], log_opt: list[float | None]) -> float | None:
    pairs = [(c, o) for c, o in zip(log_c, log_opt) if o is not None]
    if len(pairs) < 2:
        return None
    return float(np.polyfit(*np.array(pairs).T, 1)[0])


@one_blas_thread
def fit_approach2(points: Points, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> dict:
    """IsoFLOP profiles: per budget (>= 3 distinct sizes) the vertices of parabolas of loss in
    ln N and in ln D over the sizes within PARABOLA_NEIGHBOURS of the best run, then N_opt ~ C^a
    and D_opt ~ C^b by least squares over the budgets.

    Standard errors of a and b: bootstrap, resampling the points within each budget with replacement
    (fixed seed) and redoing both steps; where fewer than half the resamples give a slope (too few
    sizes per budget), the least-squares standard error of the slope, which needs three budgets."""
    all_groups = group_by_budget(points.C)
    groups = [g for g in all_groups if len(np.unique(points.N[g])) >= MIN_SIZES_PER_BUDGET]
    notes = []
    skipped = len(all_groups) - len(groups)
    if skipped:
        notes.append(f"approach 2: {skipped} budget(s) with fewer than {MIN_SIZES_PER_BUDGET} distinct sizes left out")
    budgets = [_budget_entry(points, group, notes) for group in groups]
    result: dict[str, Any] = {"budgets": budgets, "notes": notes}
    for key, size in (("a", "N_opt"), ("b", "D_opt")):
        usable = [entry for entry in budgets if entry[size] is not None]
        if len(usable) < 2:
            notes.append(f"approach 2: {key} unavailable: {len(usable)} budget(s) with a minimum in {size[0]}, "
                         "needs 2")
            result.update({key: None, f"{key}_se": None, f"{key}_offset": None})
            continue
        slope, offset, regression_se = _slope_fit(np.log([e["C"] for e in usable]), np.log([e[size] for e in usable]))
        result.update({key: slope, f"{key}_offset": offset, f"{key}_se": regression_se})
    _bootstrap2(points, groups, result, resamples, seed)
    return result


def _budget_entry(points: Points, group: np.ndarray, notes: list[str]) -> dict[str, Any]:
    by_n, by_d = _budget_optima(points, group)
    budget = float(np.exp(np.log(points.C[group]).mean()))
    for name, vertex in (("N", by_n), ("D", by_d)):
        if vertex.problem:
            notes.append(f"approach 2: budget C={budget:.3g} skipped for {name}_opt: {vertex.problem}")
    return {"C": budget, "runs": int(len(group)), "sizes": int(len(np.unique(points.N[group]))),
            "N_opt": exp_or_none(by_n.x_opt), "D_opt": exp_or_none(by_d.x_opt),
            "loss_fit": by_n.loss_opt, "loss_min": float(points.L[group].min()),
            "parabola_N": list(by_n.coefficients), "parabola_D": list(by_d.coefficients)}


def _bootstrap2(points: Points, groups: list[np.ndarray], result: dict, resamples: int, seed: int) -> None:
    """Replace the regression SEs by bootstrap SEs where enough resamples give a slope."""
    rng = np.random.default_rng(seed)
    slopes: dict[str, list[float]] = {"a": [], "b": []}
    for _ in range(resamples):
        drawn = [group[rng.integers(0, len(group), len(group))] for group in groups]
        for key, value in zip(("a", "b"), _exponents(points, drawn)):
            if value is not None:
                slopes[key].append(value)
    for key in ("a", "b"):
        if result[key] is None:
            continue
        if resamples and len(slopes[key]) >= max(2, resamples // 2):
            result[f"{key}_se"] = finite_or_none(float(np.std(slopes[key], ddof=1)))
            source = f"bootstrap within budgets ({len(slopes[key])} of {resamples} resamples gave a slope)"
        else:
            why = "no bootstrap" if not resamples else "the bootstrap within budgets degenerated"
            source = (f"least-squares standard error of the slope ({why})" if result[f"{key}_se"] is not None
                      else f"none: {why} and two budgets leave no residual")
        result["notes"].append(f"approach 2: {key}_se from {source}")
