"""The run directory: created once, resumed by the same command, never clobbered by another run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax

from llm_jax.config import CONFIG_FILE, Config, check_compatible, dump_yaml, read_run_config
from llm_jax.errors import UserError


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


# What a run directory may hold before its config.yaml is written (a tokenizer trained by a
# first attempt that then failed on a later check).
_BEFORE_CONFIG = {"tokenizer"}


def check_run_dir(cfg: Config) -> tuple[Path, bool]:
    """Returns (run.dir, whether it holds a run). Refuses foreign or incompatible directories."""
    if "://" in cfg.run.dir:
        raise UserError(f"run.dir {cfg.run.dir} is a URL; use a filesystem path that every host shares "
                        "(mount a bucket with gcsfuse)")
    run_dir = Path(cfg.run.dir)
    existed = (run_dir / CONFIG_FILE).exists()
    if existed:
        check_compatible(read_run_config(run_dir), cfg, str(run_dir))
    elif run_dir.exists() and (not run_dir.is_dir() or
                               any(p.name not in _BEFORE_CONFIG for p in run_dir.iterdir())):
        raise UserError(f"run.dir {run_dir} exists and is not an llm-jax run directory; choose another run.dir")
    return run_dir, existed


def write_run_config(cfg: Config, run_dir: Path) -> None:
    """Record the config once every check has passed (process 0)."""
    if jax.process_index() == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create run.dir {run_dir}: {exc.strerror}") from None
        # Later runs may change keys outside the run's identity (steps, logging, mesh).
        _atomic_write(run_dir / CONFIG_FILE, dump_yaml(cfg))


def trim_metrics(run_dir: Path, last_step: int) -> None:
    """Drop records of steps after the checkpoint we resume from: they are about to be redone."""
    path = run_dir / "metrics.jsonl"
    if jax.process_index() != 0 or not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except ValueError:
            continue  # a line cut off by a kill
    _atomic_write(path, "".join(f"{line}\n" for line in kept))
