"""Figures of a scaling-law fit: IsoFLOP profiles, the compute frontier, optimal N and D against
compute, and approach 3's residuals. A part of the fit that is unavailable is left out of its
figure; a figure is always written."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from llm_jax.scaling.approach3 import ParametricLaw
from llm_jax.scaling.isoflop import near_minimum
from llm_jax.scaling.kaplan import compute_frontier
from llm_jax.scaling.results import BUDGET_TOLERANCE, Points, group_by_budget

FIGURE_SIZE = (6.4, 4.8)
DPI = 100
# Past this many budgets a legend would cover the plot: the colours alone tell budgets apart.
MAX_LEGEND_BUDGETS = 10


def _pyplot() -> Any:
    # Imported where used, not at the top: matplotlib is slow to import and only plotting needs it.
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def write_plots(points: Points, result: dict, out_dir: str | Path) -> list[Path]:
    """Write isoflop.png, compute_frontier.png, optimal_scaling.png and residuals.png for the
    points that fit_all fitted (the same arch) and its result; return their paths."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in FIGURES.items():
        fig, ax = plt.subplots(figsize=FIGURE_SIZE)
        try:
            draw(ax, points, result)
            fig.tight_layout()
            fig.savefig(out_dir / name, dpi=DPI)
        finally:
            plt.close(fig)
        written.append(out_dir / name)
    return written


def _budget_colours(count: int) -> list[Any]:
    import matplotlib  # already imported by _pyplot; here only for its colormap registry

    colormap = matplotlib.colormaps["viridis"]
    return [colormap(i / max(1, count - 1) * 0.9) for i in range(count)]


def _log_y_plain_labels(ax: Any) -> None:
    """A log y axis labelled 2.5, 3, 4 rather than 4 x 10^0: losses span less than a decade."""
    from matplotlib.ticker import FormatStrFormatter  # matplotlib is loaded by now (_pyplot)

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))


def _compute_range(points: Points) -> np.ndarray:
    """Budgets to draw the fitted lines at: the runs' range, widened when they share one budget
    (a zero-width log axis only draws a warning)."""
    low, high = float(points.C.min()), float(points.C.max())
    if high < low * 1.5:
        low, high = low / 2.0, high * 2.0
    return np.geomspace(low, high, 100)


def _budget_label(budget: float, budget_count: int) -> str | None:
    return f"C = {budget:.2g}" if budget_count <= MAX_LEGEND_BUDGETS else None


def _entry_for(group_budget: float, budgets: list[dict]) -> dict | None:
    """The budget entry of fit_all's result for a group of points (the same geometric mean C)."""
    for entry in budgets:
        if abs(entry["C"] - group_budget) <= 1e-9 * group_budget:
            return entry
    return None


def _draw_isoflop(ax: Any, points: Points, result: dict) -> None:
    """Loss against N per budget, with each budget's parabola in ln N (over the sizes it was fitted
    to) and its minimum."""
    groups = group_by_budget(points.C)
    for group, colour in zip(groups, _budget_colours(len(groups))):
        budget = float(np.exp(np.log(points.C[group]).mean()))
        ax.scatter(points.N[group], points.L[group], color=colour, s=18, label=_budget_label(budget, len(groups)))
        entry = _entry_for(budget, result["budgets"])
        if entry is None:
            continue
        fitted, _ = near_minimum(np.log(points.N[group]), points.L[group])  # the sizes the parabola saw
        x = np.linspace(fitted.min(), fitted.max(), 100)
        ax.plot(np.exp(x), np.polyval(entry["parabola_N"], x), color=colour, linewidth=1)
        if entry["N_opt"] is not None and entry["loss_fit"] is not None:
            ax.scatter([entry["N_opt"]], [entry["loss_fit"]], color=colour, marker="*", s=120, edgecolor="black")
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("loss")
    ax.set_title(f"IsoFLOP profiles (C within {BUDGET_TOLERANCE:.0%} grouped); * = minimum")
    _legend(ax)


