"""What every source hands the data layer (`Corpus`) and how sources that read files find them.

Kept apart from `sources` so that the modules of single source kinds (`columnar`) can build a
Corpus without importing the module that dispatches to them.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_jax.errors import UserError


@dataclass
class Corpus:
    label: str
    """The source as the user wrote it, for messages."""
    fingerprint: dict[str, Any]
    """JSON-able identity of the documents; part of every cache key built from them."""
    documents: Callable[[str], Iterator[str]]
    """split name ("train" or "validation") -> its documents, always in the same order."""
    joined: Callable[[], bool] = field(default=lambda: False)
    """True when each split's "documents" are consecutive pieces of one text (a single text
    file): they are tokenised as one stream, with one end-of-document token at its end. A
    callable because deciding may need the files read, which only tokenising does."""


def _is_skipped_dir(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__"


def _walk_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _is_skipped_dir(d)]
        files += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return files


def resolve_files(spec: str, arg: str, suffixes: tuple[str, ...] = ()) -> tuple[Path, list[Path]]:
    """(root that document names are relative to, sorted files) for a file, a directory (walked,
    hidden entries and `__pycache__` skipped) or a glob. With `suffixes`, files found in
    directories and globs are only those whose names end in one of them; a file named
    directly is taken as it is."""

    def wanted(files: list[Path]) -> list[Path]:
        return [f for f in files if not suffixes or f.name.endswith(suffixes)]

    kinds = f" ({' or '.join(suffixes)})" if suffixes else ""
    path = Path(arg).expanduser()
    if glob.has_magic(arg):
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
        files = []
        for match in matches:
            files += _walk_files(match) if match.is_dir() else [match]
        files = wanted(files)
        if not files:
            raise UserError(f"no files{kinds} match the glob in data.source '{spec}'")
        # Names relative to the glob's fixed leading directory stay stable as matches are added.
        fixed = [p for p in path.parts if not glob.has_magic(p)]
        root = Path(*path.parts[: len(fixed)]) if fixed else Path(".")
        while glob.has_magic(str(root)) or not root.is_dir():
            root = root.parent
        return root, sorted(set(files))
    if path.is_dir():
        files = wanted(_walk_files(path))
        if not files:
            raise UserError(f"directory {path} in data.source '{spec}' has no files{kinds}")
        return path, sorted(files)
    if path.is_file():
        return path.parent, [path]
    raise UserError(f"file or directory not found: {path} (data.source '{spec}')")


def relative_name(path: Path, root: Path) -> str:
    """A file's name in split hashes: relative to the source's root, so moving the whole corpus
    keeps its split."""
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def file_stats(files: list[Path]) -> list[tuple[str, int, int]]:
    """(resolved path, size, mtime_ns) of each file: the cheap identity in fingerprints."""
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
