"""The local launcher: each run of a sweep is an `llm-jax train` process on this machine, up to
`parallel` at a time, its output in `<dir>/logs/NAME.log`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llm_jax.paths import safe_child
from llm_jax.scaling.plan import PlannedRun


@dataclass(frozen=True)
class Outcome:
    run: PlannedRun
    returncode: int
    seconds: float
    log: Path


def train_command(run: PlannedRun) -> list[str]:
    """`llm-jax train ...` through this interpreter, so the sweep's environment runs it."""
    return [sys.executable, "-m", "llm_jax.cli", "train", *run.train_args()]


def _run_one(run: PlannedRun, log_dir: Path) -> Outcome:
    log = safe_child(log_dir, f"{run.name}.log", "sweep run log")  # (the name comes from the spec)
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as out:  # appended: a rerun after a failure keeps the earlier attempt's output
        code = subprocess.run(train_command(run), stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    return Outcome(run, code, time.monotonic() - start, log)


def run_locally(runs: list[PlannedRun], log_dir: Path, parallel: int,
                report: Callable[[Outcome], None]) -> list[Outcome]:
    """Run every run (at most `parallel` at once); `report` hears of each as it ends."""
    log_dir.mkdir(parents=True, exist_ok=True)
    outcomes = []
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for future in as_completed([pool.submit(_run_one, r, log_dir) for r in runs]):
            outcome = future.result()
            report(outcome)
            outcomes.append(outcome)
    return outcomes
