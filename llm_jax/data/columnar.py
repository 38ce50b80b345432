"""Columnar corpora: Parquet files (`parquet:PATH`) and Hugging Face datasets saved with
`save_to_disk` (`hf_disk:DIR`), read with pyarrow a record batch at a time.

The text is the column `data.text_field`. A null in it stops the build with `FILE: row N`, or
with data.skip_bad_records is skipped and counted; a column that is not text at all is an error
either way. Rows are named `FILE:rowN` (FILE relative to the source's root, N the 0-based row in
that file) for the split hash, so adding files or rows never moves existing ones.

`hf_disk:DIR` is read without the `datasets` library, from the layout its `save_to_disk`
writes (recent versions; checked with datasets 5.2.0):

    PATH/dataset_dict.json          {"splits": ["train", "validation", ...]}   (a DatasetDict)
    PATH/<split>/state.json         {"_data_files": [{"filename": "data-00000-of-00001.arrow"}, ...]}
    PATH/<split>/dataset_info.json  features, description (not needed here)
    PATH/<split>/data-*.arrow       Arrow IPC *stream* files, in `_data_files` order

or, for a single `Dataset`, `state.json`, `dataset_info.json` and the Arrow files in PATH
itself. A DatasetDict's `train` split is training and its `validation` (else `test`) split is
held out as it is, as for TFDS; a single Dataset (or a dict with neither) is split by row hash.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from llm_jax.config.schema import DataConfig
from llm_jax.data.cache import log
from llm_jax.data.corpus import Corpus, file_stats, relative_name, resolve_files
from llm_jax.data.splits import streamed_validation_mask
from llm_jax.errors import UserError

# Rows per batch read from a Parquet row group: bounded memory whatever the row group's size.
_PARQUET_BATCH_ROWS = 1024
# The split files of a save_to_disk DatasetDict taken as validation, first found wins.
HELD_OUT_SPLITS = ("validation", "test")


class _Skipped:
    """Counts the null texts skipped (data.skip_bad_records) so the split can say so once."""

    def __init__(self) -> None:
        self.count = 0
        self.first = ""

    def report(self, spec: str, split: str) -> None:
        if self.count:
            log(f"{spec} ({split}): skipped {self.count} rows with a null text (first: {self.first})")


def _texts(column: pa.Array | pa.ChunkedArray, path: Path, first_row: int, field: str,
           skip_bad: bool, skipped: _Skipped) -> Iterator[tuple[int, str]]:
    """(row in file, text) of one batch's text column."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            or pa.types.is_string_view(column.type)):
        raise UserError(f"{path}: column '{field}' holds {column.type}, not text (set data.text_field)")
    for offset, value in enumerate(column.to_pylist()):
        row = first_row + offset
        if value is None:
            if not skip_bad:
                raise UserError(f"{path}: row {row}: column '{field}' is null "
                                "(data.skip_bad_records=true skips such rows)")
            skipped.count += 1
            skipped.first = skipped.first or f"{path} row {row}"
            continue
        yield row, value


def _reason(exc: BaseException) -> str:
    """The first line of pyarrow's message, for a one-line error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _missing_column(path: Path, field: str, names: list[str]) -> UserError:
    return UserError(f"{path}: no column '{field}' (it has: {', '.join(names)}); set data.text_field")


# ---------------------------------------------------------------- Parquet


def _parquet_file(path: Path, field: str) -> pq.ParquetFile:
    """The open file (the caller closes it: `with`), its footer checked for the text column."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable Parquet file ({_reason(exc)})") from None
    names = parquet.schema_arrow.names
    if field not in names:
        parquet.close()
        raise _missing_column(path, field, names)
    return parquet


def _parquet_row_count(path: Path, field: str) -> int:
    with _parquet_file(path, field) as parquet:
        return parquet.metadata.num_rows


def _parquet_rows(path: Path, field: str, skip_bad: bool, skipped: _Skipped) -> Iterator[tuple[int, str]]:
    with _parquet_file(path, field) as parquet:
        first_row = 0
        try:
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[field]):
                yield from _texts(batch.column(0), path, first_row, field, skip_bad, skipped)
                first_row += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise UserError(f"{path}: damaged Parquet file ({_reason(exc)})") from None


def parquet_corpus(spec: str, arg: str, data: DataConfig) -> Corpus:
    root, files = resolve_files(spec, arg, (".parquet",))
    fingerprint = {"source": "parquet", "files": file_stats(files)}

    def rows_of(path: Path, skipped: _Skipped) -> Iterator[tuple[int, str]]:
        return _parquet_rows(path, data.text_field, data.skip_bad_records, skipped)

    def documents(split: str) -> Iterator[str]:
        # Row counts come from the footers, so the split is known before any text is read.
        counts = [_parquet_row_count(f, data.text_field) for f in files]
        yield from _hashed_split(root, files, counts, split, data, spec, rows_of)

    return Corpus(spec, fingerprint, documents)


