"""Where llm-jax keeps machine-wide caches (the tokenised corpora, compiled programs, the measured CPU peak)."""

from __future__ import annotations

import os
from pathlib import Path

import jax

from llm_jax.errors import UserError


def cache_root(cache_dir: str = "") -> Path:
    """`data.cache_dir`, else $LLM_JAX_CACHE, else ~/.cache/llm_jax."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LLM_JAX_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "llm_jax"


def safe_child(root: Path, name: str, what: str) -> Path:
    """`root / name` where `name` comes from a config value or a dataset (a sweep's run name, a
    shard listed in an index) and must stay inside `root`: one plain path component, so no
    separator, no `..`, no absolute path, no NUL. Checked on the string, not by resolving it, so
    neither a symlink nor a file that does not exist yet changes the answer."""
    bad = (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
           or Path(name).is_absolute() or Path(name).name != name)
    if bad:
        raise UserError(f"{what} {name!r} is not a plain file name: names taken from a config or a dataset may "
                        f"not contain '/', '\\', '..' or NUL, so that nothing is written or read outside {root}")
    return root / name


def enable_compile_cache(cfg) -> None:
    """Use JAX's persistent compilation cache under the cache root when `run.compile_cache` is on.

    Compiling the step, the initialiser and the sampler takes ~10 s of a small CPU run; a
    repeated run with the same shapes loads them instead.
    """
    if not cfg.run.compile_cache:
        return

    jax.config.update("jax_compilation_cache_dir", str(cache_root(cfg.data.cache_dir) / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
