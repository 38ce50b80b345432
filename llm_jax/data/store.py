"""The token store: one split's token stream as ArrayRecord shards plus a manifest.

Layout of a store directory:

    manifest.json              written last: its presence means the store is complete
    shard-00000.array_record   `shard_tokens` tokens each (the last shard shorter), as records
    shard-00001.array_record   of `chunk_tokens` tokens (raw little-endian ids; the last
    ...                        record of the last shard shorter)

Every shard but the last holds exactly `shard_tokens` tokens and every record but the last
exactly `chunk_tokens`, so token t is in shard t // shard_tokens, record
(t % shard_tokens) // chunk_tokens, at offset t % chunk_tokens: no index to search.

The writer streams: it holds one record's tokens, builds the store in a temporary directory
beside the destination and renames it into place once the manifest is written, so a killed
build leaves only a `.NAME.*.tmp` directory, never something that looks complete, and an
existing store is never overwritten. `TokenStore` reads one back as the read-only 1-D token
array the pipeline expects (len, slices, `np.asarray`), opening shard files lazily and keeping
a few decoded records.
"""

from __future__ import annotations

import json
import operator
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from llm_jax.data.cache import write_json_atomic
from llm_jax.errors import UserError
from llm_jax.paths import safe_child

STORE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# 32 KB of uint16 per record: a random training window decodes little more than itself.
CHUNK_TOKENS = 16_384
# 64 Mi tokens (128 MB of uint16 before compression) per file: few files for a small corpus,
# many for a large one, so hosts can read and copy them in parallel.
SHARD_TOKENS = 1 << 26
# One record per ArrayRecord chunk (random access decodes only the record asked for); zstd level 1
# writes ~300 MB/s and shrinks byte-level ids about 5x.
_WRITER_OPTIONS = "group_size:1,zstd:1"
# Random access: no read-ahead, no reader thread pool.
_READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"
_CACHED_CHUNKS = 8


def _array_record() -> Any:
    # The compiled module; imported here so that reading this file's docs needs no extension.
    from array_record.python import array_record_module

    return array_record_module


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.array_record"


def is_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def remove_stale_builds(dest: Path) -> None:
    """Delete the temporary directories of killed builds of `dest`. Call only while holding the
    lock that serialises builds of `dest`: then no live build owns one."""
    for stale in dest.parent.glob(f".{dest.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def new_build_dir(dest: Path) -> Path:
    """A fresh temporary directory `.NAME.*.tmp` beside `dest` to build a store in (refused if
    `dest` exists: a store is never overwritten)."""
    if dest.exists():
        raise UserError(f"{dest} already exists; a token store is never overwritten")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, 0o755)  # mkdtemp is owner-only; a cache may be shared by several users
    return tmp


def store_manifest(header: dict[str, Any], dtype: np.dtype, chunk_tokens: int, shard_tokens: int,
                   shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest of a store of `shards` (each `file`, `tokens`, `documents`, in order): `header`
    plus the layout and the total."""
    manifest = dict(header)
    manifest.update(format=STORE_FORMAT_VERSION, dtype=np.dtype(dtype).name, chunk_tokens=chunk_tokens,
                    shard_tokens=shard_tokens, shards=shards, tokens=sum(s["tokens"] for s in shards))
    return manifest


def commit_build(tmp: Path, dest: Path) -> None:
    """Move a finished build (manifest written) into place."""
    try:
        # rename() refuses a non-empty destination: a store someone else finished meanwhile stays.
        os.rename(tmp, dest)
    except OSError as exc:
        raise UserError(f"cannot move the token store into {dest}: {exc.strerror}") from None


def _layout(chunk_tokens: int | None, shard_tokens: int | None) -> tuple[int, int]:
    """Record and shard sizes, the module's defaults where None (read per call, so tests can
    make them small)."""
    chunk_tokens = CHUNK_TOKENS if chunk_tokens is None else chunk_tokens
    shard_tokens = SHARD_TOKENS if shard_tokens is None else shard_tokens
    if chunk_tokens < 1 or shard_tokens % chunk_tokens:
        raise ValueError(f"shard_tokens={shard_tokens} must be a multiple of chunk_tokens={chunk_tokens}")
    return chunk_tokens, shard_tokens


class ShardWriter:
    """One shard file: tokens appended in order, written as records of `chunk_tokens` (the last
    one shorter); `close()` gives its manifest entry. Holds one record besides what it is given."""

    def __init__(self, path: Path, dtype: np.dtype, eos_id: int, chunk_tokens: int):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.appended = 0
        """Tokens appended so far (written or buffered)."""
        self._eos_id = eos_id
        self._chunk_tokens = chunk_tokens
        self._documents = 0
        self._buffer = np.empty(chunk_tokens, self.dtype)
        self._filled = 0
        self._writer = _array_record().ArrayRecordWriter(str(path), _WRITER_OPTIONS)

    def append(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.dtype != self.dtype:
            raise ValueError(f"expected 1-D {self.dtype} tokens, got {tokens.ndim}-D {tokens.dtype}")
        self.appended += len(tokens)
        start = 0
        while start < len(tokens):
            if self._filled == 0 and len(tokens) - start >= self._chunk_tokens:
                self._write_record(tokens[start : start + self._chunk_tokens])  # no copy
                start += self._chunk_tokens
                continue
            take = min(self._chunk_tokens - self._filled, len(tokens) - start)
            self._buffer[self._filled : self._filled + take] = tokens[start : start + take]
            self._filled += take
            start += take
            if self._filled == self._chunk_tokens:
                self._write_record(self._buffer)
                self._filled = 0

    def _write_record(self, chunk: np.ndarray) -> None:
        self._writer.write(chunk.astype("<" + self.dtype.str[1:], copy=False).tobytes())
        self._documents += int(np.count_nonzero(chunk == self._eos_id))

    def close(self) -> dict[str, Any]:
        """Flush the last record and close the file: its entry in the manifest's `shards`."""
        if self._filled:
            self._write_record(self._buffer[: self._filled])
            self._filled = 0
        if not self._writer.ok():
            raise OSError(f"writing {self.path} failed")
        self._writer.close()
        return {"file": self.path.name, "tokens": self.appended, "documents": self._documents}

    def abort(self) -> None:
        self._writer.close()


