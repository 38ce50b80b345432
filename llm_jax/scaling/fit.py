"""Fit scaling laws to the results of a training sweep.

Three views of one results table (a CSV with a row per finished run):

- Chinchilla approach 3 (Hoffmann et al. 2022, as corrected by Besiroglu et al. 2024): the
  parametric law L(N, D) = E + A / N^alpha + B / D^beta, fitted in log space with a summed Huber
  loss, standard errors by bootstrap.
- Chinchilla approach 2: IsoFLOP profiles. A parabola of loss against log N (and log D) at each
  compute budget gives the best size there; N_opt ~ C^a and D_opt ~ C^b by least squares.
- Kaplan et al. 2020: pure power laws in N, D and C on the lower envelope of the points.

Notation: N parameters, D training tokens, L loss (nats per token), C training FLOPs.
"""

from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from llm_jax.errors import UserError

REQUIRED_COLUMNS = ("params", "tokens", "loss")
# Approach 3 has five free parameters; fewer finished runs cannot pin them down.
MIN_POINTS = 5
HUBER_DELTA = 1e-3
DEFAULT_RESAMPLES = 200
DEFAULT_SEED = 0
# Points whose compute agrees within this relative difference form one IsoFLOP budget.
BUDGET_TOLERANCE = 0.05
MIN_SIZES_PER_BUDGET = 3

# Published values, printed beside the fit for comparison.
HOFFMANN = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28, "a": 0.50, "b": 0.50}
BESIROGLU = {"E": 1.82, "A": 482.0, "B": 2085.0, "alpha": 0.348, "beta": 0.366}
KAPLAN = {"alpha_N": 0.076, "alpha_D": 0.095, "alpha_C": 0.050, "a": 0.73}


Fitted = TypeVar("Fitted")


def _one_blas_thread(fit: Callable[..., Fitted]) -> Callable[..., Fitted]:
    """Run `fit` with OpenBLAS on one thread. L-BFGS-B's and polyfit's linear algebra is on 5x5
    matrices, and OpenBLAS's threads then cost far more than the work: on a busy 2-core machine
    one L-BFGS-B run took 0.8 s threaded and 12 ms on one thread."""

    @functools.wraps(fit)
    def limited(*args: Any, **kwargs: Any) -> Fitted:
        with threadpool_limits(limits=1, user_api="blas"):
            return fit(*args, **kwargs)

    return limited


# --------------------------------------------------------------------------------------------
# Reading the results table
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Points:
    """Finished runs: N parameters, D tokens, L loss, C training FLOPs (one entry per run)."""

    N: np.ndarray
    D: np.ndarray
    L: np.ndarray
    C: np.ndarray
    names: tuple[str, ...]
    archs: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.L)

    def subset(self, index: np.ndarray) -> Points:
        return Points(self.N[index], self.D[index], self.L[index], self.C[index],
                      tuple(self.names[i] for i in index), tuple(self.archs[i] for i in index))


