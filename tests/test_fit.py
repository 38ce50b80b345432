"""Scaling-law fits (llm_jax/scaling): approach 3 recovers known laws within its bootstrap
errors (exactly without noise), approach 2's exponents equal beta/(alpha+beta) and
alpha/(alpha+beta) on IsoFLOP grids, the compute-optimal allocation spends exactly C, Kaplan's
power laws come back from pure power-law data, fits are bit-for-bit deterministic, bad tables are
user errors, and the figures, the report and `llm-jax fit` are written."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from llm_jax.cli import main
from llm_jax.errors import UserError
from llm_jax.scaling.approach3 import ParametricLaw, fit_approach3
from llm_jax.scaling.fit import fit_all, format_fit
from llm_jax.scaling.isoflop import fit_approach2
from llm_jax.scaling.kaplan import fit_kaplan
from llm_jax.scaling.plots import write_plots
from llm_jax.scaling.report import write_report
from llm_jax.scaling.results import Points, group_by_budget, read_results, select_arch

HOFFMANN_LAW = ParametricLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
BESIROGLU_LAW = ParametricLaw(E=1.82, A=482.0, B=2085.0, alpha=0.348, beta=0.366)
LAWS = pytest.mark.parametrize("law", [HOFFMANN_LAW, BESIROGLU_LAW], ids=["hoffmann", "besiroglu"])
BUDGETS = (1e17, 1e18, 1e19, 1e20, 1e21)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COLUMNS = ["name", "arch", "params", "params_nonembed", "tokens", "flops", "loss", "bpb", "run_dir"]


def _points(N, D, L, C=None, arch: str = "gpt") -> Points:
    N, D, L = (np.asarray(v, dtype=float) for v in (N, D, L))
    C = 6.0 * N * D if C is None else np.asarray(C, dtype=float)
    return Points(N, D, L, C, tuple(f"run{i}" for i in range(len(N))), (arch,) * len(N))


def _realistic_grid(law: ParametricLaw, sigma: float, seed: int = 0) -> Points:
    """16 sizes log-spaced over 1e7..1e10 at five budgets, keeping the runs with 2 to 2000 tokens
    per parameter (35 runs), losses times exp(N(0, sigma^2)) noise."""
    N, D = [], []
    for budget in BUDGETS:
        for size in np.geomspace(1e7, 1e10, 16):
            tokens = budget / (6.0 * size)
            if 2.0 <= tokens / size <= 2000.0:
                N.append(size)
                D.append(tokens)
    N, D = np.array(N), np.array(D)
    noise = np.exp(np.random.default_rng(seed).normal(0.0, sigma, len(N))) if sigma else 1.0
    return _points(N, D, law.loss(N, D) * noise)


def _isoflop_grid(law: ParametricLaw, sizes: int = 15, decades: float = 1.0) -> Points:
    """Noise-free runs: at each budget, sizes log-uniform within 10**decades of the law's optimum."""
    N = np.concatenate([law.compute_optimal(c)[0] * np.logspace(-decades, decades, sizes) for c in BUDGETS])
    C = np.repeat(BUDGETS, sizes)
    D = C / (6.0 * N)
    return _points(N, D, law.loss(N, D), C)


def _write_csv(path: Path, rows: list[dict], columns: list[str] = COLUMNS) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _rows(points: Points) -> list[dict]:
    return [{"name": name, "arch": arch, "params": f"{n:.17g}", "tokens": f"{d:.17g}", "loss": f"{loss:.17g}",
             "flops": "", "bpb": "", "run_dir": f"runs/{name}"}
            for name, arch, n, d, loss in zip(points.names, points.archs, points.N, points.D, points.L)]


# --- approach 3 ------------------------------------------------------------------------------

@LAWS
def test_approach3_recovers_the_law_within_three_bootstrap_errors(law):
    """With 1% log-normal noise each parameter lies within 3 bootstrap SEs of the truth: E, alpha
    and beta directly; A and B (poorly identified, skewed) in log, with SE(ln A) = SE(A) / A."""
    fit = fit_approach3(_realistic_grid(law, sigma=0.01))
    for key in ("E", "A", "B", "alpha", "beta"):
        se = fit.se[key]
        assert se is not None and 0 < se < math.inf, key
    for key in ("E", "alpha", "beta"):
        assert abs(getattr(fit.law, key) - getattr(law, key)) <= 3 * fit.se[key], (key, fit.law, fit.se)
    for key in ("A", "B"):
        fitted = getattr(fit.law, key)
        assert abs(math.log(fitted / getattr(law, key))) <= 3 * fit.se[key] / fitted, (key, fit.law, fit.se)


