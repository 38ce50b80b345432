"""The platform a program is built for, and which platforms JAX should start.

Usually the target is the backend this process runs on. `llm-jax compile` builds programs for a
TPU topology from a CPU machine (ahead of time, `jax.experimental.topologies`); inside
`targeting("tpu")` every `auto` choice (compute dtype, attention kernel, selective scan, grouped
matmul) resolves as it would on that TPU, not as it would on this CPU.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

import jax

from llm_jax.errors import UserError

_TARGET: ContextVar[str | None] = ContextVar("llm_jax_target_platform", default=None)


def target_platform() -> str:
    """"cpu", "gpu" or "tpu": the platform the program being built will run on."""
    return _TARGET.get() or jax.default_backend()


@contextmanager
def targeting(platform: str) -> Iterator[None]:
    """Build (trace, lower) for `platform` instead of this process's backend."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def pallas_interpret(choice: str, home: str, instead: str) -> bool:
    """How a Pallas kernel written for `home` ("tpu" or "gpu") runs on the target platform:
    compiled there (False), in interpret mode on a CPU (True: tests, slow), and on the other
    accelerator not at all: a UserError naming the config `choice` and what to use `instead`."""
    platform = target_platform()
    if platform in (home, "cpu"):
        return platform == "cpu"
    raise UserError(f"{choice} is a Pallas kernel for {home.upper()} only and does not run on {platform.upper()}; "
                    f"use {instead}")


def _has_tpu_chips() -> bool:
    # TPU VMs expose their chips as /dev/accel* (v2-v4) or VFIO groups (v5e, v5p, v6e).
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def skip_absent_tpu() -> None:
    """With libtpu installed (the `tpu` extra, which `llm-jax compile` needs) on a machine that
    has no TPU chips, JAX would start the TPU runtime anyway: it prints a page of warnings and
    falls back to the CPU. Start only the platforms this machine has. An explicit JAX_PLATFORMS
    is left alone; call before the first use of a device."""
    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
        return
    if importlib.util.find_spec("libtpu") is None or _has_tpu_chips():
        return
    cuda = any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))
    jax.config.update("jax_platforms", "cuda,cpu" if cuda else "cpu")
