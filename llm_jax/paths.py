"""Where llm-jax keeps machine-wide caches (the tokenised corpora, compiled programs, the measured CPU peak)."""

from __future__ import annotations

import os
from pathlib import Path

import jax


def cache_root(cache_dir: str = "") -> Path:
    """`data.cache_dir`, else $LLM_JAX_CACHE, else ~/.cache/llm_jax."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LLM_JAX_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "llm_jax"


def enable_compile_cache(cfg) -> None:
    """Use JAX's persistent compilation cache under the cache root when `run.compile_cache` is on.

    Compiling the step, the initialiser and the sampler takes ~10 s of a small CPU run; a
    repeated run with the same shapes loads them instead.
    """
    if not cfg.run.compile_cache:
        return

    jax.config.update("jax_compilation_cache_dir", str(cache_root(cfg.data.cache_dir) / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
