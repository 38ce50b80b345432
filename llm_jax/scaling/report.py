"""A Markdown report of a scaling-law fit: the fitted numbers with standard errors beside the
published ones, the per-budget optima, the notes and the figures."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from llm_jax.scaling.fit import BESIROGLU, HOFFMANN, KAPLAN, PARAMS_COUNTED, format_number

# Exponents of the compute-optimal allocation that the published approach-3 fits imply.
HOFFMANN_A3 = HOFFMANN["beta"] / (HOFFMANN["alpha"] + HOFFMANN["beta"])
BESIROGLU_A3 = BESIROGLU["beta"] / (BESIROGLU["alpha"] + BESIROGLU["beta"])


def write_report(result: dict, out_dir: str | Path, plots: Sequence[Path], title: str,
                 extra_lines: Sequence[str] = ()) -> Path:
    """Write out_dir/report.md for fit_all's result; `plots` are linked relative to out_dir and
    `extra_lines` (Markdown) go under the title."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = [[f"# {title}", "", *extra_lines, "" if extra_lines else None, _summary(result)],
                _approach3(result), _approach2(result), _budgets(result["budgets"]), _kaplan(result["kaplan"]),
                _optimum(result), _notes(result["notes"]), _figures(plots, out_dir)]
    lines = [line for section in sections for line in section if line is not None]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    return path


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _header(*names: str) -> list[str]:
    return [_row(*names), _row(*("---" for _ in names))]


def _summary(result: dict) -> str:
    arch = f" of arch `{result['arch']}`" if result.get("arch") else ""
    return (f"{result['points']} finished runs{arch}; N counts {PARAMS_COUNTED[result['params_counted']]}. "
            f"Standard errors (SE) of approach 3 are the spread of {result['resamples']} bootstrap refits.")


def _approach3(result: dict) -> list[str]:
    lines = ["", "## Approach 3: L(N, D) = E + A / N^alpha + B / D^beta", "",
             f"Fitted in log space with a Huber loss (delta {result['huber_delta']:g}) summed over the runs, "
             "L-BFGS-B from a grid of starts.", "",
             *_header("parameter", "fit", "SE", "Hoffmann et al. 2022", "Besiroglu et al. 2024")]
    for key in ("E", "A", "B", "alpha", "beta"):
        lines.append(_row(key, format_number(result[key]), format_number(result[f"{key}_se"], 2),
                          f"{HOFFMANN[key]:g}", f"{BESIROGLU[key]:g}"))
    for key, formula, hoffmann, besiroglu in (("a3", "beta / (alpha + beta)", HOFFMANN_A3, BESIROGLU_A3),
                                              ("b3", "alpha / (alpha + beta)", 1 - HOFFMANN_A3, 1 - BESIROGLU_A3)):
        lines.append(_row(f"{key} = {formula}", format_number(result[key], 3), format_number(result[f"{key}_se"], 2),
                          f"{hoffmann:.3f}", f"{besiroglu:.3f}"))
    return lines


def _approach2(result: dict) -> list[str]:
    lines = ["", "## Approach 2: IsoFLOP profiles, N_opt ~ C^a and D_opt ~ C^b", "",
             *_header("exponent", "fit", "SE", "Chinchilla (Hoffmann et al. 2022)", "Kaplan et al. 2020")]
    # Kaplan's D_opt ~ C^0.27 is batch size ~ C^0.24 times steps ~ C^0.03.
    for key, kaplan in (("a", KAPLAN["a"]), ("b", 1 - KAPLAN["a"])):
        lines.append(_row(key, format_number(result[key], 3), format_number(result[f"{key}_se"], 2),
                          f"{HOFFMANN[key]:.2f}", f"{kaplan:.2f}"))
    return lines


def _budgets(budgets: list[dict]) -> list[str]:
    lines = ["", "### Optimum of each budget", ""]
    if not budgets:
        return [*lines, "No budget has runs of three or more sizes."]
    lines += _header("C (FLOPs)", "runs", "sizes", "N_opt", "D_opt", "parabola minimum", "lowest loss")
    for entry in budgets:
        lines.append(_row(f"{entry['C']:.3g}", entry["runs"], entry["sizes"], format_number(entry["N_opt"], 3),
                          format_number(entry["D_opt"], 3), format_number(entry["loss_fit"]),
                          f"{entry['loss_min']:.4f}"))
    return lines


def _kaplan(kaplan: dict) -> list[str]:
    lines = ["", "## Kaplan et al. 2020: power laws on the lower envelope", "",
             "Fitted on the runs that no run with a smaller (or equal) N, D or C beats: an approximation "
             "of Kaplan's converged-model, early-stopped and learning-curve envelopes.", "",
             *_header("law", "exponent", "scale", "Kaplan et al. 2020", "frontier runs")]
    for v in ("N", "D", "C"):
        lines.append(_row(f"L({v}) = ({v}_c / {v})^alpha_{v}", format_number(kaplan[f"alpha_{v}"], 3),
                          format_number(kaplan[f"{v}_c"], 3), f"{KAPLAN[f'alpha_{v}']:.3f}",
                          len(kaplan[f"frontier_{v}"])))
    return lines


def _optimum(result: dict) -> list[str]:
    if "budget" not in result:
        return []
    return ["", f"## Compute-optimal model at C = {result['budget']:.3g} FLOPs", "",
            "From approach 3 with C = 6 N D.", "",
            *_header("N_opt", "D_opt", "tokens per parameter", "loss"),
            _row(format_number(result["N_opt"]), format_number(result["D_opt"]),
                 format_number(result["tokens_per_param"], 3), format_number(result["loss_opt"]))]


def _notes(notes: list[str]) -> list[str]:
    return ["", "## Notes", "", *(f"- {note}" for note in notes)] if notes else []


def _figures(plots: Sequence[Path], out_dir: Path) -> list[str]:
    if not plots:
        return []
    lines = ["", "## Figures", ""]
    for plot in plots:
        link = Path(os.path.relpath(Path(plot).resolve(), out_dir.resolve())).as_posix()
        lines += [f"![{Path(plot).stem}]({link})", ""]
    return lines