@LAWS
def test_approach3_is_exact_without_noise(law):
    fit = fit_approach3(_realistic_grid(law, sigma=0.0), resamples=0)
    for key in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit.law, key) == pytest.approx(getattr(law, key), rel=1e-3), key
    assert np.max(np.abs(fit.residuals)) < 1e-6


def test_fit_is_deterministic():
    points = _realistic_grid(HOFFMANN_LAW, sigma=0.01, seed=3)
    first, second = fit_all(points, budget=1e21, resamples=20), fit_all(points, budget=1e21, resamples=20)
    assert first == second
    assert json.dumps(first) == json.dumps(second)


# --- compute-optimal allocation --------------------------------------------------------------

@LAWS
def test_compute_optimal_spends_the_budget_at_the_law_minimum(law):
    assert law.a + law.b == pytest.approx(1.0, rel=1e-15)
    for budget in (1e18, 3.7e21, 1e24):
        n_opt, d_opt = law.compute_optimal(budget)
        assert 6.0 * n_opt * d_opt == pytest.approx(budget, rel=1e-12)
        best = law.loss(n_opt, d_opt)
        for factor in (0.9, 1.1):  # another split of the same budget loses more
            assert law.loss(n_opt * factor, budget / (6.0 * n_opt * factor)) > best


def test_fit_all_reports_the_optimum_of_its_own_law():
    result = fit_all(_realistic_grid(HOFFMANN_LAW, sigma=0.01), budget=1e22, resamples=5)
    law = ParametricLaw.from_result(result)
    assert 6.0 * result["N_opt"] * result["D_opt"] == pytest.approx(1e22, rel=1e-12)
    assert result["tokens_per_param"] == pytest.approx(result["D_opt"] / result["N_opt"], rel=1e-12)
    assert result["loss_opt"] == pytest.approx(law.loss(result["N_opt"], result["D_opt"]), rel=1e-12)
    assert result["a3"] + result["b3"] == pytest.approx(1.0, rel=1e-12)
    for key in ("E", "A", "B", "alpha", "beta", "a", "b", "a3", "b3"):
        assert key in result and f"{key}_se" in result, key
    json.dumps(result, allow_nan=False)  # None, never NaN
    text = format_fit(result)
    assert "0.34" in text and "0.73" in text and f"{result['alpha']:.4g}" in text
    assert result["params_counted"] == "total" and "N counts all parameters" in text


# --- approach 2 ------------------------------------------------------------------------------

@LAWS
def test_approach2_exponents_on_a_noise_free_isoflop_grid(law):
    result = fit_approach2(_isoflop_grid(law), resamples=20)
    assert result["a"] == pytest.approx(law.a, abs=0.01)
    assert result["b"] == pytest.approx(law.b, abs=0.01)
    assert len(result["budgets"]) == len(BUDGETS)
    for entry in result["budgets"]:
        n_true, d_true = law.compute_optimal(entry["C"])
        assert entry["N_opt"] == pytest.approx(n_true, rel=0.2)  # a parabola, not the law: near, not equal
        assert entry["D_opt"] == pytest.approx(d_true, rel=0.2)
    assert result["a_se"] is not None and result["a_se"] < 0.01


def test_approach2_parabola_follows_the_minimum_on_a_skewed_grid(law=HOFFMANN_LAW):
    """Sizes from half to 1000 times the optimum: the profile climbs slowly on the large side, so a
    parabola through all nine sizes puts its vertex ~1.6x too high; through the best size and two
    neighbours each side it lands within 2%."""
    N = np.concatenate([law.compute_optimal(c)[0] * np.geomspace(0.5, 1000.0, 9) for c in BUDGETS])
    C = np.repeat(BUDGETS, 9)
    result = fit_approach2(_points(N, C / (6.0 * N), law.loss(N, C / (6.0 * N)), C), resamples=0)
    for entry in result["budgets"]:
        assert entry["N_opt"] == pytest.approx(law.compute_optimal(entry["C"])[0], rel=0.02)


