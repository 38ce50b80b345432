"""Where llm-jax keeps machine-wide caches (kept free of heavy imports: the bench path uses it)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str = "") -> Path:
    """`data.cache_dir`, else $LLM_JAX_CACHE, else ~/.cache/llm_jax."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LLM_JAX_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "llm_jax"