def read_results(path: str | Path) -> Points:
    """Read a results CSV (columns name, arch, params, params_nonembed, tokens, flops, loss, bpb,
    run_dir; only params, tokens and loss are required). A row with an empty or non-finite loss is
    a failed run and is skipped; a missing or empty flops is taken as 6 * params * tokens."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"results file {path} does not exist" if not path.exists()
                        else f"results path {path} is not a file")
    try:
        rows = _finished_rows(path)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path} is not a readable UTF-8 CSV file: {exc}") from None
    if len(rows) < MIN_POINTS:
        raise UserError(f"{path} has {len(rows)} finished runs (rows with a finite loss); "
                        f"fitting needs at least {MIN_POINTS}")
    N, D, L, C, names, archs = zip(*rows)
    return Points(np.array(N), np.array(D), np.array(L), np.array(C), tuple(names), tuple(archs))


def _finished_rows(path: Path) -> list[tuple]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, skipinitialspace=True)
        _check_columns(path, reader.fieldnames)
        parsed = [_parse_row(path, reader.line_num, row) for row in reader]
    return [row for row in parsed if row is not None]


def _check_columns(path: Path, fieldnames: list[str] | None) -> None:
    if not fieldnames:
        raise UserError(f"{path} is empty: expected a header row with the columns {', '.join(REQUIRED_COLUMNS)}")
    present = {name.strip() for name in fieldnames if name}
    missing = [name for name in REQUIRED_COLUMNS if name not in present]
    if missing:
        raise UserError(f"{path} lacks the required column(s) {', '.join(missing)} "
                        f"(has: {', '.join(sorted(present))})")


def _parse_row(path: Path, line: int, row: dict[str | None, Any]) -> tuple | None:
    """(N, D, L, C, name, arch) of one row, or None for a failed run (no finite loss)."""
    # Cells past the header come under the key None as a list; short rows give None values.
    cells = {(key or "").strip(): value.strip() if isinstance(value, str) else "" for key, value in row.items()}
    loss = _number(path, line, "loss", cells["loss"]) if cells.get("loss") else math.nan
    if not math.isfinite(loss):
        return None
    if loss <= 0:
        raise UserError(f"{path}: row {line}: column 'loss' must be positive, got {cells['loss']!r}")
    params = _positive(path, line, "params", cells.get("params", ""))
    tokens = _positive(path, line, "tokens", cells.get("tokens", ""))
    flops = _positive(path, line, "flops", cells["flops"]) if cells.get("flops") else 6.0 * params * tokens
    return params, tokens, loss, flops, cells.get("name") or f"row {line}", cells.get("arch", "")


def _number(path: Path, line: int, column: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{path}: row {line}: column '{column}' is not a number: {text!r}") from None


def _positive(path: Path, line: int, column: str, text: str) -> float:
    if not text:
        raise UserError(f"{path}: row {line}: column '{column}' is empty")
    value = _number(path, line, column, text)
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{path}: row {line}: column '{column}' must be a positive number, got {text!r}")
    return value


def select_arch(points: Points, arch: str | None) -> Points:
    """The runs of one architecture. Without `arch` the table must hold a single one: a scaling
    law across architectures mixes different laws."""
    present = sorted(set(points.archs))
    if arch is None:
        if len(present) > 1:
            raise UserError(f"the results hold several archs ({', '.join(repr(a) for a in present)}); "
                            "choose one with --arch")
        return points
    if arch not in present:
        raise UserError(f"no runs of arch {arch!r} in the results (archs: {', '.join(repr(a) for a in present)})")
    chosen = points.subset(np.flatnonzero(np.array(points.archs) == arch))
    if len(chosen) < MIN_POINTS:
        raise UserError(f"arch {arch!r} has {len(chosen)} finished runs; fitting needs at least {MIN_POINTS}")
    return chosen


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


@_one_blas_thread
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
        return {key: _finite(float(np.std(values, ddof=1))) for key, values in derived.items()}


# --------------------------------------------------------------------------------------------
# Approach 2: IsoFLOP profiles
# --------------------------------------------------------------------------------------------

def group_by_budget(C: np.ndarray) -> list[np.ndarray]:
    """Indices of the points of each compute budget, smallest budget first: sorted by C, a point
    joins the current group while its C is within BUDGET_TOLERANCE of the group's smallest."""
    order = np.argsort(C, kind="stable")
    groups: list[list[int]] = []
    for index in order:
        if groups and C[index] <= C[groups[-1][0]] * (1.0 + BUDGET_TOLERANCE):
            groups[-1].append(int(index))
        else:
            groups.append([int(index)])
    return [np.array(group) for group in groups]


@dataclass(frozen=True)
class _Vertex:
    """A parabola L = c2 x^2 + c1 x + c0 in x = ln(size), its minimum, or why it has none."""

    coefficients: tuple[float, float, float]
    x_opt: float | None
    loss_opt: float | None
    problem: str | None


def _parabola_vertex(x: np.ndarray, loss: np.ndarray) -> _Vertex:
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
    return slope, offset, _finite(math.sqrt(float(residual @ residual) / (len(log_c) - 2) / spread))


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