def _draw_compute_frontier(ax: Any, points: Points, result: dict) -> None:
    """Loss against C, the lower envelope with Kaplan's L(C), and approach 3's best loss at each C."""
    ax.scatter(points.C, points.L, color="0.6", s=14, label="runs")
    on_frontier = compute_frontier(points)
    ax.scatter(points.C[on_frontier], points.L[on_frontier], color="black", s=22, label="frontier")
    C = _compute_range(points)
    kaplan = result["kaplan"]
    if kaplan.get("alpha_C") is not None and kaplan.get("C_c") is not None:
        ax.plot(C, (kaplan["C_c"] / C) ** kaplan["alpha_C"], color="tab:red",
                label=f"Kaplan L(C), alpha_C = {kaplan['alpha_C']:.3f}")
    law = ParametricLaw.from_result(result)
    if law is not None and law.has_optimum:
        ax.plot(C, law.loss(*law.compute_optimal(C)), color="tab:blue", linestyle="--",
                label="approach 3: loss at N_opt(C), D_opt(C)")
    ax.set_xscale("log")
    _log_y_plain_labels(ax)
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel("loss")
    ax.set_title("compute frontier")
    _legend(ax)


def _draw_optimal_scaling(ax: Any, points: Points, result: dict) -> None:
    """Each budget's N_opt and D_opt against C, approach 2's fitted lines and approach 3's."""
    C = _compute_range(points)
    law = ParametricLaw.from_result(result)
    for size, key, colour in (("N_opt", "a", "tab:blue"), ("D_opt", "b", "tab:orange")):
        found = [(e["C"], e[size]) for e in result["budgets"] if e[size] is not None]
        if found:
            ax.scatter(*zip(*found), color=colour, s=24, label=f"{size} per budget")
        if result.get(key) is not None and result.get(f"{key}_offset") is not None:
            ax.plot(C, np.exp(result[f"{key}_offset"]) * C ** result[key], color=colour,
                    label=f"approach 2: {size} ~ C^{result[key]:.3f}")
        if law is not None and law.has_optimum:
            ax.plot(C, law.compute_optimal(C)[0 if size == "N_opt" else 1], color=colour, linestyle="--",
                    label=f"approach 3: {size} ~ C^{law.a if size == 'N_opt' else law.b:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel("parameters / tokens")
    ax.set_title("compute-optimal N and D")
    _legend(ax)


def _draw_residuals(ax: Any, points: Points, result: dict) -> None:
    """Approach 3's residuals log L - log L_hat against N, coloured by budget."""
    law = ParametricLaw.from_result(result)
    if law is None:
        ax.text(0.5, 0.5, "approach 3 unavailable", ha="center", va="center", transform=ax.transAxes)
        return
    residuals = np.log(points.L) - np.log(law.loss(points.N, points.D))
    groups = group_by_budget(points.C)
    for group, colour in zip(groups, _budget_colours(len(groups))):
        budget = float(np.exp(np.log(points.C[group]).mean()))
        ax.scatter(points.N[group], residuals[group], color=colour, s=18, label=_budget_label(budget, len(groups)))
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("log L - log L_hat")
    ax.set_title("approach 3 residuals")
    _legend(ax)


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:  # an empty legend only warns
        ax.legend(fontsize=7)


FIGURES: dict[str, Callable[[Any, Points, dict], None]] = {
    "isoflop.png": _draw_isoflop,
    "compute_frontier.png": _draw_compute_frontier,
    "optimal_scaling.png": _draw_optimal_scaling,
    "residuals.png": _draw_residuals,
}


def write_comparison_plot(by_arch: dict[str, Points], out_dir: str | Path) -> Path:
    """compare_archs.png: each arch's runs and its compute frontier, loss against training FLOPs
    (the comparison of Kaplan et al.'s figure 7, LSTMs against Transformers, on a compute axis)."""
    plt = _pyplot()
    path = Path(out_dir) / "compare_archs.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    try:
        for colour, (arch, points) in zip(_budget_colours(len(by_arch)), sorted(by_arch.items())):
            ax.scatter(points.C, points.L, s=14, color=colour, alpha=0.5)
            best = compute_frontier(points)
            ax.plot(points.C[best], points.L[best], "-o", color=colour, label=f"{arch} frontier")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _log_y_plain_labels(ax)
        ax.set_xlabel("training FLOPs C")
        ax.set_ylabel("held-out loss (nats per token)")
        ax.set_title("Loss against compute, per arch")
        _legend(ax)
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path
