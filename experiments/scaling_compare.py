"""Kaplan et al.'s comparison (their figure 7: LSTMs against Transformers), from two sweeps of the
same grid: `isoflop_gpt` and `isoflop_lstm`.

    .venv/bin/llm-jax sweep isoflop_gpt --dir sweeps/gpt --parallel 2
    .venv/bin/llm-jax sweep isoflop_lstm --dir sweeps/lstm --parallel 2
    .venv/bin/python experiments/scaling_compare.py sweeps/gpt sweeps/lstm \
        [--out experiments/results/scaling_stdlib]

Joins the sweeps' results.csv into OUT/results.csv and writes what a two-arch sweep writes: one
fit, report and figure set per arch in OUT/ARCH/, and OUT/report.md comparing them with
compare_archs.png (loss against compute, each arch's frontier).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from llm_jax.scaling.analysis import analyse
from llm_jax.scaling.results import RESULT_COLUMNS, RESULTS_FILE, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep directories (each with results.csv)")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/scaling_stdlib"))
    args = parser.parse_args()
    rows = []
    for sweep_dir in args.sweeps:
        with open(sweep_dir / RESULTS_FILE, newline="") as f:
            rows += [{k: row[k] for k in RESULT_COLUMNS} for row in csv.DictReader(f)]
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(args.out / RESULTS_FILE, rows)
    for line in analyse(args.out, "isoflop_gpt and isoflop_lstm"):
        print(line)


if __name__ == "__main__":
    main()
