"""`llm-jax sweep SPEC --dir DIR`: plan the grid, skip the runs that finished before, run or
submit the rest, then write `results.csv`, the fits, plots and `report.md` in DIR.

A sweep directory belongs to one spec: `DIR/sweep.yaml` records it, and a rerun with a different
spec is refused (its runs would be mixed with the old ones). Runs live in `DIR/runs/NAME`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import yaml

from llm_jax.errors import UserError
from llm_jax.scaling.analysis import analyse
from llm_jax.scaling.local import Outcome, run_locally
from llm_jax.scaling.plan import PlannedRun, SweepPlan, plan_sweep
from llm_jax.scaling.results import RESULTS_FILE, final_eval, result_row, write_results
from llm_jax.scaling.spec import load_spec, spec_path

SPEC_RECORD = "sweep.yaml"
# One JSON line per run submitted to a cluster. A later sweep command leaves those runs alone
# until they finish (or --resubmit): their jobs may still be queued or running, and a second job
# would train into the same run directory.
SUBMITTED_RECORD = "submitted.jsonl"
LAUNCHERS = ("local", "slurm", "gke", "tpu")


def say(text: str) -> None:
    print(text, flush=True)


def claim_dir(sweep_dir: Path, spec_text: str) -> None:
    """Make DIR this spec's sweep directory, or check that it already is."""
    record = sweep_dir / SPEC_RECORD
    if record.is_file():
        if yaml.safe_load(record.read_text()) != yaml.safe_load(spec_text):
            raise UserError(f"{sweep_dir} holds a sweep of a different spec ({record}); use a new --dir, "
                            "or restore that spec to go on with it")
        return
    if sweep_dir.exists() and (not sweep_dir.is_dir() or any(sweep_dir.iterdir())):
        raise UserError(f"{sweep_dir} exists and is not a sweep directory (no {SPEC_RECORD}); choose a new --dir")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(spec_text)


def submitted_before(sweep_dir: Path) -> set[str]:
    path = sweep_dir / SUBMITTED_RECORD
    if not path.is_file():
        return set()
    return {json.loads(line)["run"] for line in path.read_text().splitlines() if line.strip()}


def recorder(sweep_dir: Path, launcher: str) -> Callable[[PlannedRun], None]:
    """Append a run to DIR/submitted.jsonl as soon as its job is in, so that a submission that
    stops part-way still records the jobs it made."""
    def record(run: PlannedRun) -> None:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        entry = {"run": run.name, "launcher": launcher, "time": now}
        with (sweep_dir / SUBMITTED_RECORD).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
    return record


def describe_run(run: PlannedRun) -> str:
    return (f"{run.name}: {run.params / 1e6:.3g}M params ({run.params_nonembed / 1e6:.3g}M non-embedding), "
            f"{run.steps} steps, {run.tokens / 1e6:.3g}M tokens, {run.flops:.3g} FLOPs, lr {run.lr:.3g}, "
            f"warmup {run.warmup_steps}")


def collect(plan: SweepPlan, sweep_dir: Path) -> list[dict]:
    """Rows of every finished run, in plan order, written to results.csv."""
    rows = []
    for run in plan.runs:
        evaluation = final_eval(run)
        if evaluation is not None:
            rows.append(result_row(run, evaluation))
    write_results(sweep_dir / RESULTS_FILE, rows)
    return rows


def run_sweep(spec_name: str, sweep_dir: Path, parallel: int = 1, launcher: str = "local",
              collect_only: bool = False, submit=None, resubmit: bool = False) -> int:
    """Returns the exit code: 0, or 1 when a run failed (the others still ran and were collected).
    `submit(runs, sweep_dir, submitted) -> None` sends runs to a cluster launcher, calling
    `submitted(run)` for each job it made. Unfinished runs submitted by an earlier command are
    left alone unless `resubmit`."""
    if parallel < 1:
        raise UserError("--parallel must be at least 1")
    if launcher not in LAUNCHERS:
        raise UserError(f"--launcher must be one of {', '.join(LAUNCHERS)}")
    spec = load_spec(spec_name)
    plan = plan_sweep(spec, sweep_dir.resolve())
    claim_dir(sweep_dir, spec_path(spec_name).read_text())
    say(f"sweep {spec_name}: {len(plan.runs)} runs in {sweep_dir}/runs "
        f"({len(spec.budgets)} budgets x {len({r.shape['d_model'] for r in plan.runs})} sizes"
        f" x {len({r.arch for r in plan.runs})} archs)")
    for note in plan.left_out:
        say(f"  left out: {note}")
    done = [r for r in plan.runs if final_eval(r) is not None]
    todo = [r for r in plan.runs if final_eval(r) is None]
    if done:
        say(f"{len(done)} runs finished before; skipped")
    pending = submitted_before(sweep_dir)
    if pending and not resubmit and not collect_only:
        waiting = [r for r in todo if r.name in pending]
        todo = [r for r in todo if r.name not in pending]
        if waiting:
            say(f"{len(waiting)} runs were submitted before ({sweep_dir / SUBMITTED_RECORD}) and have not finished; "
                "left to their jobs: once those have ended, --resubmit submits the ones that failed")
    failed: list[Outcome] = []
    if todo and not collect_only:
        if launcher == "local":
            failed = _run_local(todo, sweep_dir, parallel)
        else:
            submit(todo, sweep_dir, recorder(sweep_dir, launcher))
            say(f"submitted {len(todo)} runs through the {launcher} launcher; when they have finished, "
                f"collect them with: llm-jax sweep {spec_name} --dir {sweep_dir} --collect")
    rows = collect(plan, sweep_dir)
    say(f"{len(rows)} of {len(plan.runs)} runs finished; results in {sweep_dir / RESULTS_FILE}")
    if rows:
        for line in analyse(sweep_dir, spec_name):
            say(line)
    if failed:
        say(f"{len(failed)} runs failed: " + ", ".join(f"{o.run.name} (exit {o.returncode}, log {o.log})"
                                                  for o in failed))
        return 1
    return 0


def _run_local(todo: list[PlannedRun], sweep_dir: Path, parallel: int) -> list[Outcome]:
    say(f"running {len(todo)} runs here, {parallel} at a time; logs in {sweep_dir / 'logs'}")
    failed = []
    count = [0]

    def report(outcome: Outcome) -> None:
        count[0] += 1
        evaluation = final_eval(outcome.run)
        head = f"[{count[0]}/{len(todo)}] {describe_run(outcome.run)}"
        if outcome.returncode == 0 and evaluation is not None:
            say(f"{head}\n    loss {evaluation['eval_loss']:.4f} in {outcome.seconds:.0f} s")
        else:
            failed.append(outcome)
            print(f"{head}\n    FAILED (exit {outcome.returncode}) after {outcome.seconds:.0f} s; "
                  f"log: {outcome.log}", file=sys.stderr, flush=True)

    run_locally(todo, sweep_dir / "logs", parallel, report)
    return failed
