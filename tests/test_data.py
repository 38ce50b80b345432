"""Data layer: sources, tokenizers, the token cache and the (seed, step)-determined Grain order."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from llm_jax.config import Config, validate
from llm_jax.data import BatchIterator, DataBundle, build_data, eval_batches, load_tokenizer, train_dataset
from llm_jax.data import build as build_module
from llm_jax.data.splits import cap_bytes, cap_prefix, line_chunks, tail_split, validation_mask
from llm_jax.data.tokenizer import ByteTokenizer
from llm_jax.errors import UserError

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega déjà vu naïve café straße 東京 😀").split()


def random_text(seed: int, n_lines: int) -> str:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_lines):
        indent = "    " * int(rng.integers(0, 3))
        lines.append(indent + " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))))
    return "\n".join(lines) + "\n"


def make_config(tmp_path: Path, seq_len: int = 16, **data: object) -> Config:
    data.setdefault("cache_dir", str(tmp_path / "cache"))
    return validate({"data": data, "train": {"seq_len": seq_len, "batch_size": 8}})


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(30):
        folder = root / "sub" if i % 3 else root
        (folder / f"doc{i:02d}.txt").write_text(random_text(i, 40), encoding="utf-8")
    (root / "image.bin").write_bytes(b"\x89PNG\0\0binary")  # skipped: not text
    return root


# ---------------------------------------------------------------- Grain order


def window_starts(batch: np.ndarray, tokens: np.ndarray, seq_len: int) -> list[int]:
    """Tokens are arange(n), so a window's first token is its start offset."""
    assert batch.shape[1] == seq_len + 1
    np.testing.assert_array_equal(batch[:, 1:] - batch[:, :-1], 1)
    return [int(row[0]) for row in batch]


def test_order_is_a_pure_function_of_seed_and_step() -> None:
    tokens = np.arange(4001, dtype=np.uint16)
    first, second = train_dataset(tokens, 16, 8, seed=3), train_dataset(tokens, 16, 8, seed=3)
    steps = [0, 7, 3, 250, 1, 10**9]
    forward = {s: first[s] for s in steps}
    backward = {s: second[s] for s in reversed(steps)}
    for s in steps:
        assert forward[s].dtype == np.int32 and forward[s].shape == (8, 17)
        np.testing.assert_array_equal(forward[s], backward[s])
    assert train_dataset(tokens, 16, 8, seed=-1)[0].shape == (8, 17)  # any int seed works
    other_seed = train_dataset(tokens, 16, 8, seed=4)
    assert not all(np.array_equal(other_seed[s], forward[s]) for s in steps)


def test_neighbouring_seeds_do_not_share_epochs() -> None:
    # Grain seeds epoch e with seed+e: unmixed, seed 4's epoch 0 would be seed 3's epoch 1.
    tokens = np.arange(16 * 4 + 1)  # 16 windows: 2 steps of 8 per epoch
    seed3, seed4 = train_dataset(tokens, 4, 8, seed=3), train_dataset(tokens, 4, 8, seed=4)
    assert not np.array_equal(np.concatenate([seed4[0], seed4[1]]),
                              np.concatenate([seed3[2], seed3[3]]))


def test_no_window_repeats_within_an_epoch_and_epochs_differ() -> None:
    seq_len, batch = 10, 8
    tokens = np.arange(seq_len * 96 + 1, dtype=np.int32)  # 96 windows = 12 steps per epoch
    ds = train_dataset(tokens, seq_len, batch, seed=0)
    stream = [s for step in range(24) for s in window_starts(ds[step], tokens, seq_len)]
    epoch0, epoch1 = stream[:96], stream[96:]
    assert sorted(epoch0) == list(range(0, seq_len * 96, seq_len))
    assert sorted(epoch1) == sorted(epoch0)
    assert epoch0 != epoch1  # a fresh permutation each epoch
    assert epoch0 != sorted(epoch0)  # actually shuffled