def test_approach2_skips_budgets_without_a_minimum_and_says_why():
    """A budget sampled only on the small-model side has its minimum outside the sizes."""
    law = HOFFMANN_LAW
    points = _isoflop_grid(law, sizes=7)
    n_opt, _ = law.compute_optimal(1e23)
    N = n_opt * np.geomspace(0.001, 0.01, 5)  # all far below the optimum: loss still falling
    one_sided = _points(N, 1e23 / (6.0 * N), law.loss(N, 1e23 / (6.0 * N)))
    merged = _points(np.r_[points.N, one_sided.N], np.r_[points.D, one_sided.D], np.r_[points.L, one_sided.L])
    result = fit_approach2(merged, resamples=0)
    assert result["budgets"][-1]["N_opt"] is None
    assert any("outside the sampled sizes" in note for note in result["notes"])
    assert result["a"] == pytest.approx(law.a, abs=0.02)


def test_approach2_unavailable_without_isoflop_budgets():
    rng = np.random.default_rng(1)
    N, D = 10 ** rng.uniform(7, 10, 12), 10 ** rng.uniform(9, 11, 12)
    result = fit_all(_points(N, D, HOFFMANN_LAW.loss(N, D)), resamples=0)
    assert result["a"] is None and result["b"] is None and result["a3"] is not None
    assert any("a unavailable" in note for note in result["notes"])


# --- Kaplan ----------------------------------------------------------------------------------

@pytest.mark.parametrize("variable", ["N", "D", "C"])
def test_kaplan_recovers_a_pure_power_law(variable):
    rng = np.random.default_rng(2)
    N, D = 10 ** rng.uniform(7, 10, 20), 10 ** rng.uniform(9, 12, 20)
    C = 6.0 * N * D
    alpha, scale = {"N": (0.076, 8.8e13), "D": (0.095, 5.4e13), "C": (0.050, 3.1e8 * 8.64e19)}[variable]
    x = {"N": N, "D": D, "C": C}[variable]
    kaplan, notes = fit_kaplan(_points(N, D, (scale / x) ** alpha))
    assert kaplan[f"alpha_{variable}"] == pytest.approx(alpha, rel=1e-9)
    assert kaplan[f"{variable}_c"] == pytest.approx(scale, rel=1e-6)
    # A falling law: every run is on its frontier (on the C frontier, every budget's best run).
    assert len(kaplan[f"frontier_{variable}"]) == (len(group_by_budget(C)) if variable == "C" else 20)
    assert not any(note.startswith(f"Kaplan L({variable})") for note in notes)


def test_kaplan_frontier_leaves_out_beaten_runs():
    # run2 is bigger than run1 but worse: not on the N frontier.
    kaplan, _ = fit_kaplan(_points([1e7, 2e7, 4e7, 8e7], [1e9] * 4, [3.0, 2.8, 2.9, 2.5]))
    assert kaplan["frontier_N"] == ["run0", "run1", "run3"]


def test_kaplan_compute_frontier_keeps_one_run_per_budget():
    """Runs planned for one budget differ in C by a fraction of a percent; only each budget's best
    run may stand on the C frontier, however the others' C falls."""
    C = [1.003e12, 1.001e12, 0.998e12, 3.004e12, 2.997e12, 3.001e12]
    L = [2.0, 2.4, 2.9, 1.8, 2.2, 1.6]  # ascending C inside a budget with falling loss: 2.9, 2.4, 2.0
    N = np.full(6, 1e5)
    kaplan, _ = fit_kaplan(_points(N, np.asarray(C) / (6.0 * N), L, C))
    assert kaplan["frontier_C"] == ["run0", "run5"]


# --- reading the table -----------------------------------------------------------------------

def test_read_results_skips_failed_runs_and_defaults_flops(tmp_path):
    points = _realistic_grid(HOFFMANN_LAW, sigma=0.0)
    rows = _rows(points)
    rows[0]["flops"] = "1.5e18"
    rows[1]["loss"] = ""  # a failed run
    rows[2]["loss"] = "nan"  # a diverged run
    read = read_results(_write_csv(tmp_path / "results.csv", rows))
    assert len(read) == len(points) - 2
    assert read.C[0] == 1.5e18
    assert read.C[1] == pytest.approx(6.0 * read.N[1] * read.D[1], rel=1e-15)
    assert read.names[:2] == ("run0", "run3")


def test_read_results_needs_only_params_tokens_loss(tmp_path):
    rows = _rows(_realistic_grid(HOFFMANN_LAW, sigma=0.0))
    read = read_results(_write_csv(tmp_path / "results.csv", rows, ["params", "tokens", "loss"]))
    assert len(read) == len(rows) and read.archs[0] == "" and read.names[0] == "row 2"


