"""Corpus sources beyond plain files: compressed JSONL (one file, a directory, a glob), Parquet,
and Hugging Face datasets saved with `save_to_disk` (read without `datasets`). Each test writes
tiny files in tmp_path and checks the decoded token streams against the documents written."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llm_jax.cli import main
from llm_jax.config import Config, load_config, validate
from llm_jax.data import DataBundle, build_data
from llm_jax.data.jsonl_files import jsonl_held_out_lines
from llm_jax.data.splits import validation_mask
from llm_jax.errors import UserError


def make_config(tmp_path: Path, **data: object) -> Config:
    data.setdefault("cache_dir", str(tmp_path / "cache"))
    data.setdefault("val_fraction", 0.2)
    return validate({"data": data, "train": {"seq_len": 8, "batch_size": 2}})


def documents(n: int, start: int = 0) -> list[str]:
    """Distinct documents of a few lines, with non-ASCII text; long enough for seq_len 8."""
    return [f"document {i}: déjà vu 東京\n" + "line\n" * (i % 3 + 1) for i in range(start, start + n)]


def decoded(bundle: DataBundle, tokens: object) -> list[str]:
    """The documents of a byte-tokenised stream: the text between end-of-text tokens."""
    ids = np.asarray(tokens).tolist()
    docs, start = [], 0
    for i, token in enumerate(ids):
        if token == bundle.tokenizer.eos_id:
            docs.append(bundle.tokenizer.decode(ids[start:i]))
            start = i + 1
    assert start == len(ids), "a stream ends with end-of-text"
    return docs


def splits(tmp_path: Path, source: str, run: str = "run", **data: object) -> tuple[list[str], list[str]]:
    bundle = build_data(make_config(tmp_path, source=source, **data), tmp_path / run)
    return decoded(bundle, bundle.train_tokens), decoded(bundle, bundle.val_tokens)


def jsonl_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def write_compressed(path: Path, raw: bytes) -> Path:
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(raw))
    elif path.name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(raw))
    else:
        path.write_bytes(raw)
    return path


def assert_one_line_error(info: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------------- compressed JSONL


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_compressed_jsonl_gives_the_plain_files_token_streams(tmp_path: Path, suffix: str) -> None:
    docs = documents(30)
    raw = jsonl_bytes([{"text": d, "id": i} for i, d in enumerate(docs)])
    plain = write_compressed(tmp_path / "docs.jsonl", raw)
    packed = write_compressed(tmp_path / f"docs{suffix}", raw)
    reference = build_data(make_config(tmp_path, source=f"jsonl:{plain}"), tmp_path / "r1")
    bundle = build_data(make_config(tmp_path, source=f"jsonl:{packed}"), tmp_path / "r2")
    np.testing.assert_array_equal(np.asarray(bundle.train_tokens), np.asarray(reference.train_tokens))
    np.testing.assert_array_equal(np.asarray(bundle.val_tokens), np.asarray(reference.val_tokens))
    held_out = jsonl_held_out_lines(packed, 0.2)
    assert held_out == jsonl_held_out_lines(plain, 0.2)
    assert decoded(bundle, bundle.val_tokens) == [d for i, d in enumerate(docs) if i in held_out]
    assert decoded(bundle, bundle.train_tokens) == [d for i, d in enumerate(docs) if i not in held_out]


def test_zst_of_several_frames_is_read_whole(tmp_path: Path) -> None:
    records = [{"text": d} for d in documents(12)]
    frames = b"".join(zstandard.ZstdCompressor().compress(jsonl_bytes([r])) for r in records)
    (tmp_path / "docs.jsonl.zst").write_bytes(frames)
    train, val = splits(tmp_path, f"jsonl:{tmp_path / 'docs.jsonl.zst'}")
    assert sorted(train + val) == sorted(r["text"] for r in records)


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
@pytest.mark.parametrize("damage", ["not compressed", "truncated"])
def test_damaged_compressed_jsonl_is_a_one_line_error(tmp_path: Path, suffix: str, damage: str) -> None:
    path = tmp_path / f"docs{suffix}"
    if damage == "not compressed":
        path.write_bytes(b"this is not compressed at all\n" * 4)
    else:  # cut in the middle: an error, never a silently shorter corpus
        whole = write_compressed(tmp_path / f"whole{suffix}", jsonl_bytes([{"text": d} for d in documents(400)]))
        path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(UserError) as info:
        splits(tmp_path, f"jsonl:{path}")
    assert_one_line_error(info, str(path), "cannot be read as")


def test_jsonl_directory_and_glob_split_by_file_and_line(tmp_path: Path) -> None:
    root = tmp_path / "shards"
    root.mkdir()
    first, second, third = documents(10), documents(10, start=10), documents(10, start=20)
    write_compressed(root / "a.jsonl", jsonl_bytes([{"text": d} for d in first]))
    write_compressed(root / "b.jsonl.gz", jsonl_bytes([{"text": d} for d in second]))
    (root / "notes.txt").write_text("not a shard")  # not JSONL: left out
    train, val = splits(tmp_path, f"jsonl:{root}")
    names = [f"a.jsonl:line{i}" for i in range(10)] + [f"b.jsonl.gz:line{i}" for i in range(10)]
    mask = validation_mask(names, 0.2)
    assert val == [d for d, v in zip(first + second, mask, strict=True) if v]
    assert train == [d for d, v in zip(first + second, mask, strict=True) if not v]
    globbed = splits(tmp_path, f"jsonl:{root}/*.jsonl*", run="globbed")
    assert globbed == (train, val)
    # A third shard keeps every earlier document on its side.
    write_compressed(root / "c.jsonl.zst", jsonl_bytes([{"text": d} for d in third]))
    train2, val2 = splits(tmp_path, f"jsonl:{root}", run="grown")
    assert set(val) <= set(val2) and set(train) <= set(train2)
    assert sorted(train2 + val2) == sorted(first + second + third)


def test_supervised_prompt_completion_jsonl_works_compressed(tmp_path: Path) -> None:
    raw = jsonl_bytes([{"prompt": f"q{i}:", "completion": f"a{i}"} for i in range(20)])
    rows = {}
    for name in ("pc.jsonl", "pc.jsonl.gz", "pc.jsonl.zst"):
        path = write_compressed(tmp_path / name, raw)
        cfg = load_config("gpt_tiny", [f"data.source=jsonl:{path}", f"data.cache_dir={tmp_path / 'cache'}",
                                       "data.val_fraction=0.2"])
        assert cfg.data.format == "auto"
        bundle = build_data(cfg, tmp_path / f"run-{name}")
        rows[name] = (np.asarray(bundle.train_tokens), np.asarray(bundle.val_tokens))
    assert rows["pc.jsonl"][0].ndim == 2  # examples, not a token stream
    for name in ("pc.jsonl.gz", "pc.jsonl.zst"):
        for got, want in zip(rows[name], rows["pc.jsonl"], strict=True):
            np.testing.assert_array_equal(got, want)


def test_supervised_formats_refuse_a_jsonl_directory(tmp_path: Path) -> None:
    write_compressed(tmp_path / "pc.jsonl", jsonl_bytes([{"prompt": "q:", "completion": "a"}] * 4))
    cfg = make_config(tmp_path, source=f"jsonl:{tmp_path}", format="prompt_completion")
    with pytest.raises(UserError) as info:
        build_data(cfg, tmp_path / "run")
    assert_one_line_error(info, "one JSONL file", f"jsonl:{tmp_path}")


# ---------------------------------------------------------------- Parquet


def write_parquet(path: Path, texts: list, row_group_size: int = 4, field: str = "text") -> Path:
    table = pa.table({field: pa.array(texts, type=pa.string()), "n": list(range(len(texts)))})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_files_split_by_file_and_row(tmp_path: Path) -> None:
    root = tmp_path / "pq"
    root.mkdir()
    first, second = documents(13), documents(9, start=13)
    write_parquet(root / "part-0.parquet", first)
    write_parquet(root / "part-1.parquet", second, row_group_size=2)
    train, val = splits(tmp_path, f"parquet:{root}")
    names = [f"part-0.parquet:row{i}" for i in range(13)] + [f"part-1.parquet:row{i}" for i in range(9)]
    mask = validation_mask(names, 0.2)
    assert val == [d for d, v in zip(first + second, mask, strict=True) if v]
    assert train == [d for d, v in zip(first + second, mask, strict=True) if not v]
    assert splits(tmp_path, f"parquet:{root}/part-*.parquet", run="glob") == (train, val)
    # Deterministic, and stable when a file is added.
    assert splits(tmp_path, f"parquet:{root}", run="again") == (train, val)
    third = documents(7, start=22)
    write_parquet(root / "part-2.parquet", third)
    train2, val2 = splits(tmp_path, f"parquet:{root}", run="grown")
    assert train2[: len(train)] == train and val2[: len(val)] == val
    assert sorted(train2 + val2) == sorted(first + second + third)


def test_parquet_single_file_and_text_field(tmp_path: Path) -> None:
    docs = documents(10)
    path = write_parquet(tmp_path / "one.parquet", docs, field="body")
    train, val = splits(tmp_path, f"parquet:{path}", text_field="body")
    assert sorted(train + val) == sorted(docs) and train and val
    with pytest.raises(UserError) as info:
        splits(tmp_path, f"parquet:{path}", run="r2")
    assert_one_line_error(info, str(path), "no column 'text'", "body")


def test_parquet_null_text_is_an_error_or_skipped_and_counted(tmp_path: Path, capsys) -> None:
    docs: list[str | None] = list(documents(10))
    docs[6] = None
    path = write_parquet(tmp_path / "nulls.parquet", docs)
    with pytest.raises(UserError) as info:
        splits(tmp_path, f"parquet:{path}")
    assert_one_line_error(info, str(path), "row 6", "null")
    train, val = splits(tmp_path, f"parquet:{path}", run="skip", skip_bad_records=True)
    assert sorted(train + val) == sorted(d for d in docs if d is not None)
    assert "skipped 1 rows with a null text" in capsys.readouterr().err


def test_parquet_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text("just text\n")
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), numbers)
    for source, fragments in (
        (f"parquet:{tmp_path / 'missing.parquet'}", ("missing.parquet", "not found")),
        (f"parquet:{not_parquet}", (str(not_parquet), "not a readable Parquet file")),
        (f"parquet:{numbers}", (str(numbers), "int64, not text")),
        (f"parquet:{tmp_path}/*.none", ("no files (.parquet)",)),
    ):
        with pytest.raises(UserError) as info:
            splits(tmp_path, source)
        assert_one_line_error(info, *fragments)


# ---------------------------------------------------------------- Hugging Face save_to_disk


def write_saved_dataset(folder: Path, texts: list[str], batch_rows: int = 3) -> None:
    """One split as `Dataset.save_to_disk` lays it out: an Arrow IPC stream file, state.json
    listing it in `_data_files`, and dataset_info.json (features)."""
    folder.mkdir(parents=True)
    table = pa.table({"text": pa.array(texts, type=pa.string()), "id": list(range(len(texts)))})
    name = "data-00000-of-00001.arrow"
    with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    state = {"_data_files": [{"filename": name}], "_fingerprint": "0123456789abcdef", "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (folder / "state.json").write_text(json.dumps(state))
    info = {"features": {"text": {"dtype": "string", "_type": "Value"}, "id": {"dtype": "int64", "_type": "Value"}}}
    (folder / "dataset_info.json").write_text(json.dumps(info))


def write_saved_dataset_dict(root: Path, splits_texts: dict[str, list[str]]) -> None:
    root.mkdir(parents=True)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": list(splits_texts)}))
    for split, texts in splits_texts.items():
        write_saved_dataset(root / split, texts)


@pytest.mark.parametrize("held_out", ["validation", "test"])
def test_hf_dataset_dict_uses_its_own_splits_in_order(tmp_path: Path, held_out: str) -> None:
    train_docs, held_docs = documents(10), documents(4, start=10)
    saved = tmp_path / "saved"
    splits_texts = {"train": train_docs, held_out: held_docs}
    if held_out == "validation":
        splits_texts["test"] = documents(3, start=50)  # validation wins over test
    write_saved_dataset_dict(saved, splits_texts)
    assert splits(tmp_path, f"hf_disk:{saved}") == (train_docs, held_docs)


def test_hf_single_dataset_is_split_by_row_hash(tmp_path: Path) -> None:
    docs = documents(17)
    saved = tmp_path / "one"
    write_saved_dataset(saved, docs)
    train, val = splits(tmp_path, f"hf_disk:{saved}")
    mask = validation_mask([f"data-00000-of-00001.arrow:row{i}" for i in range(17)], 0.2)
    assert val == [d for d, v in zip(docs, mask, strict=True) if v]
    assert train == [d for d, v in zip(docs, mask, strict=True) if not v]
    assert splits(tmp_path, f"hf_disk:{saved}", run="again") == (train, val)


def test_hf_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    write_saved_dataset_dict(saved, {"train": documents(5), "validation": documents(2, start=5)})
    arrow = saved / "train" / "data-00000-of-00001.arrow"
    for source, fragments in (
        (f"hf_disk:{tmp_path / 'nowhere'}", ("nowhere", "not found")),
        (f"hf_disk:{saved / 'train' / 'state.json'}", ("not found",)),
        (f"hf_disk:{tmp_path}", ("neither dataset_dict.json nor state.json",)),
    ):
        with pytest.raises(UserError) as info:
            splits(tmp_path, source)
        assert_one_line_error(info, *fragments)
    with pytest.raises(UserError) as info:
        splits(tmp_path, f"hf_disk:{saved}", text_field="body")
    assert_one_line_error(info, str(arrow), "no column 'body'", "text, id")
    arrow.write_bytes(b"not arrow at all" * 10)
    with pytest.raises(UserError) as info:
        splits(tmp_path, f"hf_disk:{saved}", run="damaged")
    assert_one_line_error(info, str(arrow), "not a readable Arrow IPC stream file")
    state = saved / "train" / "state.json"
    state.write_text(json.dumps({"_data_files": [{"filename": "../validation/data-00000-of-00001.arrow"}]}))
    with pytest.raises(UserError) as info:
        splits(tmp_path, f"hf_disk:{saved}", run="escape")
    assert_one_line_error(info, str(state), "bad _data_files entry")


def test_cli_prepare_of_a_bad_parquet_file_is_one_error_line(tmp_path: Path, capsys) -> None:
    fake = tmp_path / "fake.parquet"
    fake.write_text("just text\n")
    args = ["prepare", "gpt_tiny", f"data.source=parquet:{fake}", f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={tmp_path / 'run'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # Progress lines of a cold cache may come first; the error is one line, the last.
    assert [line for line in err if line.startswith("error: ")] == err[-1:] and str(fake) in err[-1]
    assert fake.read_text() == "just text\n"  # bad input is never touched


def test_unknown_source_kind_lists_every_kind(tmp_path: Path) -> None:
    with pytest.raises(UserError) as info:
        splits(tmp_path, "csv:/data.csv")
    assert_one_line_error(info, "csv:/data.csv", "stdlib", "text:PATH", "jsonl:PATH", "parquet:PATH",
                          "hf_disk:DIR", "tfds:NAME")