def test_epoch_boundary_inside_a_batch() -> None:
    tokens = np.arange(10 * 20 + 1)  # 20 windows, batch 8: epochs end mid-batch
    ds = train_dataset(tokens, 10, 8, seed=1)
    stream = [s for step in range(5) for s in window_starts(ds[step], tokens, 10)]
    assert sorted(stream[:20]) == sorted(stream[20:40]) == list(range(0, 200, 10))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(process_count: int) -> None:
    tokens = np.arange(3001, dtype=np.uint16)
    whole = train_dataset(tokens, 12, 8, seed=5)
    parts = [train_dataset(tokens, 12, 8, 5, p, process_count) for p in range(process_count)]
    for step in (0, 1, 17, 400):
        local = [part[step] for part in parts]
        assert all(x.shape == (8 // process_count, 13) for x in local)
        np.testing.assert_array_equal(np.concatenate(local), whole[step])


def test_batch_must_divide_over_processes() -> None:
    with pytest.raises(UserError, match="not divisible"):
        train_dataset(np.arange(100), 4, 6, 0, 0, 4)


def test_too_few_tokens_is_a_user_error() -> None:
    with pytest.raises(UserError, match="fewer than"):
        train_dataset(np.arange(10), 16, 2, 0)


def test_eval_batches_are_fixed_in_order_and_wrap() -> None:
    tokens = np.arange(5 * 8 + 1)  # 8 windows of 5
    first = eval_batches(tokens, 5, 4, 3)
    again = eval_batches(tokens, 5, 4, 3)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    starts = [int(row[0]) for batch in first for row in batch]
    assert starts == [(i % 8) * 5 for i in range(12)]
    halves = [eval_batches(tokens, 5, 4, 3, p, 2) for p in range(2)]
    for b in range(3):
        np.testing.assert_array_equal(np.concatenate([halves[0][b], halves[1][b]]), first[b])


# ---------------------------------------------------------------- iterator


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_batch_iterator_yields_the_steps_in_order(prefetch: int) -> None:
    ds = train_dataset(np.arange(2001), 8, 4, seed=2)
    calls = []

    def to_global(batch: np.ndarray) -> np.ndarray:
        calls.append(threading.current_thread().name)
        return batch * 1

    it = BatchIterator(ds, 5, 12, prefetch, to_global)
    assert it.get_state()["next_step"] == 5
    got = []
    for step, batch in it:
        np.testing.assert_array_equal(batch, ds[step])
        got.append(step)
        assert it.get_state()["next_step"] == step + 1
    assert got == list(range(5, 12))
    state = it.get_state()
    assert state["next_step"] == 12 and state["seed"] == 2
    json.dumps(state)
    if prefetch:
        assert set(calls) == {"llm_jax-batches"}  # the conversion ran off the main thread
    it.close()
    it.close()


def test_batch_iterator_close_midway_and_errors() -> None:
    ds = train_dataset(np.arange(2001), 8, 4, seed=2)
    it = BatchIterator(ds, 0, 10**6, 2, lambda b: b)
    assert next(it)[0] == 0
    it.close()
    assert it.get_state()["next_step"] == 1
    with pytest.raises(StopIteration):
        next(it)

    def failing(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("device full")

    bad = BatchIterator(ds, 0, 5, 2, failing)
    with pytest.raises(RuntimeError, match="device full"):
        next(bad)
    bad.close()


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_bad_ids() -> None:
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo 東京 😀'\n"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert tok.vocab_size == 257 and tok.eos_id == 256
    # EOS and padding ids dropped, a character cut short replaced.
    assert tok.decode([104, 105, 256, 300, -1, 0xE6, 0x9D]) == "hi\ufffd"
    stream = tok.encode_documents(["ab", "", "é"])
    assert stream.tolist() == [97, 98, 256, 256, 0xC3, 0xA9, 256]


def test_sentencepiece_trains_saves_and_reloads(tmp_path: Path, text_dir: Path) -> None:
    cfg = make_config(tmp_path, source=f"text:{text_dir}", tokenizer="sentencepiece", sp_vocab_size=600)
    run_dir = tmp_path / "run"
    bundle = build_data(cfg, run_dir)
    model = run_dir / "tokenizer" / "sp.model"
    assert model.is_file()
    tok = bundle.tokenizer
    assert tok.name == "sentencepiece" and 300 < tok.vocab_size <= 600
    sample = "    alpha beta déjà vu 東京 😀 unseen: ß→∑\n\tgamma\n"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample  # whitespace verbatim, unseen chars via byte fallback
    assert len(ids) < len(sample.encode("utf-8"))  # it learned merges
    assert tok.decode(ids + [tok.vocab_size + 5, -3]) == sample
    reloaded = load_tokenizer(cfg, run_dir)
    assert reloaded.encode(sample) == ids and reloaded.eos_id == tok.eos_id
    assert int(bundle.train_tokens.max()) < tok.vocab_size
    assert (np.asarray(bundle.train_tokens) == tok.eos_id).sum() > 0
    # A second run directory on the same data reuses the trained model from the cache.
    build_data(cfg, tmp_path / "run2")
    assert (tmp_path / "run2" / "tokenizer" / "sp.model").read_bytes() == model.read_bytes()


def _tiny_hf_tokenizer(path: Path, specials: list[str]) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([random_text(i, 20) for i in range(10)], trainer)
    tok.save(str(path))
    return path


def test_hf_tokenizer_is_copied_into_the_run(tmp_path: Path, text_dir: Path) -> None:
    source = _tiny_hf_tokenizer(tmp_path / "tok.json", ["<pad>", "<|endoftext|>"])
    cfg = make_config(tmp_path, source=f"text:{text_dir}", tokenizer=f"hf:{source}")
    run_dir = tmp_path / "run"
    bundle = build_data(cfg, run_dir)
    copied = run_dir / "tokenizer" / "tokenizer.json"
    assert copied.read_bytes() == source.read_bytes()
    tok = bundle.tokenizer
    assert tok.name == "hf" and tok.eos_id == 1
    sample = "alpha omega café 😀"
    assert tok.decode(tok.encode(sample)) == sample
    source.unlink()  # generation needs only the run directory
    assert load_tokenizer(cfg, run_dir).encode(sample) == tok.encode(sample)


def test_hf_tokenizer_without_eos_is_refused(tmp_path: Path, text_dir: Path) -> None:
    source = _tiny_hf_tokenizer(tmp_path / "noeos.json", ["<pad>"])
    cfg = make_config(tmp_path, source=f"text:{text_dir}", tokenizer=f"hf:{source}")
    with pytest.raises(UserError, match="noeos.json"):
        build_data(cfg, tmp_path / "run")


def test_init_from_a_run_takes_its_tokenizer(tmp_path: Path, text_dir: Path) -> None:
    """A run started from another run's parameters reads text with that run's tokenizer. A
    sentencepiece model trained here on other data (another data.max_bytes) would number the
    pieces differently, and the embeddings, of the same shape, would load into the wrong rows."""
    from llm_jax.runtime.run_dir import write_run_config
    def config(init_from: str = "", **data: object) -> Config:
        data = {"source": f"text:{text_dir}", "cache_dir": str(tmp_path / "cache"), **data}
        return validate({"data": data, "train": {"seq_len": 16, "batch_size": 8},
                         "checkpoint": {"init_from": init_from}})

    source = tmp_path / "source"
    source_cfg = config(tokenizer="sentencepiece", sp_vocab_size=600, max_bytes=6000)
    build_data(source_cfg, source)
    write_run_config(source_cfg, source)
    model = (source / "tokenizer" / "sp.model").read_bytes()
    other = config(tokenizer="sentencepiece", sp_vocab_size=600)
    build_data(other, tmp_path / "fresh")  # what a fine-tune on all the data used to get
    assert (tmp_path / "fresh" / "tokenizer" / "sp.model").read_bytes() != model
    tuned = build_data(config(str(source), tokenizer="sentencepiece", sp_vocab_size=600), tmp_path / "tuned")
    assert (tmp_path / "tuned" / "tokenizer" / "sp.model").read_bytes() == model
    assert tuned.tokenizer.fingerprint == load_tokenizer(source_cfg, source).fingerprint
    with pytest.raises(UserError, match="data.tokenizer=sentencepiece, this run with data.tokenizer=byte"):
        build_data(config(str(source)), tmp_path / "bytes")
    hf = _tiny_hf_tokenizer(tmp_path / "tok.json", ["<pad>", "<|endoftext|>"])
    with pytest.raises(UserError, match="data.tokenizer=sentencepiece, this run with data.tokenizer=hf:"):
        build_data(config(str(source), tokenizer=f"hf:{hf}"), tmp_path / "hf")


# ---------------------------------------------------------------- sources and cache


def _decoded(bundle: DataBundle, tokens: np.ndarray) -> list[str]:
    eos = bundle.tokenizer.eos_id
    docs, ids = [], np.asarray(tokens).tolist()
    start = 0
    for i, t in enumerate(ids):
        if t == eos:
            docs.append(bundle.tokenizer.decode(ids[start:i]))
            start = i + 1
    return docs


def test_text_directory_splits_whole_files(tmp_path: Path, text_dir: Path) -> None:
    bundle = build_data(make_config(tmp_path, source=f"text:{text_dir}", val_fraction=0.2), tmp_path / "run")
    originals = {p.read_text(encoding="utf-8") for p in text_dir.rglob("*.txt")}
    train, val = _decoded(bundle, bundle.train_tokens), _decoded(bundle, bundle.val_tokens)
    assert len(train) + len(val) == 30 and val and train
    assert set(train) | set(val) == originals and not set(train) & set(val)
    val_bytes = sum(len(d.encode("utf-8")) for d in val)
    assert bundle.val_bytes_per_token == pytest.approx(val_bytes / (val_bytes + len(val)))


def test_text_glob_splits_whole_files(tmp_path: Path, text_dir: Path) -> None:
    globbed = build_data(make_config(tmp_path, source=f"text:{text_dir}/sub/*.txt"), tmp_path / "r1")
    train, val = _decoded(globbed, globbed.train_tokens), _decoded(globbed, globbed.val_tokens)
    originals = {p.read_text(encoding="utf-8") for p in (text_dir / "sub").glob("*.txt")}
    assert len(train) + len(val) == 20 and set(train) | set(val) == originals


@pytest.mark.parametrize("tokenizer", ["byte", "sentencepiece"])
def test_single_file_validation_is_its_tail(tmp_path: Path, tokenizer: str) -> None:
    single = tmp_path / "one.txt"
    # ~200 KB: several line chunks per split, so the joining of chunks is exercised.
    text = random_text(99, 4000)
    single.write_text(text, encoding="utf-8")
    cfg = make_config(tmp_path, source=f"text:{single}", val_fraction=0.1, tokenizer=tokenizer,
                      sp_vocab_size=600)
    bundle = build_data(cfg, tmp_path / "run")
    eos = bundle.tokenizer.eos_id
    for tokens in (bundle.train_tokens, bundle.val_tokens):  # one stream each: one EOS, at the end
        ids = np.asarray(tokens)
        assert ids[-1] == eos and int((ids == eos).sum()) == 1
    train, val = _decoded(bundle, bundle.train_tokens), _decoded(bundle, bundle.val_tokens)
    assert len(train) == len(val) == 1
    assert train[0] + val[0] == text
    cut = len(train[0])
    assert text.endswith(val[0]) and val[0] == text[cut:]
    assert cut >= int(len(text) * 0.9) and text[cut - 1] == "\n"  # the first line start at/after 90%
    assert "\n" not in text[int(len(text) * 0.9) : cut - 1]
    val_bytes = len(val[0].encode("utf-8"))
    assert bundle.val_bytes_per_token == pytest.approx(val_bytes / len(bundle.val_tokens))


def test_single_file_max_bytes_takes_a_prefix_of_each_split(tmp_path: Path) -> None:
    single = tmp_path / "one.txt"
    text = random_text(7, 4000)
    single.write_text(text, encoding="utf-8")
    cfg = make_config(tmp_path, source=f"text:{single}", val_fraction=0.2, max_bytes=3000)
    bundle = build_data(cfg, tmp_path / "run")
    train, val = _decoded(bundle, bundle.train_tokens)[0], _decoded(bundle, bundle.val_tokens)[0]
    head, tail = tail_split(text, 0.2)
    # At most 3000 bytes, cut at a character boundary (the text has multi-byte characters).
    assert head.startswith(train) and tail.startswith(val)
    for part in (train, val):
        assert 2996 < len(part.encode("utf-8")) <= 3000


def test_jsonl_field(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    records = [{"body": f"record {i}: " + random_text(i, 3), "id": i} for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    bundle = build_data(make_config(tmp_path, source=f"jsonl:{path}", text_field="body"), tmp_path / "run")
    docs = _decoded(bundle, bundle.train_tokens) + _decoded(bundle, bundle.val_tokens)
    assert sorted(docs) == sorted(r["body"] for r in records)
    with path.open("a") as f:
        f.write(json.dumps({"text": "no body here"}) + "\n")
    with pytest.raises(UserError, match=r"docs\.jsonl:61: no field 'body'"):
        build_data(make_config(tmp_path, source=f"jsonl:{path}", text_field="body"), tmp_path / "run")


def test_stdlib_tfds_builder_splits_by_path(tmp_path: Path) -> None:
    from llm_jax.data import stdlib_tfds

    builder = stdlib_tfds.prepared_builder(tmp_path / "tfds", 0.05)
    shards = list(Path(builder.data_dir).glob("*.array_record-*"))
    assert {s.name.split(".")[0].split("-")[-1] for s in shards} == {"train", "validation"}
    train = {p for p, _ in stdlib_tfds.stdlib_documents(builder, "train")}
    val = {p for p, _ in stdlib_tfds.stdlib_documents(builder, "validation")}
    assert len(train) > 500 and len(val) > 10 and not train & val
    assert "os.py" in train | val and not any("site-packages" in p for p in train | val)
    assert abs(len(val) / (len(train) + len(val)) - 0.05) < 0.03
    assert "tensorflow" not in sys.modules


def test_stdlib_build_with_max_bytes_and_cache_reuse(tmp_path: Path, monkeypatch) -> None:
    cfg = make_config(tmp_path, source="stdlib", max_bytes=200_000)
    bundle = build_data(cfg, tmp_path / "run")
    for tokens in (bundle.train_tokens, bundle.val_tokens):
        n_docs = int((np.asarray(tokens) == 256).sum())
        assert 150_000 < len(tokens) - n_docs <= 200_000  # whole files up to the cap
    assert "def " in bundle.tokenizer.decode(bundle.train_tokens[:20000])
    cached = sorted((tmp_path / "cache" / "tokens").glob("*/manifest.json"))
    assert len(cached) == 2
    mtimes = [p.stat().st_mtime_ns for p in cached]

    def no_tokenising(*args: object) -> None:
        raise AssertionError("tokenised again instead of using the cache")

    monkeypatch.setattr(build_module, "_tokenise", no_tokenising)
    again = build_data(cfg, tmp_path / "run")
    np.testing.assert_array_equal(again.train_tokens, bundle.train_tokens)
    assert [p.stat().st_mtime_ns for p in cached] == mtimes
    assert again.val_bytes_per_token == bundle.val_bytes_per_token


def test_half_written_cache_is_not_used(tmp_path: Path, text_dir: Path) -> None:
    cfg = make_config(tmp_path, source=f"text:{text_dir}")
    expected = np.array(build_data(cfg, tmp_path / "run").train_tokens)
    folder = tmp_path / "cache" / "tokens"
    for store in [p for p in folder.iterdir() if p.is_dir()]:
        # As if killed mid-build: only the temporary directory beside the destination remains.
        store.rename(folder / f".{store.name}.killed.tmp")
        (folder / f".{store.name}.killed.tmp" / "manifest.json").unlink()
        (folder / f".{store.name}.killed.tmp" / "shard-00000.array_record").write_bytes(b"garbage")
    second = build_data(cfg, tmp_path / "run")
    np.testing.assert_array_equal(second.train_tokens, expected)
    assert not list(folder.glob("*.tmp*"))  # the leftovers are cleared by the next build


def test_changed_file_invalidates_the_cache(tmp_path: Path, text_dir: Path) -> None:
    cfg = make_config(tmp_path, source=f"text:{text_dir}", val_fraction=0.5)
    first = build_data(cfg, tmp_path / "run")
    (text_dir / "doc00.txt").write_text("changed " * 100, encoding="utf-8")
    second = build_data(cfg, tmp_path / "run")
    total = len(second.train_tokens) + len(second.val_tokens)
    assert total != len(first.train_tokens) + len(first.val_tokens)


def test_tfds_source_reads_a_prepared_dataset(tmp_path: Path) -> None:
    import tensorflow_datasets as tfds

    # Not registered: `tfds:NAME` must find it from its prepared files alone, as for any
    # dataset prepared elsewhere.
    class LlmJaxTestDocs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        code_path = None  # see stdlib_tfds.LlmJaxStdlib

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"content": tfds.features.Text(), "n": tfds.features.Scalar(np.int32)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 40), "test": self._generate_examples(40, 50)}

        def _generate_examples(self, lo: int, hi: int):
            for i in range(lo, hi):
                yield i, {"content": f"doc {i} " + random_text(i, 10), "n": i}

    data_dir = tmp_path / "tfds_data"
    LlmJaxTestDocs(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    cfg = make_config(tmp_path, source="tfds:llm_jax_test_docs", tfds_data_dir=str(data_dir),
                      text_field="content")
    bundle = build_data(cfg, tmp_path / "run")
    val = _decoded(bundle, bundle.val_tokens)
    assert sorted(int(d.split()[1]) for d in val) == list(range(40, 50))  # 'test' is the held-out split
    assert len(_decoded(bundle, bundle.train_tokens)) == 40
    bad_field = make_config(tmp_path, source="tfds:llm_jax_test_docs", tfds_data_dir=str(data_dir))
    with pytest.raises(UserError, match="no field 'text'"):
        build_data(bad_field, tmp_path / "run")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"source": "text:/no/such/place.txt"}, "/no/such/place.txt"),
        ({"source": "text:/no/such/dir/*.txt"}, r"/no/such/dir/\*\.txt"),
        ({"source": "jsonl:/no/such.jsonl"}, "/no/such.jsonl"),
        ({"source": "parquet:/x"}, "parquet:/x"),
        ({"source": "tfds:no_such_dataset_xyz"}, "no_such_dataset_xyz"),
        ({"source": "stdlib", "tokenizer": "wordpiece"}, "wordpiece"),
        ({"source": "stdlib", "tokenizer": "hf:/no/tok.json"}, "/no/tok.json"),
    ],
)
def test_bad_inputs_name_the_problem(tmp_path: Path, data: dict, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        build_data(make_config(tmp_path, **data), tmp_path / "run")
    assert "\n" not in str(info.value)


def test_corpus_too_small_for_seq_len(tmp_path: Path) -> None:
    small = tmp_path / "small.txt"
    small.write_text(random_text(1, 200), encoding="utf-8")
    with pytest.raises(UserError, match="fewer than train.seq_len"):
        build_data(make_config(tmp_path, seq_len=4096, source=f"text:{small}"), tmp_path / "run")


def test_split_helpers() -> None:
    names = [f"file{i}.py" for i in range(2000)]
    mask = validation_mask(names, 0.1)
    assert 150 < sum(mask) < 250
    assert validation_mask(names[:1000], 0.1) == mask[:1000]  # stable as the corpus grows
    assert validation_mask(["a", "b"], 1e-9).count(True) == 1  # tiny corpora keep both splits
    docs = ["aaaa", "bbbbbbbbbbbb", "cc", "dddd"]
    assert list(cap_bytes(docs, 10)) == ["aaaa", "cc", "dddd"]
    assert list(cap_bytes(["éééé"], 3)) == ["é"]  # cut at a character boundary
    assert list(cap_bytes(docs, 0)) == docs
    assert list(cap_prefix(docs, 10)) == ["aaaa", "bbbbbb"]  # pieces of one text: never skipped
    assert list(cap_prefix(["ab", "éé"], 3)) == ["ab", ""] and list(cap_prefix(docs, 0)) == docs
    text = "line one\nline two\nthree\n"
    assert tail_split(text, 0.5) == ("line one\nline two\n", "three\n")  # cut at the next line start
    assert tail_split(text, 0.625) == ("line one\n", "line two\nthree\n")  # exactly one
    assert tail_split("no line breaks at all", 0.25) == ("no line breaks ", "at all")
    assert tail_split("abc\n", 0.1) == ("abc", "\n")  # never an empty validation split
    assert "".join(line_chunks(text * 1000, 100)) == text * 1000