def _hashed_split(root: Path, files: list[Path], counts: list[int], split: str, data: DataConfig, spec: str,
                  rows_of: Callable[[Path, _Skipped], Iterator[tuple[int, str]]]) -> Iterator[str]:
    """The texts of `split` when each row goes to validation by a hash of `FILE:rowN` over all
    rows of all files (`counts`: rows per file); `rows_of(file, skipped)` yields (row, text)."""
    names = (f"{relative_name(f, root)}:row{i}" for f, n in zip(files, counts, strict=True) for i in range(n))
    mask = streamed_validation_mask(names, data.val_fraction)
    want_val, skipped, start = split == "validation", _Skipped(), 0
    for path, count in zip(files, counts, strict=True):
        yield from (text for row, text in rows_of(path, skipped) if mask[start + row] == want_val)
        start += count
    skipped.report(spec, split)


# ---------------------------------------------------------------- Hugging Face save_to_disk


def _arrow_batches(path: Path, field: str) -> Iterator[pa.RecordBatch]:
    """The record batches of one Arrow IPC stream file, memory-mapped: one batch in memory."""
    try:
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_stream(source)
            names = reader.schema.names
            if field not in names:
                raise _missing_column(path, field, names)
            index = names.index(field)
            for batch in reader:
                yield batch.select([index])
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path}: not a readable Arrow IPC stream file ({_reason(exc)})") from None


def _arrow_rows(path: Path, field: str, skip_bad: bool, skipped: _Skipped) -> Iterator[tuple[int, str]]:
    first_row = 0
    for batch in _arrow_batches(path, field):
        yield from _texts(batch.column(0), path, first_row, field, skip_bad, skipped)
        first_row += batch.num_rows


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # (RecursionError: JSON nested too deeply)
        raise UserError(f"{path}: not readable JSON ({exc})") from None


def _split_files(folder: Path) -> list[Path]:
    """The Arrow files of one saved Dataset, in the order `state.json` lists them."""
    state_path = folder / "state.json"
    if not state_path.is_file():
        raise UserError(f"{folder}: no state.json; not a Dataset saved with save_to_disk")
    state = _read_json(state_path)
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{state_path}: no '_data_files' list")
    if state.get("_indices_data_files"):
        # Old `datasets` versions saved a selection as the full table plus an indices table.
        raise UserError(f"{state_path}: an indices mapping (_indices_data_files) is not supported; "
                        "save the dataset again after .flatten_indices()")
    files = []
    for entry in entries:
        name = entry.get("filename") if isinstance(entry, dict) else None
        # A plain file name only: anything else is damage or a path leading out of the dataset.
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise UserError(f"{state_path}: bad _data_files entry {entry!r}")
        if not (folder / name).is_file():
            raise UserError(f"{folder / name}: missing (listed in {state_path})")
        files.append(folder / name)
    return files


def hf_disk_corpus(spec: str, arg: str, data: DataConfig) -> Corpus:
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise UserError(f"directory not found: {root} (data.source '{spec}')")
    parts: dict[str, list[Path]]
    if (root / "dataset_dict.json").is_file():
        listed = _read_json(root / "dataset_dict.json")
        splits = listed.get("splits") if isinstance(listed, dict) else None
        if not isinstance(splits, list) or "train" not in splits:
            raise UserError(f"{root / 'dataset_dict.json'}: no 'train' split (it lists: {splits})")
        held_out = next((s for s in HELD_OUT_SPLITS if s in splits), None)
        parts = {s: _split_files(root / s) for s in ("train", held_out) if s}
    elif (root / "state.json").is_file():
        held_out, parts = None, {"train": _split_files(root)}
    else:
        raise UserError(f"{root}: neither dataset_dict.json nor state.json; not a dataset saved with "
                        f"save_to_disk (data.source '{spec}')")
    fingerprint = {"source": "hf_disk", "root": str(root.resolve()), "held_out": held_out,
                   "splits": {s: file_stats(files) for s, files in parts.items()}}

    def rows_of(path: Path, skipped: _Skipped) -> Iterator[tuple[int, str]]:
        return _arrow_rows(path, data.text_field, data.skip_bad_records, skipped)

    def documents(split: str) -> Iterator[str]:
        if held_out is not None:
            skipped = _Skipped()
            for path in parts["train" if split == "train" else held_out]:
                yield from (text for _, text in rows_of(path, skipped))
            skipped.report(spec, split)
            return
        files = parts["train"]
        # A stream file has no footer: count its rows by walking its (memory-mapped) batches.
        counts = [sum(b.num_rows for b in _arrow_batches(f, data.text_field)) for f in files]
        yield from _hashed_split(files[0].parent, files, counts, split, data, spec, rows_of)

    return Corpus(spec, fingerprint, documents)
