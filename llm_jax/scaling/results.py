"""What a sweep's runs left behind: whether each finished, its final held-out loss, and the
results table (`<dir>/results.csv`, one row per finished run)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from llm_jax.scaling.plan import PlannedRun

RESULT_COLUMNS = ("name", "arch", "params", "params_nonembed", "tokens", "flops", "loss", "bpb", "run_dir")
RESULTS_FILE = "results.csv"


def final_eval(run: PlannedRun) -> dict | None:
    """The run's held-out evaluation at its last step, or None if it has not got there."""
    path = run.run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    final = None
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed run
                continue
            if record.get("step") == run.steps and "eval_loss" in record:
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
