"""Fit scaling laws to the results of a training sweep: every fit of one table together, as a
JSON-ready dict and as a summary for the terminal.

Three views of one results table (read by llm_jax.scaling.results):

- Chinchilla approach 3 (llm_jax.scaling.approach3): the parametric law
  L(N, D) = E + A / N^alpha + B / D^beta.
- Chinchilla approach 2 (llm_jax.scaling.isoflop): IsoFLOP profiles, N_opt ~ C^a and D_opt ~ C^b.
- Kaplan et al. 2020 (llm_jax.scaling.kaplan): pure power laws in N, D and C.

Notation: N parameters, D training tokens, L loss (nats per token), C training FLOPs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from llm_jax.errors import UserError
from llm_jax.scaling.approach3 import HUBER_DELTA, Approach3, ParametricLaw, fit_approach3
from llm_jax.scaling.isoflop import fit_approach2
from llm_jax.scaling.kaplan import fit_kaplan
from llm_jax.scaling.numerics import DEFAULT_RESAMPLES, DEFAULT_SEED, finite_or_none
from llm_jax.scaling.results import MIN_POINTS, Points, select_arch

# Published values, printed beside the fit for comparison.
HOFFMANN = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28, "a": 0.50, "b": 0.50}
BESIROGLU = {"E": 1.82, "A": 482.0, "B": 2085.0, "alpha": 0.348, "beta": 0.366}
KAPLAN = {"alpha_N": 0.076, "alpha_D": 0.095, "alpha_C": 0.050, "a": 0.73}
# What N counts, in words, for each key of PARAM_COUNTS: the summary and the report say it, since
# the published values beside the fit count differently (Hoffmann all, Kaplan non-embedding).
PARAMS_COUNTED = {"total": "all parameters (as Hoffmann et al.)",
                  "nonembed": "non-embedding parameters (as Kaplan et al.)"}


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
    estimates are never confused. Also `kaplan`, `points`, `params_counted` (the points'
    parameter count, "total" or "nonembed"), `budgets` (per IsoFLOP budget), `notes`,
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
                              "params_counted": points.params_counted, "huber_delta": HUBER_DELTA,
                              "resamples": third.resamples}
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
        return finite_or_none(float(value))
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
    lines = [f"scaling-law fit of {result['points']} runs{arch}; N counts {PARAMS_COUNTED[result['params_counted']]}",
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
