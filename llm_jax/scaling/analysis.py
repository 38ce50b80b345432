"""A sweep's fits, figures and report, written beside its results: one fit per arch (the laws
of two families are not one law), and with several archs a top report that compares them."""

from __future__ import annotations

from pathlib import Path

from llm_jax.errors import UserError
from llm_jax.scaling.fit import fit_all, format_fit
from llm_jax.scaling.plots import write_comparison_plot, write_plots
from llm_jax.scaling.report import write_report
from llm_jax.scaling.results import MIN_POINTS, RESULTS_FILE, Points, read_results, select_arch

# Columns of the comparison table in a several-arch report: (JSON key, heading).
COMPARED = (("points", "runs"), ("a", "a (N_opt ~ C^a)"), ("b", "b (D_opt ~ C^b)"), ("alpha", "alpha"),
            ("beta", "beta"), ("E", "E"))


def analyse(sweep_dir: Path, title: str) -> list[str]:
    """Fit `sweep_dir/results.csv` and write report.md and the figures; returns lines to print.
    Too few finished runs is a note, not an error: the sweep itself has done its work."""
    try:
        points = read_results(sweep_dir / RESULTS_FILE)
    except UserError as exc:
        return [f"no fit yet: {exc}"]
    archs = sorted(set(points.archs))
    if len(archs) == 1:
        return _one_arch(points, sweep_dir, f"Sweep {title}")
    lines, results = [], {}
    for arch in archs:
        try:
            chosen = select_arch(points, arch)
        except UserError as exc:
            lines.append(f"{arch}: no fit: {exc}")
            continue
        lines += [f"--- {arch} ---", *_one_arch(chosen, sweep_dir / arch, f"Sweep {title}: {arch}")]
        results[arch] = (chosen, fit_all(chosen))
    report = write_comparison(results, sweep_dir, f"Sweep {title}")
    return [*lines, f"wrote {report}"]


def _one_arch(points: Points, out_dir: Path, title: str) -> list[str]:
    result = fit_all(points)
    plots = write_plots(points, result, out_dir)
    report = write_report(result, out_dir, plots, title,
                          extra_lines=["Written by `llm-jax sweep` from `results.csv`; refit with `llm-jax fit`."])
    return [format_fit(result), f"wrote {report} and {len(plots)} figures"]


def write_comparison(results: dict[str, tuple[Points, dict]], out_dir: Path, title: str) -> Path:
    """report.md comparing archs: their fitted exponents side by side, the loss-compute figure,
    and links to each arch's own report."""
    figure = write_comparison_plot({arch: pts for arch, (pts, _) in results.items()}, out_dir)
    lines = [f"# {title}", "", "One fit per arch; each arch's report has the details.", "",
             "| arch | " + " | ".join(head for _, head in COMPARED) + " |",
             "| --- |" + " --- |" * len(COMPARED)]
    for arch, (_, result) in sorted(results.items()):
        lines.append(f"| [{arch}]({arch}/report.md) | " + " | ".join(_cell(result, key) for key, _ in COMPARED) + " |")
    lines += ["", "Chinchilla (Hoffmann et al. 2022): a = b = 0.50; Kaplan et al. 2020: a = 0.73.",
              f"Fewer than {MIN_POINTS} finished runs of an arch leave it out.", "",
              f"![loss against compute per arch]({figure.name})", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _cell(result: dict, key: str) -> str:
    value, se = result.get(key), result.get(f"{key}_se")
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3g}" + (f" ± {se:.2g}" if se is not None else "")
