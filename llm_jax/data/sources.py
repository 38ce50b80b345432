"""Corpus sources: `stdlib`, `text:PATH`, `jsonl:PATH`, `tfds:NAME`.

Opening a source is cheap (paths, sizes, mtimes, versions: its fingerprint, used in cache
keys); the documents are only read when a split is not cached yet. Each split yields its
documents in a deterministic order. Split rules (see `splits`): a single text file is split by
position (the tail is validation, as in nanoGPT); several files, JSONL lines and TFDS examples
without a held-out split are split by a hash of their names.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from llm_jax.config.schema import DataConfig
from llm_jax.data import stdlib_tfds
from llm_jax.data.splits import line_chunks, tail_split, validation_mask
from llm_jax.errors import UserError

# Enough to tell text from binary: text files have no NUL bytes near the start.
_SNIFF_BYTES = 8192


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


def open_corpus(data: DataConfig, cache_root: Path) -> Corpus:
    kind, _, arg = data.source.partition(":")
    if data.source == "stdlib":
        return _stdlib_corpus(data, cache_root)
    if kind == "text" and arg:
        return _text_corpus(data.source, arg, data.val_fraction)
    if kind == "jsonl" and arg:
        return _jsonl_corpus(data.source, arg, data.val_fraction, data.text_field)
    if kind == "tfds" and arg:
        return _tfds_corpus(data.source, arg, data)
    raise UserError(
        f"unknown data.source '{data.source}'; use stdlib, text:PATH, jsonl:PATH or tfds:NAME"
    )


def _stdlib_corpus(data: DataConfig, cache_root: Path) -> Corpus:
    def documents(split: str) -> Iterator[str]:

        builder = stdlib_tfds.prepared_builder(cache_root / "tfds", data.val_fraction)
        for _path, text in stdlib_tfds.stdlib_documents(builder, split):
            yield text

    fingerprint = {
        "source": "stdlib",
        "python": sys.version,
        "stdlib": str(Path(sysconfig.get_paths()["stdlib"]).resolve()),
        "layout": stdlib_tfds.STDLIB_LAYOUT_VERSION,
    }
    return Corpus(data.source, fingerprint, documents)


# ---------------------------------------------------------------- text files


def _is_skipped_dir(name: str) -> bool:
    return name.startswith(".") or name == "__pycache__"


def _walk_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _is_skipped_dir(d)]
        files += [Path(dirpath) / f for f in filenames if not f.startswith(".")]
    return files


def _resolve_text_files(spec: str, arg: str) -> tuple[Path, list[Path]]:
    """(root that names are relative to, files) for a file, a directory or a glob."""
    path = Path(arg).expanduser()
    if glob.has_magic(arg):
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
        files = []
        for match in matches:
            files += _walk_files(match) if match.is_dir() else [match]
        if not files:
            raise UserError(f"no files match the glob in data.source '{spec}'")
        # Names relative to the glob's fixed leading directory stay stable as matches are added.
        fixed = [p for p in path.parts if not glob.has_magic(p)]
        root = Path(*path.parts[: len(fixed)]) if fixed else Path(".")
        while glob.has_magic(str(root)) or not root.is_dir():
            root = root.parent
        return root, sorted(set(files))
    if path.is_dir():
        files = _walk_files(path)
        if not files:
            raise UserError(f"directory {path} in data.source '{spec}' has no files")
        return path, sorted(files)
    if path.is_file():
        return path.parent, [path]
    raise UserError(f"file or directory not found: {path} (data.source '{spec}')")


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" not in f.read(_SNIFF_BYTES)


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _text_corpus(spec: str, arg: str, val_fraction: float) -> Corpus:
    root, files = _resolve_text_files(spec, arg)
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    fingerprint = {"source": "text", "files": stats}

    @cache
    def text_files() -> tuple[Path, ...]:
        found = tuple(f for f in files if _looks_like_text(f))
        if not found:
            raise UserError(f"no text files (only binary ones) in data.source '{spec}'")
        return found

    def documents(split: str) -> Iterator[str]:
        want_val = split == "validation"
        if len(text_files()) == 1:
            # One file: its head is train, its tail validation (nanoGPT's split), each handed
            # out in line chunks that the tokeniser joins back into one stream.
            train, val = tail_split(_read_text(text_files()[0]), val_fraction)
            yield from line_chunks(val if want_val else train)
            return
        names = [f.relative_to(root).as_posix() if f.is_relative_to(root) else str(f)
                 for f in text_files()]
        mask = validation_mask(names, val_fraction)
        yield from (_read_text(f) for f, v in zip(text_files(), mask, strict=False) if v == want_val)

    return Corpus(spec, fingerprint, documents, joined=lambda: len(text_files()) == 1)


# ---------------------------------------------------------------- JSONL


def _jsonl_corpus(spec: str, arg: str, val_fraction: float, field: str) -> Corpus:
    path = Path(arg).expanduser()
    if not path.is_file():
        raise UserError(f"JSONL file not found: {path} (data.source '{spec}')")
    fingerprint = jsonl_fingerprint(path)

    def documents(split: str) -> Iterator[str]:
        held_out = jsonl_held_out_lines(path, val_fraction)
        with open(path, encoding="utf-8", errors="replace") as f:
            for i, line in enumerate(f):
                if line.strip() and (i in held_out) == (split == "validation"):
                    yield _jsonl_text(line, path, i + 1, field)

    return Corpus(spec, fingerprint, documents)


def jsonl_held_out_lines(path: Path, val_fraction: float) -> set[int]:
    """0-based numbers of the non-empty lines of a JSONL file that are validation records: a
    hash of the line number against val_fraction (`splits.validation_mask`), at least one
    record on each side when there are two."""
    with open(path, encoding="utf-8", errors="replace") as f:
        line_numbers = [i for i, line in enumerate(f) if line.strip()]
    mask = validation_mask([f"line{i}" for i in line_numbers], val_fraction)
    return {i for i, v in zip(line_numbers, mask, strict=True) if v}


def jsonl_fingerprint(path: Path) -> dict[str, Any]:
    """Identity of a JSONL file for cache keys: its resolved path, size and mtime."""
    stat = path.stat()
    return {"source": "jsonl", "file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _jsonl_text(line: str, path: Path, line_number: int, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{line_number}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict) or field not in record:
        raise UserError(f"{path}:{line_number}: no field '{field}' (set data.text_field)")
    value = record[field]
    if not isinstance(value, str):
        raise UserError(f"{path}:{line_number}: field '{field}' is {type(value).__name__}, not text")
    return value


# ---------------------------------------------------------------- TFDS


def _tfds_corpus(spec: str, name: str, data: DataConfig) -> Corpus:
    import tensorflow_datasets as tfds  # heavy; only a tfds: source needs it

    data_dir = data.tfds_data_dir or None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        raise UserError(f"unknown TFDS dataset '{name}' (data.source '{spec}')") from None
    if not builder.is_prepared():
        raise UserError(
            f"TFDS dataset '{name}' is not prepared in {builder.data_dir}; prepare it "
            "(tfds build) or set data.tfds_data_dir"
        )
    splits = {k: int(v.num_examples) for k, v in builder.info.splits.items()}
    if "train" not in splits:
        raise UserError(f"TFDS dataset '{name}' has no 'train' split (it has: {', '.join(splits)})")
    held_out = next((s for s in ("validation", "test") if s in splits), None)
    fingerprint = {"source": "tfds", "name": name, "data_dir": str(builder.data_dir),
                   "version": str(builder.info.version), "splits": splits}

    def read(split: str) -> Any:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)

    def documents(split: str) -> Iterator[str]:
        if held_out is not None:
            source = read("train" if split == "train" else held_out)
            indices: Any = range(len(source))
        else:
            source = read("train")
            mask = validation_mask([f"example{i}" for i in range(len(source))], data.val_fraction)
            indices = [i for i, v in enumerate(mask) if v == (split == "validation")]
        for i in indices:
            yield _tfds_text(source[i], name, data.text_field)

    return Corpus(spec, fingerprint, documents)


def _tfds_text(record: Any, name: str, field: str) -> str:
    if not isinstance(record, dict) or field not in record:
        fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise UserError(
            f"TFDS dataset '{name}' has no field '{field}' (it has: {fields}); set data.text_field"
        )
    value = record[field]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "item"):  # a 0-d numpy array of bytes
        value = value.item()
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    return str(value)