def test_read_results_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_results(tmp_path / "missing.csv")
    rows = _rows(_realistic_grid(HOFFMANN_LAW, sigma=0.0))
    with pytest.raises(UserError, match="required column.*tokens, loss"):
        read_results(_write_csv(tmp_path / "a.csv", rows, ["name", "params"]))
    rows[3]["params"] = "big"
    with pytest.raises(UserError, match=r"row 5: column 'params' is not a number: 'big'"):
        read_results(_write_csv(tmp_path / "b.csv", rows))
    with pytest.raises(UserError, match="3 finished runs"):
        read_results(_write_csv(tmp_path / "c.csv", _rows(_realistic_grid(HOFFMANN_LAW, 0.0))[:3]))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match="is empty"):
        read_results(tmp_path / "empty.csv")


def test_read_results_counts_total_or_nonembed_params(tmp_path):
    """N comes from params or params_nonembed; a missing flops is 6 N D with that N."""
    total, nonembed = [1e6, 2e6, 4e6, 8e6, 1.6e7], [4e5, 1.4e6, 3.4e6, 7.4e6, 1.54e7]
    tokens = [2e7, 4e7, 8e7, 1.6e8, 3.2e8]
    rows = [{"name": f"r{i}", "params": f"{n:g}", "params_nonembed": f"{m:g}", "tokens": f"{d:g}", "loss": "3.0",
             "flops": "1e15" if i == 0 else ""} for i, (n, m, d) in enumerate(zip(total, nonembed, tokens))]
    path = _write_csv(tmp_path / "results.csv", rows)
    by_total, by_nonembed = read_results(path), read_results(path, "params_nonembed")
    assert by_total.N.tolist() == total and by_nonembed.N.tolist() == nonembed
    assert by_total.D.tolist() == by_nonembed.D.tolist() == tokens
    assert by_total.C[0] == by_nonembed.C[0] == 1e15  # a recorded flops stays whatever N counts
    assert by_total.C[1:].tolist() == [6.0 * n * d for n, d in zip(total[1:], tokens[1:])]
    assert by_nonembed.C[1:].tolist() == [6.0 * n * d for n, d in zip(nonembed[1:], tokens[1:])]
    assert (by_total.params_counted, by_nonembed.params_counted) == ("total", "nonembed")
    assert select_arch(by_nonembed, "").params_counted == "nonembed"


def test_read_results_nonembed_needs_its_column(tmp_path):
    rows = _rows(_realistic_grid(HOFFMANN_LAW, sigma=0.0))
    old = _write_csv(tmp_path / "old.csv", rows, ["name", "params", "tokens", "loss"])
    with pytest.raises(UserError, match=r"lacks the required column\(s\) params_nonembed \(has: loss, name, params, "):
        read_results(old, "params_nonembed")
    with pytest.raises(UserError, match=r"row 2: column 'params_nonembed' is empty"):
        read_results(_write_csv(tmp_path / "blank.csv", rows), "params_nonembed")
    with pytest.raises(ValueError, match="params_column must be one of params, params_nonembed"):
        read_results(old, "nonembed")


def test_several_archs_need_a_choice():
    points = _realistic_grid(HOFFMANN_LAW, sigma=0.0)
    mixed = Points(points.N, points.D, points.L, points.C, points.names,
                   tuple("gpt" if i % 2 else "llama" for i in range(len(points))))
    with pytest.raises(UserError, match="several archs \\('gpt', 'llama'\\)"):
        fit_all(mixed)
    with pytest.raises(UserError, match="no runs of arch 'mamba'"):
        select_arch(mixed, "mamba")
    assert set(select_arch(mixed, "llama").archs) == {"llama"}
    with pytest.raises(UserError, match="positive"):
        fit_all(points, budget=-1.0)


# --- figures, report, CLI --------------------------------------------------------------------

def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plots_and_report(tmp_path):
    points = _realistic_grid(HOFFMANN_LAW, sigma=0.01)
    result = fit_all(points, budget=1e21, resamples=10)
    plots = write_plots(points, result, tmp_path / "fig")
    assert [p.name for p in plots] == ["isoflop.png", "compute_frontier.png", "optimal_scaling.png", "residuals.png"]
    for plot in plots:
        _assert_png(plot)
    report = write_report(result, tmp_path, plots, title="Test sweep", extra_lines=["From a test."])
    text = report.read_text(encoding="utf-8")
    assert report == tmp_path / "report.md" and text.startswith("# Test sweep\n\nFrom a test.")
    for number in (f"{result['alpha']:.4g}", f"{result['a']:.3g}", f"{result['N_opt']:.4g}", "406.4", "2085", "0.076"):
        assert number in text, number
    assert "![isoflop](fig/isoflop.png)" in text


