"""Helpers shared by the tests that run training: tiny-run overrides, losses, CLI subprocesses, the
checkpoint directory as Orbax leaves it (complete and half-written steps), and damage to a step."""

import json
import os
import re
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


# Orbax writes <step>.orbax-checkpoint-tmp/<item>.orbax-checkpoint-tmp and renames each when it is complete.
TMP = ".orbax-checkpoint-tmp"
TMP_STEP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


def checkpoint_names(run_dir: Path) -> list[str]:
    try:
        return os.listdir(run_dir / "checkpoints")
    except FileNotFoundError:
        return []


def complete_and_partial(run_dir: Path) -> tuple[list[int], list[int]]:
    """(steps Orbax lists, steps still being written), both sorted."""
    names = checkpoint_names(run_dir)
    return (sorted(int(n) for n in names if n.isdigit()),
            sorted(int(m.group(1)) for m in map(TMP_STEP.match, names) if m))


def holds_array_data(step_dir: Path) -> bool:
    """Whether an item of this uncommitted step is itself uncommitted yet already holds array data
    (files under a `d/` directory: Orbax's OCDBT data files)."""
    for root, _, files in os.walk(step_dir):
        parts = os.path.relpath(root, step_dir).split(os.sep)
        if files and parts[0].endswith(TMP) and parts[-1] == "d":
            return True
    return False


def largest_array_file(step_dir: Path) -> Path:
    return max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)


def truncate_array_file(step_dir: Path) -> None:
    """Cut the step's largest array file to half (a half-finished copy)."""
    path = largest_array_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def alter_a_byte(step_dir: Path) -> None:
    """Flip one bit in the middle of the step's largest array file (a bad disk)."""
    path = largest_array_file(step_dir)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
