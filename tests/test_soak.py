"""Memory over long runs: a training process's resident memory (RSS) stays flat over many steps
with evaluations and checkpoint saves. The short run is part of `make test`; the long one runs
only with `pytest --soak -m soak`. Numbers measured: docs/reliability.md, "Memory"."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from runs import REPO

# The real CLI in a fresh process (nothing of pytest's in its memory), on one CPU device, with the
# first hook sampling the process's RSS from /proc after every step. On CPU the devices' buffers
# are host memory too, so a leaked array shows in RSS like a leaked Python object.
PROBE = """
import json, os, sys
from llm_jax.cli import main
from llm_jax.train import run

PAGE = os.sysconf("SC_PAGE_SIZE")
samples = {}
advance = run.ProgressAdvance.after_step

def sampled(self, trainer, done, state, metrics):
    with open("/proc/self/statm") as statm:
        samples[done] = int(statm.read().split()[1]) * PAGE / 2**20
    return advance(self, trainer, done, state, metrics)

run.ProgressAdvance.after_step = sampled
code = main(["train", "gpt_tiny", *sys.argv[1:]])
print(json.dumps(samples))
sys.exit(code)
"""


def rss_per_step(run_dir: Path, steps: int, every: int) -> dict[int, float]:
    """RSS in MiB after each step of a gpt_tiny run evaluating and saving every `every` steps."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    args = [f"run.dir={run_dir}", f"train.steps={steps}", f"train.eval_every={every}", f"checkpoint.every={every}",
            "checkpoint.keep=2", "train.log_every=100", "train.sample_tokens=0", "data.max_bytes=300000"]
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    samples = {int(step): mib for step, mib in json.loads(done.stdout.splitlines()[-1]).items()}
    assert sorted(samples) == list(range(1, steps + 1))
    return samples


def median_over(samples: dict[int, float], first: int, last: int) -> float:
    return statistics.median(mib for step, mib in samples.items() if first <= step <= last)


def check_flat(samples: dict[int, float], warmup: int, window: int, bound_mib: float) -> None:
    """RSS after warm-up (compilation, the first evaluation and save, allocator pools) against RSS at
    the end, each the median of `window` steps: one sample moves by some 10 MiB as buffers are
    freed and reused."""
    steps = max(samples)
    start = median_over(samples, warmup + 1, warmup + window)
    end = median_over(samples, steps - window + 1, steps)
    report = f"RSS {start:.0f} MiB after step {warmup}, {end:.0f} MiB at step {steps}: {end - start:+.1f} MiB"
    print(report)
    assert end - start < bound_mib, report


@pytest.mark.slow
@pytest.mark.faults
def test_resident_memory_stays_flat_over_300_steps_with_30_evaluations_and_saves(tmp_path):
    check_flat(rss_per_step(tmp_path / "run", steps=300, every=10), warmup=100, window=50, bound_mib=50)


@pytest.mark.soak
def test_resident_memory_stays_flat_over_5000_steps_with_500_evaluations_and_saves(tmp_path):
    check_flat(rss_per_step(tmp_path / "run", steps=5000, every=10), warmup=500, window=250, bound_mib=100)
