"""Chinchilla approach 3 (Hoffmann et al. 2022, as corrected by Besiroglu et al. 2024): the
parametric law L(N, D) = E + A / N^alpha + B / D^beta, fitted in log space with a summed Huber
loss from a grid of L-BFGS-B starts, standard errors by bootstrap.

Notation: N parameters, D training tokens, L loss (nats per token), C training FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from llm_jax.scaling.numerics import DEFAULT_RESAMPLES, DEFAULT_SEED, finite_or_none, one_blas_thread
from llm_jax.scaling.results import Points

# --------------------------------------------------------------------------------------------
# The parametric law and its compute-optimal allocation
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParametricLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, eq. 2)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, N: np.ndarray | float, D: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

    @property
    def a(self) -> float:
        """Exponent of N_opt ~ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D_opt ~ C^b; a + b = 1."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def has_optimum(self) -> bool:
        """Whether L falls in both N and D, so that a budget has a best split (a fit to odd data
        can give an exponent <= 0)."""
        return self.alpha > 0 and self.beta > 0 and all(math.isfinite(v) for v in (self.A, self.B))

    def compute_optimal(self, C: np.ndarray | float) -> tuple[np.ndarray | float, np.ndarray | float]:
        """(N_opt, D_opt) minimising L under the budget C = 6 N D (Hoffmann et al. 2022, eq. 4):
        N_opt = G (C/6)^a, D_opt = (C/6)^b / G with G = (alpha A / (beta B))^(1 / (alpha + beta)).
        NaN where the law has no optimum."""
        if not self.has_optimum:
            return np.full(np.shape(C), np.nan)[()], np.full(np.shape(C), np.nan)[()]
        G = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        return G * np.power(np.divide(C, 6.0), self.a), np.power(np.divide(C, 6.0), self.b) / G

    @classmethod
    def from_result(cls, result: dict) -> ParametricLaw | None:
        """The law fit_all found, or None when part of it is unavailable."""
        values = [result.get(key) for key in ("E", "A", "B", "alpha", "beta")]
        if any(value is None for value in values):
            return None
        return cls(*values)


# --------------------------------------------------------------------------------------------
# Approach 3: the parametric fit
# --------------------------------------------------------------------------------------------
# Parameters are theta = (a, b, e, alpha, beta) with A = exp(a), B = exp(b), E = exp(e), so that
# log L_hat = LSE(a - alpha log N, b - beta log D, e). The optimiser works on log N and log D
# centred on their means (a and b shifted accordingly): the same minimum, but the columns
# (1, log N) are no longer nearly parallel; L-BFGS needs about a quarter fewer evaluations.

# Hoffmann et al.'s delta: residuals (in log loss) beyond it count linearly, so outliers weigh less.
HUBER_DELTA = 1e-3
# Hoffmann et al.'s grid of initialisations (a, b, e, alpha, beta); 5 * 5 * 5 * 6 * 6 = 4500 starts.
GRID_EXPONENTS = (0.0, 0.5, 1.0, 1.5, 2.0)
GRID_E = (-1.0, -0.5, 0.0, 0.5, 1.0)
GRID_AB = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
# Bootstrap refits start from the full-data optimum and from the best start of a coarser grid
# (a, b in {0, 10, 20}, e in {-1, 0, 1}, the same exponents: 675 rows) for that resample. In
# trials the full-data optimum always won and converged in a third of the steps; the grid start
# is insurance against a resample whose optimum lies in another basin.
BOOTSTRAP_GRID_AB = (0.0, 10.0, 20.0)
BOOTSTRAP_GRID_E = (-1.0, 0.0, 1.0)
LBFGS_OPTIONS = {"maxiter": 10_000, "maxfun": 20_000, "gtol": 1e-12, "ftol": 1e-15, "maxls": 50}


@dataclass(frozen=True)
class _LogData:
    """The data in the optimiser's coordinates: centred log N and log D, log L, point weights."""

    x_n: np.ndarray
    x_d: np.ndarray
    log_loss: np.ndarray
    weights: np.ndarray


@dataclass(frozen=True)
class Approach3:
    """The fitted law, the bootstrap SE of each parameter (and of a3, b3), the number of
    resamples, and the residuals log L - log L_hat of the runs."""

    law: ParametricLaw
    se: dict[str, float | None]
    resamples: int
    residuals: np.ndarray


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    abs_r = np.abs(r)
    return np.where(abs_r <= delta, 0.5 * r * r, delta * (abs_r - 0.5 * delta))


def _objective(theta: np.ndarray, data: _LogData) -> tuple[float, np.ndarray]:
    """Weighted sum over points of Huber(LSE - log L) and its exact gradient. Summed, not
    averaged: the mean's tiny values stopped Hoffmann et al.'s L-BFGS early (Besiroglu et al.)."""
    a, b, e, alpha, beta = theta
    t_n = a - alpha * data.x_n
    t_d = b - beta * data.x_d
    top = np.maximum(np.maximum(t_n, t_d), e)
    w_n, w_d, w_e = np.exp(t_n - top), np.exp(t_d - top), np.exp(e - top)
    total = w_n + w_d + w_e
    r = top + np.log(total) - data.log_loss
    # d Huber / d r is r clipped to [-delta, delta]; d LSE / d t_k is the softmax weight of t_k.
    slope = data.weights * np.clip(r, -HUBER_DELTA, HUBER_DELTA) / total
    g_n, g_d = slope * w_n, slope * w_d
    gradient = np.array([g_n.sum(), g_d.sum(), (slope * w_e).sum(), -(g_n @ data.x_n), -(g_d @ data.x_d)])
    return float(data.weights @ _huber(r, HUBER_DELTA)), gradient


