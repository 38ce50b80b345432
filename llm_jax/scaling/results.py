"""What a sweep's runs left behind: whether each finished, its final held-out loss, and the
results table (`<dir>/results.csv`, one row per finished run), written here and read back here
for the fits."""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm_jax.errors import UserError
from llm_jax.scaling.plan import PlannedRun

RESULT_COLUMNS = ("name", "arch", "params", "params_nonembed", "tokens", "flops", "loss", "bpb", "run_dir")
RESULTS_FILE = "results.csv"
# `llm-jax fit --params`: the column N comes from. Hoffmann et al. count every parameter,
# Kaplan et al. leave out the embeddings (a large share of a small model).
PARAM_COUNTS = {"total": "params", "nonembed": "params_nonembed"}
COUNT_OF_COLUMN = {column: count for count, column in PARAM_COUNTS.items()}
# Besides the counted parameters, the columns a fit cannot do without; a table from elsewhere may
# leave out the rest.
REQUIRED_COLUMNS = ("tokens", "loss")
# Approach 3 has five free parameters; fewer finished runs cannot pin them down.
MIN_POINTS = 5
# Points whose compute agrees within this relative difference form one IsoFLOP budget.
BUDGET_TOLERANCE = 0.05


def final_eval(run: PlannedRun) -> dict | None:
    """The run's held-out evaluation at its last step, or None if it has not got there."""
    return final_eval_in(run.run_dir, run.steps)


def final_eval_in(run_dir: Path, steps: int) -> dict | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    final = None
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed run
                continue
            if record.get("step") == steps and "eval_loss" in record:
                final = record
    return final


def result_row(run: PlannedRun, evaluation: dict) -> dict:
    bpb = evaluation.get("eval_bpb")
    return {"name": run.name, "arch": run.arch, "params": run.params, "params_nonembed": run.params_nonembed,
            "tokens": run.tokens, "flops": f"{run.flops:.6g}", "loss": f"{evaluation['eval_loss']:.6f}",
            "bpb": "" if bpb is None else f"{bpb:.6f}", "run_dir": str(run.run_dir)}


def write_results(path: Path, rows: list[dict]) -> None:
    """Write the table whole to a temporary file and rename it: a reader never sees half a table."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


# Reading the table back, for the fits

@dataclass(frozen=True)
class Points:
    """Finished runs: N parameters, D tokens, L loss, C training FLOPs (one entry per run);
    `params_counted` says which parameters N counts (a key of PARAM_COUNTS)."""

    N: np.ndarray
    D: np.ndarray
    L: np.ndarray
    C: np.ndarray
    names: tuple[str, ...]
    archs: tuple[str, ...]
    params_counted: str = "total"

    def __len__(self) -> int:
        return len(self.L)

    def subset(self, index: np.ndarray) -> Points:
        return Points(self.N[index], self.D[index], self.L[index], self.C[index],
                      tuple(self.names[i] for i in index), tuple(self.archs[i] for i in index), self.params_counted)


def read_results(path: str | Path, params_column: str = "params") -> Points:
    """Read a results CSV: the RESULT_COLUMNS that write_results writes, of which only
    `params_column` (where N comes from: a value of PARAM_COUNTS) and REQUIRED_COLUMNS must be
    there. A row with an empty or non-finite loss is a failed run and is skipped; a missing or
    empty flops is taken as 6 * N * tokens, with N from `params_column`."""
    if params_column not in COUNT_OF_COLUMN:
        raise ValueError(f"params_column must be one of {', '.join(COUNT_OF_COLUMN)}, got {params_column!r}")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"results file {path} does not exist" if not path.exists()
                        else f"results path {path} is not a file")
    try:
        rows = _finished_rows(path, params_column)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{path} is not a readable UTF-8 CSV file: {exc}") from None
    if len(rows) < MIN_POINTS:
        raise UserError(f"{path} has {len(rows)} finished runs (rows with a finite loss); "
                        f"fitting needs at least {MIN_POINTS}")
    N, D, L, C, names, archs = zip(*rows)
    return Points(np.array(N), np.array(D), np.array(L), np.array(C), tuple(names), tuple(archs),
                  COUNT_OF_COLUMN[params_column])


def _finished_rows(path: Path, params_column: str) -> list[tuple]:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, skipinitialspace=True)
        _check_columns(path, reader.fieldnames, (params_column, *REQUIRED_COLUMNS))
        parsed = [_parse_row(path, reader.line_num, row, params_column) for row in reader]
    return [row for row in parsed if row is not None]


def _check_columns(path: Path, fieldnames: list[str] | None, required: tuple[str, ...]) -> None:
    if not fieldnames:
        raise UserError(f"{path} is empty: expected a header row with the columns {', '.join(required)}")
    present = {name.strip() for name in fieldnames if name}
    missing = [name for name in required if name not in present]
    if missing:
        raise UserError(f"{path} lacks the required column(s) {', '.join(missing)} "
                        f"(has: {', '.join(sorted(present))})")


def _parse_row(path: Path, line: int, row: dict[str | None, Any], params_column: str) -> tuple | None:
    """(N, D, L, C, name, arch) of one row, N from `params_column`, or None for a failed run (no
    finite loss)."""
    # Cells past the header come under the key None as a list; short rows give None values.
    cells = {(key or "").strip(): value.strip() if isinstance(value, str) else "" for key, value in row.items()}
    loss = _number(path, line, "loss", cells["loss"]) if cells.get("loss") else math.nan
    if not math.isfinite(loss):
        return None
    if loss <= 0:
        raise UserError(f"{path}: row {line}: column 'loss' must be positive, got {cells['loss']!r}")
    params = _positive(path, line, params_column, cells.get(params_column, ""))
    tokens = _positive(path, line, "tokens", cells.get("tokens", ""))
    # 6 N D with the N being counted: Kaplan et al.'s C = 6 N D counts non-embedding parameters too.
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
