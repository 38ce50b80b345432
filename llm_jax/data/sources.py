"""Corpus sources: `stdlib`, `text:PATH`, `jsonl:PATH`, `parquet:PATH`, `hf_disk:DIR`, `tfds:NAME`.

Opening a source is cheap (paths, sizes, mtimes, versions: its fingerprint, used in cache
keys); the documents are only read when a split is not cached yet. Each split yields its
documents in a deterministic order. Split rules (see `splits`): a single text file is split by
position (the tail is validation, as in nanoGPT); several files, JSONL lines and TFDS examples
without a held-out split are split by a hash of their names. Parquet files and Hugging Face
datasets saved to disk live in `columnar`, JSONL reading (any compression) in `jsonl_files`.
"""

from __future__ import annotations

import sys
import sysconfig
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from llm_jax.config.schema import DataConfig
from llm_jax.data import stdlib_tfds
from llm_jax.data.columnar import hf_disk_corpus, parquet_corpus
from llm_jax.data.corpus import Corpus, file_stats, relative_name, resolve_files
from llm_jax.data.jsonl_files import (
    JSONL_SUFFIXES,
    jsonl_fingerprint,
    jsonl_held_out_lines,
    jsonl_lines,
    jsonl_text,
)
from llm_jax.data.splits import line_chunks, streamed_validation_mask, tail_split, validation_mask
from llm_jax.errors import UserError

__all__ = ["SOURCE_KINDS", "Corpus", "open_corpus"]

# Every data.source form, for the message that refuses an unknown one.
SOURCE_KINDS = ("stdlib", "text:PATH", "jsonl:PATH", "parquet:PATH", "hf_disk:DIR", "tfds:NAME", "instruct:stdlib")

# Enough to tell text from binary: text files have no NUL bytes near the start.
_SNIFF_BYTES = 8192


def open_corpus(data: DataConfig, cache_root: Path) -> Corpus:
    kind, _, arg = data.source.partition(":")
    if data.source == "stdlib":
        return _stdlib_corpus(data, cache_root)
    if kind == "text" and arg:
        return _text_corpus(data.source, arg, data.val_fraction)
    if kind == "jsonl" and arg:
        return _jsonl_corpus(data.source, arg, data.val_fraction, data.text_field)
    if kind == "parquet" and arg:
        return parquet_corpus(data.source, arg, data)
    if kind == "hf_disk" and arg:
        return hf_disk_corpus(data.source, arg, data)
    if kind == "tfds" and arg:
        return _tfds_corpus(data.source, arg, data)
    raise UserError(f"unknown data.source '{data.source}'; use one of: {', '.join(SOURCE_KINDS)}")


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


def _looks_like_text(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" not in f.read(_SNIFF_BYTES)


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _text_corpus(spec: str, arg: str, val_fraction: float) -> Corpus:
    root, files = resolve_files(spec, arg)
    fingerprint = {"source": "text", "files": file_stats(files)}

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
        names = [relative_name(f, root) for f in text_files()]
        mask = validation_mask(names, val_fraction)
        yield from (_read_text(f) for f, v in zip(text_files(), mask, strict=False) if v == want_val)

    return Corpus(spec, fingerprint, documents, joined=lambda: len(text_files()) == 1)


# ---------------------------------------------------------------- JSONL


def _jsonl_corpus(spec: str, arg: str, val_fraction: float, field: str) -> Corpus:
    path = Path(arg).expanduser()
    if path.is_file():
        return _jsonl_file_corpus(spec, path, val_fraction, field)
    root, files = resolve_files(spec, arg, JSONL_SUFFIXES)
    fingerprint = {"source": "jsonl", "files": file_stats(files)}

    def documents(split: str) -> Iterator[str]:
        # Names are file + line number over all files at once, so a line's split depends on its
        # file and number only, and the small-corpus rule sees the whole corpus.
        names = (f"{relative_name(f, root)}:line{i}" for f in files for i, _ in jsonl_lines(f))
        mask = iter(streamed_validation_mask(names, val_fraction))
        for f in files:
            for i, line in jsonl_lines(f):
                if next(mask) == (split == "validation"):
                    yield jsonl_text(line, f, i + 1, field)

    return Corpus(spec, fingerprint, documents)


def _jsonl_file_corpus(spec: str, path: Path, val_fraction: float, field: str) -> Corpus:
    """One JSONL file (plain, .gz or .zst): its lines are split by line number alone, as
    supervised formats split theirs (`jsonl_held_out_lines`)."""

    def documents(split: str) -> Iterator[str]:
        held_out = jsonl_held_out_lines(path, val_fraction)
        for i, line in jsonl_lines(path):
            if (i in held_out) == (split == "validation"):
                yield jsonl_text(line, path, i + 1, field)

    return Corpus(spec, jsonl_fingerprint(path), documents)


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
