"""Integrity of one checkpoint step: a manifest of its files (size and sha256) and the check of it.

Orbax's rename makes a cut-off save invisible, but nothing in Orbax notices a step whose files
were truncated, altered or deleted afterwards (a half-finished copy, a bad disk, a user's
`rm`): its restore fails deep inside TensorStore, or worse, succeeds with wrong numbers. So
process 0 writes `llm_jax_manifest.json` into every step once all its files are written, and a
step counts as complete only if every file in its manifest is there with the same size and hash.

By hand: scripts/checkpoint_manifest.py `check` names the problem of each step; `seal` writes the
manifest of a step you trust (one written before llm-jax checked checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "llm_jax_manifest.json"
# Orbax writes these two at the top of a step while committing it, after the manifest (the commit
# time into the step metadata, then a marker): only their presence is checked.
LATE_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")
NO_MANIFEST = f"no {MANIFEST}: cut off before it was finished, or written before llm-jax checked checkpoints"
_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):  # streamed: a shard may be larger than memory
            digest.update(chunk)
    return digest.hexdigest()


def _files(step_dir: Path) -> list[str]:
    """Relative paths of the step's files, except the manifest itself and Orbax's late files."""
    found = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = (Path(root) / name).relative_to(step_dir).as_posix()
            if not rel.startswith(MANIFEST) and rel not in LATE_FILES:
                found.append(rel)
    return sorted(found)


def write_manifest(step_dir: Path) -> None:
    """Hash every file of `step_dir` into its manifest, written whole or not at all (tmp + rename)."""
    files = {rel: {"size": (step_dir / rel).stat().st_size, "sha256": _sha256(step_dir / rel)}
             for rel in _files(step_dir)}
    tmp = step_dir / f"{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump({"version": 1, "files": files, "late_files": list(LATE_FILES)}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())  # a manifest that names files must not outlive its own bytes after a crash
    os.replace(tmp, step_dir / MANIFEST)


def problem(step_dir: Path) -> str | None:
    """Why `step_dir` is not a complete checkpoint (the first file that differs), or None."""
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
        files: dict = manifest["files"]
        late: list = manifest.get("late_files", [])
    except FileNotFoundError:
        return NO_MANIFEST
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({type(exc).__name__})"
    for rel, want in sorted(files.items()):
        path = step_dir / rel
        if not path.is_file():
            return f"{rel}: missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{rel}: {size} bytes, {want['size']} expected"
        if _sha256(path) != want["sha256"]:
            return f"{rel}: sha256 differs"
    missing = [name for name in late if not (step_dir / name).is_file()]
    return f"{missing[0]}: missing" if missing else None


def move_aside(step_dir: Path, damaged_root: Path) -> Path:
    """Move a damaged step out of Orbax's sight into `damaged_root` (never deleted: a person may
    still want it); a name already there gets a suffix .1, .2, ..."""
    damaged_root.mkdir(parents=True, exist_ok=True)
    dest, n = damaged_root / step_dir.name, 0
    while dest.exists():
        n += 1
        dest = damaged_root / f"{step_dir.name}.{n}"
    os.rename(step_dir, dest)
    return dest