@_one_blas_thread
def fit_approach2(points: Points, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> dict:
    """IsoFLOP profiles: per budget (>= 3 distinct sizes) the vertices of parabolas of loss in
    ln N and in ln D, then N_opt ~ C^a and D_opt ~ C^b by least squares over the budgets.

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
            "N_opt": _exp_or_none(by_n.x_opt), "D_opt": _exp_or_none(by_d.x_opt),
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
            result[f"{key}_se"] = _finite(float(np.std(slopes[key], ddof=1)))
            source = f"bootstrap within budgets ({len(slopes[key])} of {resamples} resamples gave a slope)"
        else:
            why = "no bootstrap" if not resamples else "the bootstrap within budgets degenerated"
            source = (f"least-squares standard error of the slope ({why})" if result[f"{key}_se"] is not None
                      else f"none: {why} and two budgets leave no residual")
        result["notes"].append(f"approach 2: {key}_se from {source}")


# --------------------------------------------------------------------------------------------
# Kaplan et al. 2020: power laws on the lower envelope
# --------------------------------------------------------------------------------------------

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
    return alpha, _exp_or_none(float(offset) / alpha)


@_one_blas_thread
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
        on_frontier = frontier(values, points.L)
        fitted = _power_law(values[on_frontier], points.L[on_frontier])
        if fitted is None:
            notes.append(f"Kaplan L({variable}) unavailable: {len(on_frontier)} frontier point(s) give no falling law")
        alpha, scale = fitted if fitted is not None else (None, None)
        result[f"alpha_{variable}"] = alpha
        result[f"{variable}_c"] = scale
        result[f"frontier_{variable}"] = [points.names[i] for i in on_frontier]
    return result, notes


# --------------------------------------------------------------------------------------------
# All fits together, JSON-ready
# --------------------------------------------------------------------------------------------

def fit_all(points: Points, budget: float | None = None, arch: str | None = None,
            resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> dict[str, Any]:
    """Every fit of the runs (of `arch`, needed when the table holds several) as a JSON-ready dict.

    Keys: approach 3's E, A, B, alpha, beta and the exponents it implies, a3 = beta/(alpha+beta)
    and b3 = alpha/(alpha+beta); approach 2's a and b (N_opt ~ C^a, D_opt ~ C^b) with their
    offsets (ln N_opt = a ln C + a_offset); each with `_se`. `a` and `b` always come from approach 2 and
    are None when it cannot run (the notes say why); a3 and b3 are always there, so the two
    estimates are never confused. Also `kaplan`, `points`, `budgets` (per IsoFLOP budget), `notes`,
    and with `budget`: approach 3's N_opt, D_opt, tokens_per_param and loss_opt at that C.
    Unavailable or non-finite numbers are None."""
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise UserError(f"the compute budget must be a positive number of FLOPs, got {budget}")
    if resamples < 0:
        raise UserError(f"the number of bootstrap resamples must be >= 0, got {resamples}")
    points = select_arch(points, arch)
    if len(points) < MIN_POINTS:
        raise UserError(f"{len(points)} finished runs; fitting needs at least {MIN_POINTS}")
    third = fit_approach3(points, resamples, seed)
    second = fit_approach2(points, resamples, seed)
    kaplan, kaplan_notes = fit_kaplan(points)
    result: dict[str, Any] = {"points": len(points), "arch": points.archs[0] or None,
                              "huber_delta": HUBER_DELTA, "resamples": third.resamples}
    result.update(_approach3_entries(third))
    result.update({key: second[key] for key in ("a", "a_se", "a_offset", "b", "b_se", "b_offset")})
    result.update({"kaplan": kaplan, "budgets": second["budgets"],
                   "notes": ["compute-optimal N_opt and D_opt (approach 3) take C = 6 N D",
                             *second["notes"], *kaplan_notes]})
    if budget is not None:
        result.update(_optimum_at(third.law, budget))
    if not third.law.has_optimum:
        result["notes"].append("approach 3: alpha or beta <= 0, so the law has no compute-optimal allocation")
    return _json_ready(result)


def _approach3_entries(third: Approach3) -> dict[str, Any]:
    law = third.law
    entries: dict[str, Any] = {"E": law.E, "A": law.A, "B": law.B, "alpha": law.alpha, "beta": law.beta,
                               "a3": law.a, "b3": law.b}
    for key in list(entries):
        entries[f"{key}_se"] = third.se[key]
    entries["residual_rms"] = float(np.sqrt(np.mean(third.residuals ** 2)))
    return entries


def _optimum_at(law: ParametricLaw, budget: float) -> dict[str, float]:
    n_opt, d_opt = law.compute_optimal(budget)
    return {"budget": float(budget), "N_opt": float(n_opt), "D_opt": float(d_opt),
            "tokens_per_param": float(d_opt / n_opt), "loss_opt": float(law.loss(n_opt, d_opt))}


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _exp_or_none(log_value: float | None) -> float | None:
    """e^log_value; None when unavailable or beyond the float range (e^710 overflows)."""
    if log_value is None or not log_value < 700:
        return None
    return math.exp(log_value)


def _json_ready(value: Any) -> Any:
    """Plain Python numbers, lists and dicts; NaN and infinities become None (JSON has neither)."""
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _finite(float(value))
    return value


# --------------------------------------------------------------------------------------------
# Terminal output
# --------------------------------------------------------------------------------------------

def format_number(value: float | None, digits: int = 4) -> str:
    """`digits` significant digits, but whole numbers below a million in full (240, not 2.4e+02);
    "n/a" for an unavailable value."""
    if value is None:
        return "n/a"
    if 1 <= abs(value) < 1e6:
        digits = max(digits, int(math.log10(abs(value))) + 1)
    return f"{value:.{digits}g}"


def _with_se(result: dict, key: str, digits: int = 4) -> str:
    value, se = format_number(result.get(key), digits), result.get(f"{key}_se")
    return f"{value} ± {format_number(se, 2)}" if se is not None else value


def format_fit(result: dict) -> str:
    """A readable summary of fit_all's result, with published values beside the fitted ones."""
    arch = f" (arch {result['arch']})" if result.get("arch") else ""
    lines = [f"scaling-law fit of {result['points']} runs{arch}",
             "", f"approach 3: L = E + A/N^alpha + B/D^beta (Huber delta {result['huber_delta']:g}, "
             f"SE by {result['resamples']} bootstrap resamples)",
             f"  {'':<6} {'fit ± SE':<24} {'Hoffmann':>9} {'Besiroglu':>10}"]
    for key in ("E", "A", "B", "alpha", "beta"):
        lines.append(f"  {key:<6} {_with_se(result, key):<24} {HOFFMANN[key]:>9g} {BESIROGLU[key]:>10g}")
    lines.append(f"  N_opt ~ C^a3 with a3 = {_with_se(result, 'a3', 3)}, "
                 f"D_opt ~ C^b3 with b3 = {_with_se(result, 'b3', 3)}")
    lines += ["", "approach 2: IsoFLOP parabolas",
              f"  a = {_with_se(result, 'a', 3):<20} (Chinchilla 0.50, Kaplan {KAPLAN['a']})",
              f"  b = {_with_se(result, 'b', 3):<20} (Chinchilla 0.50)"]
    lines += _budget_lines(result["budgets"])
    lines += _kaplan_lines(result["kaplan"])
    if "budget" in result:
        lines += ["", f"compute-optimal at C = {result['budget']:.3g} FLOPs (approach 3, C = 6 N D):",
                  f"  N_opt {format_number(result['N_opt'])}  D_opt {format_number(result['D_opt'])}  "
                  f"tokens/param {format_number(result['tokens_per_param'], 3)}  "
                  f"loss {format_number(result['loss_opt'])}"]
    if result["notes"]:
        lines += ["", "notes:", *(f"  - {note}" for note in result["notes"])]
    return "\n".join(lines)


def _budget_lines(budgets: list[dict]) -> list[str]:
    if not budgets:
        return ["  (no budget with 3 or more sizes)"]
    lines = [f"  {'C':>10} {'runs':>5} {'N_opt':>10} {'D_opt':>10} {'min loss':>9}"]
    for entry in budgets:
        lines.append(f"  {entry['C']:>10.3g} {entry['runs']:>5} {format_number(entry['N_opt'], 3):>10} "
                     f"{format_number(entry['D_opt'], 3):>10} {entry['loss_min']:>9.4f}")
    return lines


def _kaplan_lines(kaplan: dict) -> list[str]:
    lines = ["", "Kaplan power laws on the lower envelope (published exponent beside)"]
    for variable in ("N", "D", "C"):
        alpha, scale = kaplan[f"alpha_{variable}"], kaplan[f"{variable}_c"]
        lines.append(f"  L({variable}) = ({variable}_c/{variable})^alpha_{variable}: "
                     f"alpha_{variable} {format_number(alpha, 3)} (Kaplan {KAPLAN[f'alpha_{variable}']}), "
                     f"{variable}_c {format_number(scale, 3)}, {len(kaplan[f'frontier_{variable}'])} frontier points")
    return lines
