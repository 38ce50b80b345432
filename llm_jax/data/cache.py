"""On-disk cache: where it lives, content keys, atomic writes and a cross-process lock.

Everything written here goes through a temporary file and `os.replace`, so a process killed
mid-write leaves at worst a stray `*.tmp*` file, never a truncated file under the final name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

# Bump when the meaning of cached token arrays changes (document order, EOS placement, split
# rules, ...), so old caches are ignored instead of silently reused.
# 2: a single text file is split by position (head train, tail validation), not by chunk hash.
# 3: token streams are token stores (ArrayRecord shards + manifest directories), not .npy files.
CACHE_FORMAT_VERSION = 3


def content_key(parts: dict[str, Any]) -> str:
    """A short stable hex key of a JSON-able description (sorted keys: dict order is irrelevant)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _temp_path(final: Path, suffix: str) -> Path:
    # Same directory as the target, so os.replace is a rename within one filesystem.
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    # mkstemp makes owner-only files; a cache may be shared by several users' runs.
    os.fchmod(fd, 0o644)
    os.close(fd)
    return Path(name)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path, "")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # np.save appends ".npy" to names without it, so the temp name must already end in it.
    tmp = _temp_path(path, ".npy")
    try:
        np.save(tmp, array, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock, so processes on one host (or on a shared filesystem with working
    flock) build a cache entry once while the others wait and then reuse it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(meta_path: Path, build: Callable[[], Any]) -> Any:
    """Run `build` (which writes `meta_path` last) unless `meta_path` exists, under a lock beside
    it: the first process builds the cache entry, the others wait, then read it. Returns the parsed
    JSON of `meta_path`."""
    if not meta_path.is_file():
        with file_lock(meta_path.parent / f".{meta_path.stem}.lock"):
            if not meta_path.is_file():  # another process may have built it meanwhile
                build()
    return json.loads(meta_path.read_text())


def is_main_process() -> bool:
    """Process 0 of a multi-process run, or a single process.

    Asks jax.process_index() only once jax.distributed is up: before that, the call would
    initialise the backends and make a later jax.distributed.initialize() fail."""

    return not jax.distributed.is_initialized() or jax.process_index() == 0


def log(message: str) -> None:
    """A progress line on stderr, from process 0 only (every process runs the data code)."""
    if is_main_process():
        print(f"data: {message}", file=sys.stderr, flush=True)