def test_plots_survive_a_fit_with_parts_missing(tmp_path):
    rng = np.random.default_rng(1)
    N, D = 10 ** rng.uniform(7, 10, 8), 10 ** rng.uniform(9, 11, 8)
    points = _points(N, D, HOFFMANN_LAW.loss(N, D))
    result = fit_all(points, resamples=0)
    assert result["budgets"] == [] and result["a"] is None
    for plot in write_plots(points, result, tmp_path):
        _assert_png(plot)
    assert "| a | n/a |" in write_report(result, tmp_path, [], title="t").read_text(encoding="utf-8")


def test_a_law_without_optimum_gives_none_not_a_crash(tmp_path):
    """Loss rising with N fits alpha < 0: no budget has a best split, so the optimum is None."""
    N, D = np.geomspace(1e7, 1e9, 6), np.full(6, 1e10)
    points = _points(N, D, np.linspace(2.0, 3.0, 6))
    result = fit_all(points, budget=1e20, resamples=0)
    assert result["alpha"] < 0 and result["N_opt"] is None and result["loss_opt"] is None
    assert any("no compute-optimal allocation" in note for note in result["notes"])
    assert result["kaplan"]["alpha_N"] is None  # a rising law is no Kaplan law either
    for plot in write_plots(points, result, tmp_path):
        _assert_png(plot)


def test_cli_fit(tmp_path, capsys):
    results = _write_csv(tmp_path / "results.csv", _rows(_realistic_grid(HOFFMANN_LAW, sigma=0.01)))
    out = tmp_path / "out"
    assert main(["fit", str(results), "--json", "--budget", "1e21", "--plots", str(out)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    for key in ("E", "A", "B", "alpha", "beta", "a", "b"):
        assert isinstance(result[key], float) and isinstance(result[f"{key}_se"], float), key
    assert result["points"] == 35 and result["budget"] == 1e21 and "kaplan" in result
    assert result["params_counted"] == "total"
    assert "report.md" in captured.err
    assert (out / "report.md").is_file() and len(list(out.glob("*.png"))) == 4

    assert main(["fit", str(results), "--budget", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --budget must be a positive")
    assert main(["fit", str(results), "--plots", str(results)]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["fit", str(tmp_path / "nope.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_fit_params_counts_nonembed(tmp_path, capsys):
    """--params nonembed takes N from params_nonembed, here exactly half of params with the flops
    recorded: every budget's N_opt halves, D_opt and the exponents stay."""
    points = _realistic_grid(HOFFMANN_LAW, sigma=0.01)
    rows = [dict(row, params_nonembed=f"{n / 2:.17g}", flops=f"{c:.17g}")
            for row, n, c in zip(_rows(points), points.N, points.C)]
    results = _write_csv(tmp_path / "results.csv", rows)
    fits = {}
    for count in ("total", "nonembed"):
        assert main(["fit", str(results), "--json", "--params", count]) == 0
        fits[count] = json.loads(capsys.readouterr().out)
    total, nonembed = fits["total"], fits["nonembed"]
    assert (total["params_counted"], nonembed["params_counted"]) == ("total", "nonembed")
    assert all(entry["N_opt"] is not None for entry in total["budgets"])
    for mine, theirs in zip(nonembed["budgets"], total["budgets"], strict=True):
        assert mine["N_opt"] == pytest.approx(theirs["N_opt"] / 2, rel=1e-9)
        assert mine["D_opt"] == pytest.approx(theirs["D_opt"], rel=1e-9)
    assert nonembed["alpha"] == pytest.approx(total["alpha"], rel=1e-6)
    assert "N counts non-embedding parameters" in format_fit(nonembed)
    assert "N counts non-embedding parameters" in write_report(nonembed, tmp_path, [], "t").read_text(encoding="utf-8")

    assert main(["fit", str(results), "--params", "embed"]) == 2
    assert "invalid choice: 'embed'" in capsys.readouterr().err
    old = _write_csv(tmp_path / "old.csv", rows, ["name", "params", "tokens", "loss"])
    assert main(["fit", str(old), "--params", "nonembed"]) == 2
    assert "lacks the required column(s) params_nonembed" in capsys.readouterr().err
