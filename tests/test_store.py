"""The token store: ArrayRecord shards read back as the token stream, built in bounded memory by
1 or N tokenising processes, serving the same training batches as an in-memory array."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pytest

from llm_jax.cli import main
from llm_jax.config import Config, validate
from llm_jax.data import build_data, eval_batches, train_dataset
from llm_jax.data import encode_groups as encode_module
from llm_jax.data.build import prepare_data
from llm_jax.data.encode_groups import encoded_stream, token_dtype
from llm_jax.data.sources import open_corpus
from llm_jax.data.store import StoreWriter, TokenStore, write_store
from llm_jax.data.tokenizer import ByteTokenizer, HFTokenizer, encode_documents
from llm_jax.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
WORDS = "def return class self None café 東京 😀 alpha beta\n    ".split(" ")


def random_docs(seed: int, n: int, max_words: int = 12) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(0, max_words)))) for _ in range(n)]


def byte_stream(docs: list[str]) -> np.ndarray:
    """The reference: each document's UTF-8 bytes, then EOS (256)."""
    parts = [np.append(np.frombuffer(d.encode("utf-8"), np.uint8).astype(np.uint16), 256) for d in docs]
    return np.concatenate(parts)


def text_corpus(root: Path, n_files: int, seed: int = 0) -> Path:
    root.mkdir(parents=True)
    for i, doc in enumerate(random_docs(seed, n_files, max_words=400)):
        (root / f"doc{i:03d}.py").write_text(f"# file {i}\n{doc}\n", encoding="utf-8")
    return root


def make_config(tmp_path: Path, source: str, **data: object) -> Config:
    return validate({"data": {"source": source, "cache_dir": str(tmp_path / "cache"), **data},
                     "train": {"seq_len": 16, "batch_size": 8}, "run": {"dir": str(tmp_path / "run")}})


