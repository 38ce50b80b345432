"""From config to token streams: read the source, build or load the tokenizer, tokenise once.

Tokenised splits are cached as token stores (`data/store.py`: ArrayRecord shards plus a
manifest) keyed by everything that determines their content; a second run with the same data
and tokenizer reads them instead of tokenising again. `llm-jax prepare` builds them ahead of
training, with several tokenising processes.

A split's stream is its documents, each followed by EOS; for a single text file (a "joined"
corpus) it is the split's whole text followed by one EOS.

A synthetic `data.task` (`data/synthetic.py`) opens no corpus: its rows are generated from the seed.
A supervised JSONL source (data.format prompt_completion, chat, seq2seq, classify or
preference, `data/sft_rows.py`) gives rows of examples instead of a token stream. A
`data.mixture` prepares each of its sources as above (the same stores and cache keys as
data.source=<that source>) and keeps them apart (`DataBundle.mixture`); `data/mixture.py`
interleaves their windows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_jax.config import CONFIG_FILE, read_run_config
from llm_jax.config.schema import SUPERVISED_FORMATS, SYNTHETIC_TASKS, Config, DataConfig
from llm_jax.data import encode_groups
from llm_jax.data import store as store_layout
from llm_jax.data.cache import CACHE_FORMAT_VERSION, content_key, file_lock, log, write_bytes_atomic
from llm_jax.data.chat_template import CONFIG_FILE as CHAT_CONFIG
from llm_jax.data.encode_groups import encoded_stream, token_dtype
from llm_jax.data.formats import detect_format
from llm_jax.data.jsonl_files import first_line
from llm_jax.data.mixture import MixtureSource, exact_weights, mixed_corpus
from llm_jax.data.sft_rows import resolve_format, supervised_rows
from llm_jax.data.sources import Corpus, capped_documents, open_corpus
from llm_jax.data.store import StoreWriter, TokenStore, TokenStream, is_complete, remove_stale_builds
from llm_jax.data.synthetic import check_layout, synthetic_rows
from llm_jax.data.task_rows import task_rows
from llm_jax.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    identity_of,
    train_sentencepiece,
)
from llm_jax.errors import UserError
from llm_jax.paths import cache_root

SP_MODEL = "sp.model"
HF_FILE = "tokenizer.json"
SPLITS = ("train", "validation")


@dataclass
class DataBundle:
    tokenizer: Tokenizer
    train_tokens: TokenStream
    """1-D token stream of the training split (docs concatenated, EOS after each; a single text
    file's split is one doc): a read-only `TokenStore`, uint16 when the vocabulary fits
    (windows are widened to int32 when read), else int32."""
    val_tokens: TokenStream
    """The same for the held-out split."""
    val_bytes_per_token: float | None
    """UTF-8 bytes of the validation text / validation tokens (EOS included): bits per byte =
    loss per token / ln 2 / bytes per token. None for a data.task or a supervised data.format,
    whose rows are examples (train_tokens / val_tokens are then 2-D rows, see `task_rows`,
    `synthetic` and `sft_rows`). For a mixture: sum of weight * the source's ratio."""
    mixture: list[MixtureSource] | None = None
    """data.mixture's sources, prepared; train_tokens / val_tokens are then the first source's
    (train through `data.mixture.mixture_dataset`, not `train_dataset`)."""
    val_kinds: list[str] | None = None
    """Supervised JSONL records with a `kind` (an instruction set's task kinds): each validation
    example's kind ("" for a record without one), in order (one per row unless train.packing);
    None otherwise."""


def build_data(cfg: Config, run_dir: Path) -> DataBundle:
    """Tokenizer (trained or copied into run_dir/tokenizer/) and both splits' token streams,
    tokenised on first use and read from the cache's token stores afterwards."""
    cfg = resolve_format(cfg)  # a no-op when the caller (train) has resolved it already
    data = cfg.data
    root = cache_root(data.cache_dir)
    if data.task in SYNTHETIC_TASKS:
        return _synthetic_data(cfg, Path(run_dir), root)
    if data.format in SUPERVISED_FORMATS:
        return _supervised_data(cfg, Path(run_dir), root)
    if data.mixture:
        return _mixture_data(cfg, Path(run_dir), root)
    corpus = open_corpus(data, root)
    tokenizer = _build_tokenizer(data, Path(run_dir), corpus, root, cfg.checkpoint.init_from)
    if data.task:

        return DataBundle(tokenizer, task_rows(cfg, corpus, tokenizer, "train", root),
                          task_rows(cfg, corpus, tokenizer, "validation", root), None)
    train, _ = _split_tokens(corpus, tokenizer, "train", data, root)
    val, _ = _split_tokens(corpus, tokenizer, "validation", data, root)
    for split, tokens in (("train", train), ("validation", val)):
        if len(tokens) < cfg.train.seq_len + 1:
            raise UserError(
                f"the {split} split of data.source '{data.source}' has {len(tokens)} tokens, fewer "
                f"than train.seq_len+1={cfg.train.seq_len + 1}; use more data (data.max_bytes?) "
                "or a shorter train.seq_len"
            )
    return DataBundle(tokenizer, train, val, val.manifest["bytes"] / len(val))


@dataclass
class PreparedSplit:
    split: str
    store: TokenStore
    seconds: float | None
    """How long tokenising and writing took; None when the store was already in the cache."""


def describe_prepared(prepared: PreparedSplit) -> str:
    """One line: counts, throughput of the build (or that it was cached) and the store's path."""
    store, manifest = prepared.store, prepared.store.manifest
    counts = (f"{manifest['documents']} documents, {manifest['bytes'] / 1e6:.1f} MB of text, "
              f"{len(store)} tokens, {len(manifest['shards'])} shards")
    if prepared.seconds is None:
        return f"{prepared.split}: exists ({counts}): {store.path}"
    seconds = max(prepared.seconds, 1e-9)
    return (f"{prepared.split}: {counts} in {prepared.seconds:.1f} s ({manifest['bytes'] / 1e6 / seconds:.1f} MB/s, "
            f"{len(store) / seconds:,.0f} tokens/s): {store.path}")


def prepare_data(cfg: Config, run_dir: Path, workers: int = 1,
                 beam_args: Sequence[str] | None = None) -> list[PreparedSplit]:
    """Both splits' token stores in the cache, built with `workers` tokenising processes where
    missing (`llm-jax prepare`); the tokenizer lands in run_dir/tokenizer as for training.
    With `beam_args` (Beam pipeline options, `--runner=...` among them) each missing store is
    built by an Apache Beam pipeline instead (`beam_engine`): the same store."""
    cfg = resolve_format(cfg)
    data = cfg.data
    if data.task:
        raise UserError(f"data.task={data.task} builds its examples when training starts; "
                        "prepare makes token streams only (unset data.task)")
    if data.format in SUPERVISED_FORMATS:
        raise UserError(f"data.format={data.format}: {data.source} holds examples, whose rows are built when training "
                        "starts; prepare makes token streams of text only")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if beam_args is not None and workers != 1:
        raise UserError("--workers is the local engine's; with --engine beam the runner decides the "
                        "parallelism (its own options after --, e.g. --direct_num_workers=2)")
    if beam_args is not None:
        # Imported here: Apache Beam is an optional, heavy dependency that only this path needs.
        from llm_jax.data.beam_engine import check_options

        check_options(beam_args)  # a bad option or runner before a tokenizer is trained
    root = cache_root(data.cache_dir)
    if data.mixture:
        corpora = _mixture_corpora(data, root)
        tokenizer = _build_tokenizer(data, Path(run_dir), lambda: _mixed(data, corpora), root,
                                     cfg.checkpoint.init_from)
        labels = [f"{entry.name} " for entry in data.mixture]
    else:
        corpora = [open_corpus(data, root)]
        tokenizer = _build_tokenizer(data, Path(run_dir), corpora[0], root, cfg.checkpoint.init_from)
        labels = [""]
    prepared = []
    for corpus, label in zip(corpora, labels, strict=True):
        for split in SPLITS:
            store, seconds = _split_tokens(corpus, tokenizer, split, data, root, workers, beam_args)
            prepared.append(PreparedSplit(f"{label}{split}", store, seconds))
    return prepared


def _mixture_corpora(data: DataConfig, root: Path) -> list[Corpus]:
    """Each data.mixture entry's corpus, opened as data.source=<its source> would be; an error
    names the entry. Supervised JSONL records are refused: a mixture mixes text."""
    corpora = []
    for i, entry in enumerate(data.mixture):
        where = f"data.mixture[{i}] ({entry.name})"
        try:
            corpus = open_corpus(data.model_copy(update={"source": entry.source, "mixture": None}), root)
            path = Path(entry.source.removeprefix("jsonl:")).expanduser()
            if data.format == "auto" and entry.source.startswith("jsonl:") and path.is_file():
                found = detect_format(first_line(path), data.text_field)
                if found in SUPERVISED_FORMATS:
                    raise UserError(f"{path} holds {found} records; a mixture mixes text (data.format=text "
                                    "reads them as text)")
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        corpora.append(corpus)
    return corpora


def _mixed(data: DataConfig, corpora: list[Corpus]) -> Corpus:
    return mixed_corpus(corpora, [entry.weight for entry in data.mixture])


def _mixture_data(cfg: Config, run_dir: Path, root: Path) -> DataBundle:
    """Each data.mixture source's two token stores, built (or found) as for data.source=<it>;
    one tokenizer for all (a sentencepiece model is trained on their text in proportion)."""
    data = cfg.data
    corpora = _mixture_corpora(data, root)
    tokenizer = _build_tokenizer(data, run_dir, lambda: _mixed(data, corpora), root, cfg.checkpoint.init_from)
    weights = exact_weights([entry.weight for entry in data.mixture])
    sources = []
    for i, (entry, corpus, weight) in enumerate(zip(data.mixture, corpora, weights, strict=True)):
        train, _ = _split_tokens(corpus, tokenizer, "train", data, root)
        val, _ = _split_tokens(corpus, tokenizer, "validation", data, root)
        for split, tokens in (("train", train), ("validation", val)):
            if len(tokens) < cfg.train.seq_len + 1:
                raise UserError(f"data.mixture[{i}] ({entry.name}): the {split} split of {entry.source} has "
                                f"{len(tokens)} tokens, fewer than train.seq_len+1={cfg.train.seq_len + 1}; use "
                                "more data (data.max_bytes?) or a shorter train.seq_len")
        sources.append(MixtureSource(entry.name, entry.source, float(weight), train, val,
                                     val.manifest["bytes"] / len(val), exact_weight=weight))
    bytes_per_token = sum(s.weight * s.val_bytes_per_token for s in sources)
    return DataBundle(tokenizer, sources[0].train_tokens, sources[0].val_tokens, bytes_per_token, sources)


def _synthetic_data(cfg: Config, run_dir: Path, root: Path) -> DataBundle:
    """A synthetic task (`data/synthetic.py`): rows generated from the seed, no corpus opened.

    The tokenizer is still data.tokenizer's (its vocabulary sizes the model; byte: 384 rows), but
    the rows' ids are the task's own (content, blank, marker, trigger), not the tokenizer's text.
    """

    data = cfg.data
    check_layout(data.task, cfg.train.seq_len, data.synthetic_copies)  # before any tokenizer work

    def no_corpus() -> Corpus:
        raise UserError(f"data.task={data.task} is generated and reads no text, so there is no corpus to train "
                        f"a sentencepiece tokenizer on; use data.tokenizer=byte (the default)")

    tokenizer = _build_tokenizer(data, run_dir, no_corpus, root, cfg.checkpoint.init_from)
    start = time.perf_counter()
    train, val = synthetic_rows(cfg, "train"), synthetic_rows(cfg, "validation")
    log(f"{data.task}: {len(train)} training and {len(val)} validation rows generated "
        f"in {time.perf_counter() - start:.1f} s")
    return DataBundle(tokenizer, train, val, None)


def _supervised_data(cfg: Config, run_dir: Path, root: Path) -> DataBundle:
    """Prompt/completion or chat examples of a JSONL file as masked rows, or preference pairs as
    rows of both sides (`data/sft_rows.py`, `data/preference.py`)."""

    def no_corpus() -> Corpus:
        raise UserError(f"data.format={cfg.data.format} reads examples, not a text corpus to train a sentencepiece "
                        "tokenizer on; use data.tokenizer=byte or hf:PATH/tokenizer.json, or checkpoint.init_from "
                        "a run whose sentencepiece model it then takes")

    tokenizer = _build_tokenizer(cfg.data, run_dir, no_corpus, root, cfg.checkpoint.init_from)
    train, val, val_kinds = supervised_rows(cfg, tokenizer, root)
    return DataBundle(tokenizer, train, val, None, val_kinds=val_kinds)


def load_tokenizer(cfg: Config, run_dir: Path) -> Tokenizer:
    """The tokenizer of an existing run directory, without reading the corpus."""
    return _load_saved(cfg.data.tokenizer, Path(run_dir) / "tokenizer")


def _load_saved(spec: str, saved: Path) -> Tokenizer:
    if spec == "byte":
        return ByteTokenizer()
    if spec == "sentencepiece":
        if not (saved / SP_MODEL).is_file():
            raise UserError(f"no sentencepiece model at {saved / SP_MODEL}; train a run there first")
        return SentencePieceTokenizer(saved / SP_MODEL)
    if spec.startswith("hf:") and len(spec) > 3:
        path = saved / HF_FILE
        if not path.is_file():  # a run made before the copy existed: use the original file
            path = Path(spec[3:]).expanduser()
            if not path.is_file():
                raise UserError(f"tokenizer file not found: {path} (data.tokenizer '{spec}')")
        return HFTokenizer(path)
    raise UserError(f"unknown data.tokenizer '{spec}'; use byte, sentencepiece or hf:PATH/tokenizer.json")


def _build_tokenizer(data: DataConfig, run_dir: Path, corpus: Corpus | Callable[[], Corpus], root: Path,
                     init_from: str = "") -> Tokenizer:
    """Put the tokenizer's files into run_dir/tokenizer (training or copying), then load it.
    A run started from another run's parameters (`init_from`) takes that run's tokenizer.
    `corpus` may be a function giving it, called only when a sentencepiece model is trained."""
    spec = data.tokenizer
    saved = run_dir / "tokenizer"
    inherited = _init_from_tokenizer(spec, init_from)
    # An existing file in the run is kept: a resumed run must use the tokenizer it started with.
    if spec == "sentencepiece" and not (saved / SP_MODEL).is_file():
        if inherited is None and callable(corpus):
            corpus = corpus()
        model = inherited if inherited is not None else _trained_sp_model(data, corpus, root)
        write_bytes_atomic(saved / SP_MODEL, model.read_bytes())
    if spec.startswith("hf:") and len(spec) > 3 and not (saved / HF_FILE).is_file():
        source = Path(spec[3:]).expanduser()
        if not source.is_file():
            raise UserError(f"tokenizer file not found: {source} (data.tokenizer '{spec}')")
        if inherited is not None and inherited.read_bytes() != source.read_bytes():
            raise UserError(f"checkpoint.init_from {init_from} was trained with the tokenizer {inherited}, "
                            f"which differs from data.tokenizer's {source}; use data.tokenizer=hf:{inherited}")
        HFTokenizer(source)  # refuse a broken file (or chat template) before it is copied into the run
        # Its tokenizer_config.json (the chat template) first: tokenizer.json's presence marks the copy done.
        if (source.parent / CHAT_CONFIG).is_file():
            write_bytes_atomic(saved / CHAT_CONFIG, (source.parent / CHAT_CONFIG).read_bytes())
        write_bytes_atomic(saved / HF_FILE, source.read_bytes())
    return _load_saved(spec, saved)


def _init_from_tokenizer(spec: str, init_from: str) -> Path | None:
    """The tokenizer file of the run that `checkpoint.init_from` names (None: a byte tokenizer,
    no init_from, or a Hugging Face directory, whose tokenizer data.tokenizer names itself).

    Its embeddings are rows of its own vocabulary: a sentencepiece model trained here on other
    data (another data.max_bytes, say) would number the pieces differently and, being of the
    same size, load into the wrong rows without a word. So the source run's model is copied
    instead of training one, and a different kind of tokenizer is refused.
    """
    source = Path(init_from).expanduser()
    if not init_from or not (source / CONFIG_FILE).is_file():
        return None  # not a run directory: pretrained_params says what it is
    theirs = read_run_config(source).data.tokenizer
    if theirs.split(":")[0] != spec.split(":")[0]:
        raise UserError(f"checkpoint.init_from {source} reads text with data.tokenizer={theirs}, this run with "
                        f"data.tokenizer={spec}: its embeddings only fit its own tokenizer; "
                        f"set data.tokenizer={theirs}")
    if spec == "sentencepiece":
        path = source / "tokenizer" / SP_MODEL
    elif spec.startswith("hf:"):
        path = source / "tokenizer" / HF_FILE
        if not path.is_file():  # a run made before the copy existed: its original file
            path = Path(theirs[3:]).expanduser()
    else:
        return None
    if not path.is_file():
        raise UserError(f"checkpoint.init_from {source} has no tokenizer file at {path}")
    return path


def _trained_sp_model(data: DataConfig, corpus: Corpus, root: Path) -> Path:
    """A sentencepiece model trained on this corpus's training split, cached by content, so a
    new run directory on the same data does not retrain."""
    key = content_key({"corpus": corpus.fingerprint, "vocab": data.sp_vocab_size,
                       "val_fraction": data.val_fraction, "max_bytes": data.max_bytes,
                       "text_field": data.text_field, "format": CACHE_FORMAT_VERSION})
    path = root / "sentencepiece" / f"{key}.model"
    if path.is_file():
        return path
    with file_lock(root / "sentencepiece" / f".{key}.lock"):
        if not path.is_file():
            log(f"training a sentencepiece BPE tokenizer (vocab {data.sp_vocab_size}) on the "
                f"{corpus.label} train split...")
            start = time.perf_counter()
            train_sentencepiece(capped_documents(corpus, "train", data.max_bytes),
                                data.sp_vocab_size, path)
            log(f"trained the tokenizer in {time.perf_counter() - start:.1f} s")
    return path


def _split_tokens(corpus: Corpus, tokenizer: Tokenizer, split: str, data: DataConfig, root: Path,
                  workers: int = 1, beam_args: Sequence[str] | None = None) -> tuple[TokenStore, float | None]:
    """The split's token store and the seconds its build took (None: it was in the cache)."""
    identity = identity_of(tokenizer)
    key = content_key({"corpus": corpus.fingerprint, "tokenizer": identity,
                       "split": split, "val_fraction": data.val_fraction,
                       "max_bytes": data.max_bytes, "text_field": data.text_field,
                       "format": CACHE_FORMAT_VERSION})
    dest = root / "tokens" / key
    seconds = None
    if not is_complete(dest):
        with file_lock(root / "tokens" / f".{key}.lock"):
            # Another process may have finished it while this one waited for the lock.
            if not is_complete(dest):
                if dest.exists():
                    raise UserError(f"{dest} is not a complete token store (no manifest.json) and not one "
                                    "this build left; remove it to rebuild")
                remove_stale_builds(dest)
                header = {"source": corpus.label, "source_fingerprint": corpus.fingerprint, "split": split,
                          "tokenizer": identity, "val_fraction": data.val_fraction,
                          "max_bytes": data.max_bytes, "text_field": data.text_field}
                start = time.perf_counter()
                if beam_args is None:
                    _tokenise(corpus, tokenizer, split, data.max_bytes, dest, header, workers)
                else:
                    _tokenise_with_beam(corpus, tokenizer, split, data, root, dest, header, beam_args)
                seconds = time.perf_counter() - start
    return TokenStore(dest), seconds


def _tokenise(corpus: Corpus, tokenizer: Tokenizer, split: str, max_bytes: int, dest: Path,
              header: dict[str, Any], workers: int) -> TokenStore:
    """Stream the split's tokens into a new store at `dest`, `workers` processes tokenising."""
    log(f"tokenising the {corpus.label} {split} split with the {tokenizer.name} tokenizer"
        f"{f' in {workers} processes' if workers > 1 else ''}...")
    start = time.perf_counter()
    joined = corpus.joined()
    counts = {"documents": 0, "bytes": 0}
    groups = encoded_stream(capped_documents(corpus, split, max_bytes), tokenizer, joined, workers)
    with StoreWriter(dest, token_dtype(tokenizer.vocab_size), tokenizer.eos_id) as writer:
        for group in groups:
            writer.append(group.tokens)
            counts["documents"] += group.n_docs
            counts["bytes"] += group.n_bytes
            del group  # not held while the next group is encoded
        if joined and counts["documents"]:
            counts["documents"] = 1  # the pieces were one text
        store = writer.finish({**header, **counts})
    seconds = time.perf_counter() - start
    log(f"{split}: {counts['documents']} documents, {counts['bytes'] / 1e6:.1f} MB -> "
        f"{len(store) / 1e6:.2f} M tokens in {seconds:.1f} s")
    return store


def _tokenise_with_beam(corpus: Corpus, tokenizer: Tokenizer, split: str, data: DataConfig, root: Path,
                        dest: Path, header: dict[str, Any], beam_args: Sequence[str]) -> TokenStore:
    """The same store as `_tokenise`'s, built by an Apache Beam pipeline (`beam_engine`)."""
    # Imported here: Apache Beam is an optional, heavy dependency that only this path needs.
    from llm_jax.data.beam_engine import build_store

    log(f"tokenising the {corpus.label} {split} split with the {tokenizer.name} tokenizer in an Apache Beam "
        f"pipeline ({' '.join(beam_args)})...")
    start = time.perf_counter()
    built = build_store(data, root, split, corpus.fingerprint, tokenizer, header, dest, beam_args,
                        group_chars=encode_groups.ENCODE_GROUP_CHARS, chunk_tokens=store_layout.CHUNK_TOKENS,
                        shard_tokens=store_layout.SHARD_TOKENS)
    manifest = built.manifest
    log(f"{split}: {manifest['documents']} documents, {manifest['bytes'] / 1e6:.1f} MB -> "
        f"{len(built) / 1e6:.2f} M tokens in {time.perf_counter() - start:.1f} s")
    return built
