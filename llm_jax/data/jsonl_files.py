"""JSONL files, plain or compressed: the one place that opens them and decides their split.

`jsonl_lines` reads a `.jsonl`, `.jsonl.gz` (stdlib gzip) or `.jsonl.zst` (zstandard's
streaming reader) file line by line, never whole; text corpora (`sources`) and supervised
formats (`sft_rows`) both read through it, so both accept every compression. A record's split
is a hash of its line number (`jsonl_held_out_lines`): the same for a file and its compressed
copy, so compressing a corpus changes neither split.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import zstandard

from llm_jax.data.splits import validation_mask
from llm_jax.errors import UserError

# What a directory or glob of JSONL files keeps.
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")


# Compressed bytes read at a time from a .zst file.
_ZSTD_READ_BYTES = 1 << 16


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every zstd frame of a binary file, in order (`cat a.zst b.zst`
    and pzstd write several frames). zstandard's own `stream_reader` ends quietly when the file
    ends inside a frame; this raises ZstdError instead, so a truncated download is an error and
    not a silently shorter corpus."""

    def __init__(self, compressed: IO[bytes]) -> None:
        super().__init__()
        self._compressed = compressed
        self._frame: Any = None  # the decompressobj of the frame being read
        self._pending = b""
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._offset == len(self._pending):
            chunk = self._compressed.read(_ZSTD_READ_BYTES)
            if not chunk:
                if self._frame is not None and not self._frame.eof:
                    raise zstandard.ZstdError("the file ends inside a zstd frame (truncated?)")
                return 0
            self._pending, self._offset = b"", 0
            while chunk:
                if self._frame is None or self._frame.eof:
                    self._frame = zstandard.ZstdDecompressor().decompressobj()
                self._pending += self._frame.decompress(chunk)
                chunk = self._frame.unused_data if self._frame.eof else b""
        size = min(len(buffer), len(self._pending) - self._offset)
        buffer[:size] = self._pending[self._offset:self._offset + size]
        self._offset += size
        return size


def _open_text(path: Path, stack: ExitStack) -> IO[str]:
    if path.name.endswith(".gz"):
        return stack.enter_context(gzip.open(path, "rt", encoding="utf-8", errors="replace"))
    raw = stack.enter_context(open(path, "rb"))
    if path.name.endswith(".zst"):
        frames = stack.enter_context(io.BufferedReader(_ZstdFrames(raw)))
        return stack.enter_context(io.TextIOWrapper(frames, encoding="utf-8", errors="replace"))
    return stack.enter_context(io.TextIOWrapper(raw, encoding="utf-8", errors="replace"))


def jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(0-based line number, line) of each non-empty line, decompressing as it goes. A damaged
    or truncated compressed file is a one-line UserError naming it."""
    with ExitStack() as stack:
        try:
            f = _open_text(path, stack)
            for i, line in enumerate(f):
                if line.strip():
                    yield i, line
        except (OSError, EOFError, zstandard.ZstdError) as exc:
            raise UserError(f"{path}: cannot be read as {_kind(path)} ({exc})") from None


def _kind(path: Path) -> str:
    if path.name.endswith(".gz"):
        return "gzip-compressed JSONL"
    return "zstd-compressed JSONL" if path.name.endswith(".zst") else "JSONL"


def first_line(path: Path) -> str:
    """The first non-empty line ("" for an empty file), without reading the rest."""
    lines = jsonl_lines(path)
    try:
        return next((line for _, line in lines), "")
    finally:
        lines.close()


def jsonl_held_out_lines(path: Path, val_fraction: float) -> set[int]:
    """0-based numbers of the non-empty lines of a JSONL file that are validation records: a
    hash of the line number against val_fraction (`splits.validation_mask`), at least one
    record on each side when there are two."""
    line_numbers = [i for i, _ in jsonl_lines(path)]
    mask = validation_mask([f"line{i}" for i in line_numbers], val_fraction)
    return {i for i, v in zip(line_numbers, mask, strict=True) if v}


def jsonl_fingerprint(path: Path) -> dict[str, Any]:
    """Identity of a JSONL file for cache keys: its resolved path, size and mtime."""
    stat = path.stat()
    return {"source": "jsonl", "file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def json_value(line: str) -> Any:
    """`json.loads(line)`, with every way a hostile line makes it fail as a ValueError saying why:
    deep nesting exhausts Python's recursion (RecursionError), a number of more than 4300 digits
    hits Python's int-string limit (a ValueError that is no JSONDecodeError)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise ValueError("not readable JSON (nested too deeply)") from None
    except ValueError as exc:
        raise ValueError(f"not readable JSON ({exc})") from None


def jsonl_text(line: str, path: Path, line_number: int, field: str) -> str:
    """The text in `field` of one JSONL record; anything else is a UserError naming FILE:LINE."""
    try:
        record = json_value(line)
    except ValueError as exc:
        raise UserError(f"{path}:{line_number}: {exc}") from None
    if not isinstance(record, dict) or field not in record:
        raise UserError(f"{path}:{line_number}: no field '{field}' (set data.text_field)")
    value = record[field]
    if not isinstance(value, str):
        raise UserError(f"{path}:{line_number}: field '{field}' is {type(value).__name__}, not text")
    return value
