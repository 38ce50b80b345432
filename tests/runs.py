"""Helpers shared by the tests that run training: tiny-run overrides, losses, CLI subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY = ["train.log_every=1", "train.sample_tokens=0", "train.eval_every=0", "data.max_bytes=300000"]


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def cli_subprocess(args: list[str], devices: int | None = 8, env: dict | None = None, **kwargs) -> subprocess.Popen:
    """`llm-jax ARGS` in a fresh process with `devices` forced host devices (None: JAX's default,
    or what mesh.cpu_devices asks for)."""
    env = dict(os.environ if env is None else env)
    env.pop("XLA_FLAGS", None)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.Popen([sys.executable, "-m", "llm_jax.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
