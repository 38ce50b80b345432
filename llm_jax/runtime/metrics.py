"""Metrics out of jit: peak FLOP/s for MFU, and the JSONL / TensorBoard / progress-bar writer.

MFU = tokens/s * training FLOPs per token / peak FLOP/s, where the FLOPs per token are each model
family's own count (`models.base.Family.flops_per_token`: 6N + the attention term, Kaplan et al.
and PaLM) and the peak comes from a table of accelerators or, on CPU, a measured matmul.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from llm_jax.config import Config
from llm_jax.paths import cache_root
from llm_jax.runtime.run_dir import trim_metrics

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e reports itself as "TPU v5 lite"
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,  # v6e (Trillium)
    "tpu v6e": 918e12,
    "a100": 312e12,
    "h100": 989e12,
    "h200": 989e12,
}


def measure_cpu_peak(size: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of a jitted fp32 matmul on one CPU device: the practical peak of this machine."""
    a = jax.device_put(np.random.default_rng(0).standard_normal((size, size), np.float32), jax.devices("cpu")[0])
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def cpu_peak_flops() -> float:
    """Measured once per machine, JAX version and core count, then read from the cache."""
    key = f"{platform.processor() or platform.machine()}-{os.cpu_count()}-jax{jax.__version__}"
    path = cache_root("") / "cpu_peak.json"
    try:
        cached = json.loads(path.read_text())
        if key in cached:
            return float(cached[key])
    except (OSError, ValueError, RecursionError):
        cached = {}
    peak = measure_cpu_peak()
    cached[key] = peak
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cached))
        tmp.replace(path)
    except OSError:
        pass
    return peak


def peak_flops_total() -> tuple[float, str]:
    """Peak FLOP/s of all devices of this job and where the number comes from."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        # Forced host devices share the same cores: the measured peak is the whole machine's.
        return cpu_peak_flops() * jax.process_count(), "measured cpu matmul"
    kind = dev.device_kind.lower()
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops * jax.device_count(), f"{dev.device_kind} table"
    return float("nan"), f"unknown device {dev.device_kind}"


SYNC_EVERY_S = 60.0


class MetricsWriter:
    """JSONL always; TensorBoard and a progress bar when enabled; everything on process 0 only."""

    def __init__(self, run_dir: Path, cfg: Config, start_step: int, total_steps: int):
        self.active = jax.process_index() == 0
        self.jsonl = None
        self.tb = None
        self.bar = None
        self.total = total_steps
        self.done = start_step
        self.first = start_step
        self.t0 = None
        if not self.active:
            return
        self.path = run_dir / "metrics.jsonl"
        self.jsonl = open(self.path, "a", buffering=1)
        self.synced = time.monotonic()
        if cfg.train.tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        # A live bar on a terminal; in logs (CI, batch jobs) a line per logged step with the ETA.
        if cfg.train.progress and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=1.0, smoothing=0.1)

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        if time.monotonic() - self.synced > SYNC_EVERY_S:
            # A FUSE-mounted bucket (gcsfuse) uploads a file on fsync or close only: without
            # this, a host lost mid-run would lose every metric line since the start.
            os.fsync(self.jsonl.fileno())
            self.synced = time.monotonic()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
        if "loss" not in record:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        else:
            extra = "".join(f", {k} {record[k]:.4g}" for k in ("grad_norm", "tokens_per_sec", "mfu") if k in record)
            self.log(f"step {record['step']}/{self.total}: loss {record['loss']:.4f}{extra}, eta {self.eta()}")

    def eta(self) -> str:
        if self.t0 is None or self.done <= self.first + 1:
            return "?"
        per_step = (time.perf_counter() - self.t0) / (self.done - self.first - 1)
        seconds = int(per_step * max(self.total - self.done, 0))
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        if self.t0 is None:
            self.t0 = time.perf_counter()  # after the first (compiling) step
        if self.bar is not None:
            self.bar.update(steps)

    def rewind(self, step: int) -> None:
        """Back to `step` (a rollback restored its checkpoint): the records of later steps, about
        to be redone, leave metrics.jsonl, as on a resume."""
        self.done = self.first = step
        self.t0 = None
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()
        if not self.active:
            return
        self.jsonl.close()
        trim_metrics(self.path.parent, step)
        self.jsonl = open(self.path, "a", buffering=1)

    def log(self, text: str) -> None:
        """A line for the user, kept clear of the progress bar."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