# ---------------------------------------------------------------- format


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_round_trip_across_records_and_shards(tmp_path: Path, dtype: type) -> None:
    docs = random_docs(1, 60)
    expected = byte_stream(docs).astype(dtype)
    # Pieces of irregular sizes, some longer than a record, some shorter.
    cuts = np.cumsum(np.random.default_rng(2).integers(0, 40, size=len(expected)))
    pieces = np.split(expected, cuts[cuts < len(expected)])
    store = write_store(tmp_path / "s", pieces, np.dtype(dtype), 256, {"split": "train"},
                        chunk_tokens=7, shard_tokens=21)
    assert (len(store), store.shape, store.ndim, store.dtype) == (len(expected), expected.shape, 1, np.dtype(dtype))
    np.testing.assert_array_equal(np.asarray(store), expected)
    n = len(expected)
    edges = sorted({0, 1, 6, 7, 8, 20, 21, 22, 41, 42, 43, n // 2, n - 22, n - 8, n - 1, n})
    for a in edges:
        for b in edges:
            np.testing.assert_array_equal(store[a:b], expected[a:b])
    for a, b in ((-30, None), (None, -5), (-1, None), (5, 2), (0, n + 100)):
        np.testing.assert_array_equal(store[a:b], expected[a:b])
    np.testing.assert_array_equal(store[3:100:4], expected[3:100:4])
    assert [store[i] for i in (0, 21, n - 1, -1)] == [expected[i] for i in (0, 21, n - 1, -1)]
    with pytest.raises(IndexError):
        store[n]
    assert store.max() == expected.max()

    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["split"] == "train" and manifest["tokens"] == n and manifest["dtype"] == np.dtype(dtype).name
    assert (manifest["chunk_tokens"], manifest["shard_tokens"]) == (7, 21)
    shards = manifest["shards"]
    assert [s["tokens"] for s in shards] == [len(expected[i : i + 21]) for i in range(0, n, 21)]
    assert sum(s["documents"] for s in shards) == len(docs)
    assert [s["documents"] for s in shards] == [int((expected[i:i + 21] == 256).sum()) for i in range(0, n, 21)]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted([s["file"] for s in shards] + ["manifest.json"])

    copy = pickle.loads(pickle.dumps(store))  # as Grain may copy a source: reopens lazily
    np.testing.assert_array_equal(copy[40:90], expected[40:90])

    (tmp_path / "s" / shards[1]["file"]).unlink()  # a damaged store is a user error naming it
    with pytest.raises(UserError, match="shard-00001.array_record.*delete the directory"):
        TokenStore(tmp_path / "s")[21:30]


def test_empty_stream_and_dtype_choice(tmp_path: Path) -> None:
    store = write_store(tmp_path / "empty", [], np.dtype(np.uint16), 256, {})
    assert len(store) == 0 and np.asarray(store).shape == (0,) and store.manifest["shards"] == []
    assert token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.int32


def test_a_failed_or_killed_build_leaves_nothing_complete(tmp_path: Path) -> None:
    def failing():
        yield np.arange(50, dtype=np.uint16)
        raise UserError("source broke")

    with pytest.raises(UserError, match="source broke"):
        write_store(tmp_path / "s", failing(), np.dtype(np.uint16), 256, {}, chunk_tokens=8, shard_tokens=16)
    assert list(tmp_path.iterdir()) == []  # no store, no temporary directory
    # A directory without a manifest (a build killed after its rename? a copy cut short) is refused.
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "shard-00000.array_record").write_bytes(b"partial")
    with pytest.raises(UserError, match="not a complete token store"):
        TokenStore(tmp_path / "half")
    with pytest.raises(UserError, match="never overwritten"):
        StoreWriter(tmp_path / "half", np.dtype(np.uint16), 256)
    assert (tmp_path / "half" / "shard-00000.array_record").read_bytes() == b"partial"


def test_cache_skips_a_killed_build_and_refuses_a_foreign_directory(tmp_path: Path) -> None:
    corpus = text_corpus(tmp_path / "corpus", 12)
    cfg = make_config(tmp_path, f"text:{corpus}")
    expected = np.asarray(build_data(cfg, tmp_path / "run").train_tokens)
    folder = tmp_path / "cache" / "tokens"
    stores = sorted(p for p in folder.iterdir() if p.is_dir())
    # Killed mid-build: the temporary directory holds shards but no manifest, the store is absent.
    killed = folder / f".{stores[0].name}.x1y2.tmp"
    stores[0].rename(killed)
    (killed / "manifest.json").unlink()
    again = build_data(cfg, tmp_path / "run")
    np.testing.assert_array_equal(np.asarray(again.train_tokens), expected)
    assert not killed.exists()
    # A directory under a store's name without a manifest is not this cache's: refused, kept.
    (stores[1] / "manifest.json").rename(stores[1] / "kept.json")
    with pytest.raises(UserError, match="not a complete token store"):
        build_data(cfg, tmp_path / "run")
    assert (stores[1] / "kept.json").is_file()


# ---------------------------------------------------------------- workers and memory


def test_one_and_two_workers_give_the_same_tokens(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(encode_module, "ENCODE_GROUP_CHARS", 3000)  # many groups per split
    corpus = text_corpus(tmp_path / "corpus", 40)
    cfg = make_config(tmp_path, f"text:{corpus}", tokenizer="sentencepiece", sp_vocab_size=600)
    one = prepare_data(cfg, tmp_path / "run", workers=1)
    first = {p.split: np.asarray(p.store) for p in one}
    for p in one:
        assert p.seconds is not None and p.store.manifest["bytes"] > 0
    for p in (tmp_path / "cache" / "tokens").iterdir():
        p.rename(tmp_path / f"one-{p.name}")
    two = prepare_data(cfg, tmp_path / "run", workers=2)
    assert {p.split for p in two} == {"train", "validation"}
    tokenizer = build_data(cfg, tmp_path / "run").tokenizer
    documents = open_corpus(cfg.data, tmp_path / "cache").documents
    for p in two:
        np.testing.assert_array_equal(np.asarray(p.store), first[p.split])
        reference = encode_documents(tokenizer, list(documents(p.split)))
        np.testing.assert_array_equal(np.asarray(p.store), reference)
        assert p.store.manifest["documents"] == sum(1 for _ in documents(p.split))


def test_joined_text_gives_the_same_tokens_with_workers(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(encode_module, "ENCODE_GROUP_CHARS", 500)
    pieces = random_docs(5, 200)
    one = np.concatenate([g.tokens for g in encoded_stream(pieces, ByteTokenizer(), joined=True)])
    two = np.concatenate([g.tokens for g in encoded_stream(pieces, ByteTokenizer(), joined=True, workers=2)])
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one, byte_stream(["".join(pieces)]))  # one text, one EOS


def test_hugging_face_tokenizer_travels_to_workers(monkeypatch) -> None:
    monkeypatch.setattr(encode_module, "ENCODE_GROUP_CHARS", 400)
    tokenizer = HFTokenizer(ROOT / "tests" / "fixtures" / "hf" / "gpt2" / "tokenizer.json")
    docs = random_docs(8, 120)
    one = np.concatenate([g.tokens for g in encoded_stream(docs, tokenizer, joined=False)])
    two = np.concatenate([g.tokens for g in encoded_stream(docs, tokenizer, joined=False, workers=2)])
    np.testing.assert_array_equal(two, one)
    np.testing.assert_array_equal(one, encode_documents(tokenizer, docs))


class DyingTokenizer(ByteTokenizer):
    """Kills the worker process that meets the document "die" (as the kernel's OOM killer would)."""

    def encode_documents(self, docs):
        if "die" in docs:
            os._exit(1)
        return super().encode_documents(docs)


def test_a_killed_worker_fails_the_build_instead_of_hanging_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(encode_module, "ENCODE_GROUP_CHARS", 1)  # one document per group
    docs = ["a", "b", "die", "c", "d"]
    with pytest.raises(BrokenProcessPool):
        write_store(tmp_path / "s", (g.tokens for g in encoded_stream(docs, DyingTokenizer(), False, workers=2)),
                    np.dtype(np.uint16), 256, {})
    assert list(tmp_path.iterdir()) == []


def test_workers_read_ahead_a_bounded_number_of_groups(monkeypatch) -> None:
    monkeypatch.setattr(encode_module, "ENCODE_GROUP_CHARS", 100)
    drawn = []

    def documents():
        for i in range(10_000):  # 10,000 groups of one 100-character document
            drawn.append(i)
            yield "x" * 100

    stream = encoded_stream(documents(), ByteTokenizer(), joined=False, workers=2)
    for _ in range(3):
        next(stream)
    # 2 x workers groups in flight beyond the 3 consumed (Pool.imap would have drawn all 10,000).
    assert len(drawn) <= 3 + 2 * 2 + 1
    stream.close()


MEMORY_PROBE = """
import resource, sys
from llm_jax.cli import main
if __name__ == "__main__":  # workers re-import the main module
    code = main(sys.argv[1:])
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
    sys.exit(code)
"""


def _peak_rss_mib(tmp_path: Path, corpus: Path, name: str) -> tuple[float, str]:
    probe = tmp_path / "probe.py"
    probe.write_text(MEMORY_PROBE)
    result = subprocess.run(
        [sys.executable, str(probe), "prepare", "gpt_tiny", f"data.source=text:{corpus}", "data.max_bytes=0",
         f"data.cache_dir={tmp_path / name}", f"run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    return int(lines[-1]) / 1024, "\n".join(lines[:-1])


@pytest.mark.slow
def test_prepare_memory_is_bounded_by_a_group_not_the_corpus(tmp_path: Path) -> None:
    # 450 files of 1 MB: 450 MB of text, 900 MB as uint16 tokens if it were held at once; at
    # most a few tokenising groups of ~8 M characters (and their tokens) are.
    big = tmp_path / "big"
    big.mkdir()
    block = "\n".join(random_docs(3, 20_000, max_words=20)).encode("utf-8")
    block = (block * (1_000_000 // len(block) + 1))[:1_000_000]
    for i in range(450):
        (big / f"f{i:03d}.txt").write_bytes(f"file {i}\n".encode() + block)
    small = text_corpus(tmp_path / "small", 3)
    baseline, _ = _peak_rss_mib(tmp_path, small, "cache_small")
    peak, printed = _peak_rss_mib(tmp_path, big, "cache_big")
    stores = [TokenStore(line.rsplit(": ", 1)[1]) for line in printed.splitlines()]
    assert sum(s.manifest["bytes"] for s in stores) == sum(p.stat().st_size for p in big.iterdir())
    assert sum(len(s) for s in stores) == sum(s.manifest["bytes"] + s.manifest["documents"] for s in stores)
    print(f"peak RSS {peak:.0f} MiB, tiny-corpus baseline {baseline:.0f} MiB")
    assert peak - baseline < 450 / 3, f"peak RSS grew by {peak - baseline:.0f} MiB over the tiny corpus's"


# ---------------------------------------------------------------- the training data path


def test_training_batches_from_a_store_equal_those_from_an_array(tmp_path: Path) -> None:
    corpus = text_corpus(tmp_path / "corpus", 20)
    cfg = make_config(tmp_path, f"text:{corpus}")
    bundle = build_data(cfg, tmp_path / "run")
    assert isinstance(bundle.train_tokens, TokenStore) and isinstance(bundle.val_tokens, TokenStore)
    documents = open_corpus(cfg.data, tmp_path / "cache").documents
    np.testing.assert_array_equal(np.asarray(bundle.train_tokens), byte_stream(list(documents("train"))))
    reference = np.asarray(bundle.train_tokens)
    # The same tokens in records of 5 and shards of 15: windows of 17 cross both boundaries.
    small = write_store(tmp_path / "small", [reference], reference.dtype, 256, {}, chunk_tokens=5, shard_tokens=15)
    n_windows = (len(reference) - 1) // 16
    steps = [0, 1, 5, n_windows // 8, n_windows // 8 + 1, 3 * n_windows // 8]  # into later epochs
    for tokens in (bundle.train_tokens, small):
        expected, stored = train_dataset(reference, 16, 8, seed=7), train_dataset(tokens, 16, 8, seed=7)
        halves = [train_dataset(tokens, 16, 8, seed=7, process_index=p, process_count=2) for p in (0, 1)]
        for step in steps:
            np.testing.assert_array_equal(stored[step], expected[step])
            np.testing.assert_array_equal(np.concatenate([halves[0][step], halves[1][step]]), expected[step])
    val = np.asarray(bundle.val_tokens)
    for got, want in zip(eval_batches(bundle.val_tokens, 16, 8, 3), eval_batches(val, 16, 8, 3), strict=True):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- llm-jax prepare


def test_prepare_command_builds_once_and_refuses_bad_input(tmp_path: Path, capsys) -> None:
    corpus = text_corpus(tmp_path / "corpus", 12)
    args = ["prepare", "gpt_tiny", f"data.source=text:{corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={tmp_path / 'run'}"]
    assert main(args) == 0
    built = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in built] == ["train", "validation"]
    assert all("documents" in line and "tokens/s" in line and "MB/s" in line for line in built)
    paths = [line.rsplit(": ", 1)[1] for line in built]
    mtimes = [(Path(p) / "manifest.json").stat().st_mtime_ns for p in paths]
    assert main([*args, "--workers", "2"]) == 0
    again = capsys.readouterr().out.splitlines()
    assert [line.rsplit(": ", 1)[1] for line in again] == paths and all(": exists (" in line for line in again)
    assert [(Path(p) / "manifest.json").stat().st_mtime_ns for p in paths] == mtimes

    examples = tmp_path / "sft.jsonl"
    examples.write_text('{"prompt": "a", "completion": "b"}\n')
    for bad in (["prepare", "gpt_tiny", "data.source=text:/no/such/dir", f"data.cache_dir={tmp_path / 'c2'}",
                 f"run.dir={tmp_path / 'run2'}"],
                [*args, "--workers", "0"],
                [*args, f"data.source=jsonl:{examples}"]):  # examples, not text: rows are built by train
        assert main(bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "c2" / "tokens").exists()