class StoreWriter:
    """Append token arrays in stream order, then `finish(header)`; use as a context manager so
    that an error removes the temporary directory.

    Peak memory is one record (`chunk_tokens`) plus what the caller passes to `append`.
    """

    def __init__(self, dest: Path, dtype: np.dtype, eos_id: int, chunk_tokens: int | None = None,
                 shard_tokens: int | None = None):
        self._chunk_tokens, self._shard_tokens = _layout(chunk_tokens, shard_tokens)
        self.dest = dest
        self.dtype = np.dtype(dtype)
        self._eos_id = eos_id
        self._tmp = new_build_dir(dest)
        self._shards: list[dict[str, Any]] = []
        self._shard: ShardWriter | None = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._shard is not None:
            self._shard.abort()
            self._shard = None
        shutil.rmtree(self._tmp, ignore_errors=True)  # gone already after a successful finish

    def append(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.dtype != self.dtype:
            raise ValueError(f"expected 1-D {self.dtype} tokens, got {tokens.ndim}-D {tokens.dtype}")
        start = 0
        while start < len(tokens):
            if self._shard is None:
                path = self._tmp / shard_name(len(self._shards))
                self._shard = ShardWriter(path, self.dtype, self._eos_id, self._chunk_tokens)
            take = min(self._shard_tokens - self._shard.appended, len(tokens) - start)
            self._shard.append(tokens[start : start + take])
            start += take
            if self._shard.appended == self._shard_tokens:
                self._shards.append(self._shard.close())
                self._shard = None

    def finish(self, header: dict[str, Any]) -> TokenStore:
        """Flush, write the manifest (`header` plus the layout and counts) and move the store
        into place."""
        if self._shard is not None:
            self._shards.append(self._shard.close())
            self._shard = None
        manifest = store_manifest(header, self.dtype, self._chunk_tokens, self._shard_tokens, self._shards)
        write_json_atomic(self._tmp / MANIFEST, manifest)
        commit_build(self._tmp, self.dest)
        return TokenStore(self.dest)


def write_store(dest: Path, pieces: Iterable[np.ndarray], dtype: np.dtype, eos_id: int,
                header: dict[str, Any], chunk_tokens: int | None = None,
                shard_tokens: int | None = None) -> TokenStore:
    """A store at `dest` of the concatenation of `pieces` (consumed one at a time)."""
    with StoreWriter(dest, dtype, eos_id, chunk_tokens, shard_tokens) as writer:
        for piece in pieces:
            writer.append(piece)
        return writer.finish(header)


class TokenStore:
    """A complete store, read as a read-only 1-D array of token ids.

    `store[i]`, `store[a:b]` (across record and shard boundaries), `len(store)`, `shape`,
    `ndim`, `dtype`, `np.asarray(store)` (reads everything: for tests and small streams) and
    `max()`. Cheap to pickle: a copy reopens the shard files it reads on first use.
    """

    ndim = 1

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except FileNotFoundError:
            raise UserError(f"{self.path} is not a complete token store (no {MANIFEST})") from None
        except (OSError, ValueError, RecursionError) as exc:  # (RecursionError: JSON nested too deeply)
            raise UserError(f"cannot read {self.path / MANIFEST}: {exc}") from None
        if not isinstance(manifest, dict):
            raise UserError(f"{self.path / MANIFEST} is damaged (not a JSON object); delete the store to prepare "
                            "it again")
        if manifest.get("format") != STORE_FORMAT_VERSION:
            raise UserError(f"{self.path} is a token store of format {manifest.get('format')}, "
                            f"this llm-jax reads format {STORE_FORMAT_VERSION}; prepare it again")
        self.manifest: dict[str, Any] = manifest
        try:
            self.dtype = np.dtype(manifest["dtype"])
            self._length = int(manifest["tokens"])
            self._chunk_tokens = int(manifest["chunk_tokens"])
            self._chunks_per_shard = int(manifest["shard_tokens"]) // self._chunk_tokens
            names = [s["file"] for s in manifest["shards"]]
            if self.dtype.kind not in "iu":  # token ids: any other dtype is damage
                raise ValueError(f"dtype {self.dtype} is not an integer type")
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise UserError(f"{self.path / MANIFEST} is damaged ({type(exc).__name__}: {exc}); "
                            "delete the store to prepare it again") from None
        # A shard is a file of this store: a name leading elsewhere is damage, not a path to follow.
        self._files = [safe_child(self.path, name, "token store shard") for name in names]
        self._open_state()

    def _open_state(self) -> None:
        self._readers: dict[int, Any] = {}
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        # The prefetch thread and the main thread (evaluation) may read at once.
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_readers", "_cache", "_lock"):
            del state[name]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open_state()

    def __len__(self) -> int:
        return self._length

    @property
    def shape(self) -> tuple[int]:
        return (self._length,)

    @property
    def size(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return f"TokenStore({str(self.path)!r}, tokens={self._length}, dtype={self.dtype.name})"

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._length)
            if step == 1:
                return self._read(start, max(start, stop))
            if step > 1 and stop > start:
                return self._read(start, stop)[::step]
            return np.asarray(self)[index]  # backwards slices: rare, read everything
        i = operator.index(index)
        if i < 0:
            i += self._length
        if not 0 <= i < self._length:
            raise IndexError(f"token index {index} out of range for {self._length} tokens")
        return self._read(i, i + 1)[0]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        tokens = self._read(0, self._length)
        return tokens if dtype is None else tokens.astype(dtype, copy=False)

    def max(self) -> Any:
        """The largest id, read one record at a time."""
        if self._length == 0:
            raise ValueError("max() of an empty token store")
        n_chunks = -(-self._length // self._chunk_tokens)
        return max(self._chunk(c, keep=False).max() for c in range(n_chunks))

    def _read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, self.dtype)
        # A long read streams its records past the cache instead of flushing it.
        keep = stop - start <= 2 * self._chunk_tokens
        position = start
        while position < stop:
            index, offset = divmod(position, self._chunk_tokens)
            chunk = self._chunk(index, keep)
            n = min(len(chunk) - offset, stop - position)
            out[position - start : position - start + n] = chunk[offset : offset + n]
            position += n
        return out

    def _chunk(self, index: int, keep: bool) -> np.ndarray:
        """Record `index` of the whole stream, decoded (cached if `keep`)."""
        with self._lock:
            cached = self._cache.get(index)
            if cached is not None:
                self._cache.move_to_end(index)
                return cached
            shard, record = divmod(index, self._chunks_per_shard)
            expected = min(self._chunk_tokens, self._length - index * self._chunk_tokens)
            try:
                reader = self._readers.get(shard)
                if reader is None:
                    reader = _array_record().ArrayRecordReader(str(self._files[shard]), _READER_OPTIONS)
                    self._readers[shard] = reader
                raw = reader.read([record])[0]
            except (RuntimeError, OSError, IndexError, ValueError) as exc:
                reason = str(exc).replace("\n", " ")
                raise UserError(f"token store {self.path} is damaged ({self._files[shard].name}, record {record}: "
                                f"{reason}); delete the directory to rebuild it") from None
            chunk = np.frombuffer(raw, dtype=self.dtype.newbyteorder("<")).astype(self.dtype, copy=False)
            if len(chunk) != expected:
                raise UserError(f"token store {self.path} is damaged ({self._files[shard].name}, record {record} "
                                f"has {len(chunk)} tokens, not {expected}); delete the directory to rebuild it")
            if keep:
                self._cache[index] = chunk
                if len(self._cache) > _CACHED_CHUNKS:
                    self._cache.popitem(last=False)
            return chunk


TokenStream = TokenStore | np.ndarray
"""What the pipeline reads windows from: a token store, or an in-memory array (tests, a data.task's rows)."""