def _grid(log_n_mean: float, log_d_mean: float, ab_values: tuple[float, ...] = GRID_AB,
          e_values: tuple[float, ...] = GRID_E) -> np.ndarray:
    """Hoffmann's grid as rows (a, b, e, alpha, beta) in the centred coordinates."""
    a, b, e, alpha, beta = (g.ravel() for g in np.meshgrid(ab_values, ab_values, e_values, GRID_EXPONENTS,
                                                              GRID_EXPONENTS, indexing="ij"))
    return np.stack([a - alpha * log_n_mean, b - beta * log_d_mean, e, alpha, beta], axis=1)


def _grid_objectives(grid: np.ndarray, data: _LogData) -> np.ndarray:
    """The objective at every grid row at once, in chunks that keep memory small."""
    chunk = max(1, 1_000_000 // max(1, len(data.log_loss)))
    values = []
    for start in range(0, len(grid), chunk):
        a, b, e, alpha, beta = (column[:, None] for column in grid[start:start + chunk].T)
        log_pred = np.logaddexp(np.logaddexp(a - alpha * data.x_n, b - beta * data.x_d), e)
        values.append(_huber(log_pred - data.log_loss, HUBER_DELTA) @ data.weights)
    return np.concatenate(values)


def _best_start_per_exponent_pair(grid: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each (alpha, beta) of the grid, the (a, b, e) with the lowest objective.

    Running L-BFGS from all 4500 grid points takes tens of seconds; the exponents are where the
    fit is non-convex, so every exponent pair keeps one start (25 runs) and the near-linear
    coefficients a, b, e are screened by evaluating the objective on the whole grid at once."""
    pairs = grid[:, 3:]
    starts = []
    for pair in np.unique(pairs, axis=0):
        rows = np.flatnonzero(np.all(pairs == pair, axis=1))
        starts.append(grid[rows[np.argmin(values[rows])]])
    return np.array(starts)


def _minimise(starts: np.ndarray, data: _LogData) -> tuple[np.ndarray, float]:
    """L-BFGS-B from each start (unbounded); the best end point (first one on ties)."""
    best_theta, best_value = starts[0], math.inf
    for start in starts:
        found = minimize(_objective, start, args=(data,), jac=True, method="L-BFGS-B", options=LBFGS_OPTIONS)
        if np.all(np.isfinite(found.x)) and found.fun < best_value:
            best_theta, best_value = found.x, float(found.fun)
    return best_theta, best_value


def _uncentre(theta: np.ndarray, log_n_mean: float, log_d_mean: float) -> np.ndarray:
    a, b, e, alpha, beta = theta
    return np.array([a + alpha * log_n_mean, b + beta * log_d_mean, e, alpha, beta])


def _law(theta: np.ndarray) -> ParametricLaw:
    a, b, e, alpha, beta = theta
    with np.errstate(over="ignore"):  # a degenerate fit may run off to infinity; JSON shows it as None
        E, A, B = (float(np.exp(v)) for v in (e, a, b))
    return ParametricLaw(E=E, A=A, B=B, alpha=float(alpha), beta=float(beta))


@one_blas_thread
def fit_approach3(points: Points, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> Approach3:
    """The parametric law by L-BFGS-B from Hoffmann's grid, with bootstrap standard errors.

    Each bootstrap resample draws the points with replacement (as integer weights, the same
    objective as repeating rows) and refits from the full-data optimum and the best start of a
    coarser grid for that resample; the SE of a parameter is the standard deviation of its
    refits. A fixed seed makes the whole fit deterministic."""
    log_n, log_d = np.log(points.N), np.log(points.D)
    centre_n, centre_d = float(log_n.mean()), float(log_d.mean())
    data = _LogData(log_n - centre_n, log_d - centre_d, np.log(points.L), np.ones(len(points)))
    grid = _grid(centre_n, centre_d)
    theta, _ = _minimise(_best_start_per_exponent_pair(grid, _grid_objectives(grid, data)), data)
    coarse_grid = _grid(centre_n, centre_d, BOOTSTRAP_GRID_AB, BOOTSTRAP_GRID_E)
    samples = _bootstrap3(theta, coarse_grid, data, resamples, seed)
    full = _uncentre(theta, centre_n, centre_d)
    samples = np.array([_uncentre(s, centre_n, centre_d) for s in samples]).reshape(-1, 5)
    law = _law(full)
    residuals = data.log_loss - np.log(law.loss(points.N, points.D))
    return Approach3(law=law, se=_approach3_se(samples), resamples=len(samples), residuals=residuals)


def _bootstrap3(theta: np.ndarray, grid: np.ndarray, data: _LogData, resamples: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    n = len(data.log_loss)
    fits = []
    for _ in range(resamples):
        weights = np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
        resampled = _LogData(data.x_n, data.x_d, data.log_loss, weights)
        grid_start = grid[np.argmin(_grid_objectives(grid, resampled))]
        fits.append(_minimise(np.vstack([theta, grid_start]), resampled)[0])
    return fits


def _approach3_se(samples: np.ndarray) -> dict[str, float | None]:
    """Standard deviation over the bootstrap refits of each parameter and of a3 and b3."""
    if len(samples) < 2:
        return {key: None for key in ("E", "A", "B", "alpha", "beta", "a3", "b3")}
    a, b, e, alpha, beta = samples.T
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        derived = {"E": np.exp(e), "A": np.exp(a), "B": np.exp(b), "alpha": alpha, "beta": beta,
                   "a3": beta / (alpha + beta), "b3": alpha / (alpha + beta)}
        return {key: finite_or_none(float(np.std(values, ddof=1))) for key, values in derived.items()}
