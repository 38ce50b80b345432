"""`llm-jax prepare --engine beam`: a split's token store built by an Apache Beam pipeline.

The store is the one the local engine (`build._tokenise`) writes, byte for byte: the same
document groups, the same tokens, the same shard and record boundaries, the same manifest.

    Create([split]) -> ReadGroups       the source's readers, in order; groups numbered 0, 1, ...
      -> Reshuffle -> Tokenise          the tokenizer loaded once per worker (setup)
      -> CutAtShards                    each group's offset from a side input: every group's
                                        length, gathered -> (shard, (offset, piece))
      -> GroupByKey -> WriteShard       one call per shard: sorts its pieces, writes its file
      -> ToList -> WriteManifest        with the summed (documents, bytes) as a side input

Reading and grouping is one sequential task: a group is cut where the documents' running
character count crosses `ENCODE_GROUP_CHARS`, which depends on every document before it, and a
joined text's tokens depend on where it is cut. Tokenising, cutting and writing run in
parallel. A shard's offset is known once every group's length is (a list of one integer per
8 M-character group, the only global state), and each shard is gathered and written by one
`WriteShard` call, so no worker holds more than one shard's tokens (64 Mi) at once.

The files go into a temporary directory `.KEY.*.tmp` beside the store, made by the launching
process; the last step writes the manifest there and the launching process renames the
directory into place once the pipeline has succeeded. A failed pipeline leaves nothing under
the store's name (the temporary directory is removed), as with the local engine. The temporary
directory must therefore be visible to the launcher and every worker: a shared filesystem.

On the DirectRunner every step runs in the launching process, which then holds the whole
split's tokens at the GroupByKey: it is for tests and for checking a setup, not for large corpora.

apache_beam is imported by this module alone, which only `prepare --engine beam` imports.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llm_jax.config.schema import DataConfig
from llm_jax.data.cache import write_json_atomic
from llm_jax.data.encode_groups import document_groups, encode_group, token_dtype
from llm_jax.data.sources import capped_documents, open_corpus
from llm_jax.data.store import (
    MANIFEST,
    ShardWriter,
    TokenStore,
    commit_build,
    new_build_dir,
    shard_name,
    store_manifest,
)
from llm_jax.data.tokenizer import Tokenizer, identity_of
from llm_jax.errors import UserError

try:
    # Importing apache_beam logs a root-level warning about optional GCP clients that a local run
    # does not use; keep it off the one-line output of `prepare`.
    logging.disable(logging.WARNING)
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
except ImportError:
    raise UserError("--engine beam needs Apache Beam: pip install 'llm_jax[beam]' (or apache-beam)") from None
finally:
    logging.disable(logging.NOTSET)

# A group's kind: documents, consecutive pieces of one text, or a joined text's closing end-of-text.
DOCUMENTS, PIECES, END_OF_TEXT = "documents", "pieces", "eos"


@dataclass(frozen=True)
class SplitJob:
    """Everything a worker needs to read, tokenise and write one split (pickled to the workers)."""

    data: DataConfig
    cache_root: str
    split: str
    fingerprint: dict[str, Any]
    """The corpus's, as the launcher saw it: a worker refuses a source that differs."""
    tokenizer: bytes
    """The tokenizer, pickled (as its model file's path): loaded by `Tokenise.setup`, once per worker."""
    tokenizer_identity: dict[str, Any]
    dtype_name: str
    eos_id: int
    header: dict[str, Any]
    build_dir: str
    group_chars: int
    chunk_tokens: int
    shard_tokens: int

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.dtype_name)


class ReadGroups(beam.DoFn):
    """split -> (index, kind, documents) for each group, in stream order, numbered from 0."""

    def __init__(self, job: SplitJob):
        self.job = job

    def process(self, split: str) -> Iterator[tuple[int, str, list[str]]]:
        job = self.job
        corpus = open_corpus(job.data, Path(job.cache_root))
        if corpus.fingerprint != job.fingerprint:
            # Not the fingerprints themselves: a directory's lists every file.
            raise UserError(f"data.source '{corpus.label}' as a Beam worker sees it is not what the launching "
                            "process saw (files changed since, or not at the same paths); workers need the same "
                            "files at the same paths")
        joined = corpus.joined()
        documents = capped_documents(corpus, split, job.data.max_bytes)
        index = -1
        for index, group in enumerate(document_groups(documents, job.group_chars)):
            yield index, PIECES if joined else DOCUMENTS, group
        if joined and index >= 0:
            yield index + 1, END_OF_TEXT, []


class Tokenise(beam.DoFn):
    """(index, kind, documents) -> (index, tokens, documents, UTF-8 bytes); the tokenizer is
    loaded once per DoFn instance and checked against the launcher's."""

    def __init__(self, job: SplitJob):
        self.job = job
        self._tokenizer: Tokenizer | None = None

    def setup(self) -> None:
        tokenizer: Tokenizer = pickle.loads(self.job.tokenizer)  # reloaded from its model file
        if identity_of(tokenizer) != self.job.tokenizer_identity:
            raise UserError(f"the tokenizer a Beam worker loaded ({identity_of(tokenizer)}) is not the "
                            f"launching process's ({self.job.tokenizer_identity})")
        self._tokenizer = tokenizer

    def process(self, group: tuple[int, str, list[str]]) -> Iterator[tuple[int, np.ndarray, int, int]]:
        index, kind, docs = group
        assert self._tokenizer is not None
        if kind == END_OF_TEXT:  # the joined text's one document ends here
            yield index, np.array([self.job.eos_id], self.job.dtype), 1, 0
            return
        encoded = encode_group(self._tokenizer, docs, joined=kind == PIECES)
        # Pieces of a joined text are not documents: its closing end-of-text counts the one.
        yield index, encoded.tokens, 0 if kind == PIECES else encoded.n_docs, encoded.n_bytes


def group_starts(lengths: list[tuple[int, int]]) -> list[int]:
    """[(group index, token count)] in any order -> each group's first token's offset in the stream."""
    counts = [0] * len(lengths)
    for index, count in lengths:
        counts[index] = count
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)[:-1]]).tolist() if counts else []


class CutAtShards(beam.DoFn):
    """(index, tokens, ...) -> (shard, (offset, piece)) for each shard the group's tokens fall in."""

    def __init__(self, shard_tokens: int):
        self.shard_tokens = shard_tokens

    def process(self, encoded: tuple[int, np.ndarray, int, int],
                starts: list[int]) -> Iterator[tuple[int, tuple[int, np.ndarray]]]:
        index, tokens = encoded[0], encoded[1]
        offset, end = starts[index], starts[index] + len(tokens)
        while offset < end:
            shard = offset // self.shard_tokens
            stop = min(end, (shard + 1) * self.shard_tokens)
            yield shard, (offset, tokens[offset - starts[index] : stop - starts[index]])
            offset = stop


class WriteShard(beam.DoFn):
    """(shard, pieces) -> (shard, manifest entry): the shard's file, from its pieces in order."""

    def __init__(self, job: SplitJob):
        self.job = job

    def process(self, shard_pieces: tuple[int, Iterable[tuple[int, np.ndarray]]]) -> Iterator[tuple[int, Any]]:
        shard, pieces = shard_pieces
        job = self.job
        ordered = sorted(pieces, key=lambda piece: piece[0])
        expected = shard * job.shard_tokens
        # A rerun of this call (a retried bundle) writes the same file again: idempotent.
        writer = ShardWriter(Path(job.build_dir) / shard_name(shard), job.dtype, job.eos_id, job.chunk_tokens)
        try:
            for offset, tokens in ordered:
                if offset != expected:
                    raise RuntimeError(f"shard {shard}: a piece starts at token {offset}, expected {expected}")
                writer.append(tokens)
                expected += len(tokens)
            entry = writer.close()
        except BaseException:
            writer.abort()
            raise
        yield shard, entry


def write_manifest(shards: list[tuple[int, dict[str, Any]]], totals: tuple[int, int], job: SplitJob) -> None:
    """The manifest, into the build directory: the pipeline's last step."""
    shards = sorted(shards, key=lambda item: item[0])
    if [index for index, _ in shards] != list(range(len(shards))) or any(
            entry["tokens"] != job.shard_tokens for _, entry in shards[:-1]):
        raise RuntimeError(f"the shards written do not tile the stream: {shards}")
    documents, n_bytes = totals
    manifest = store_manifest({**job.header, "documents": documents, "bytes": n_bytes}, job.dtype,
                              job.chunk_tokens, job.shard_tokens, [entry for _, entry in shards])
    write_json_atomic(Path(job.build_dir) / MANIFEST, manifest)


def sum_pairs(pairs: Iterable[tuple[int, int]]) -> tuple[int, int]:
    documents = n_bytes = 0
    for d, b in pairs:
        documents += d
        n_bytes += b
    return documents, n_bytes


def build_pipeline(pipeline: beam.Pipeline, job: SplitJob) -> None:
    encoded = (pipeline
               | "Split" >> beam.Create([job.split])
               | "ReadGroups" >> beam.ParDo(ReadGroups(job))
               | "Spread" >> beam.Reshuffle()  # groups go to whichever workers are free
               | "Tokenise" >> beam.ParDo(Tokenise(job)))
    starts = (encoded
              | "Lengths" >> beam.Map(lambda group: (group[0], len(group[1])))
              | "AllLengths" >> beam.combiners.ToList()
              | "Starts" >> beam.Map(group_starts))
    totals = (encoded
              | "Counts" >> beam.Map(lambda group: (group[2], group[3]))
              | "Totals" >> beam.CombineGlobally(sum_pairs))
    (encoded
     | "CutAtShards" >> beam.ParDo(CutAtShards(job.shard_tokens), beam.pvalue.AsSingleton(starts))
     | "GatherShards" >> beam.GroupByKey()
     | "WriteShards" >> beam.ParDo(WriteShard(job))
     | "AllShards" >> beam.combiners.ToList()
     | "WriteManifest" >> beam.Map(write_manifest, beam.pvalue.AsSingleton(totals), job))


def build_store(data: DataConfig, cache_root: Path, split: str, corpus_fingerprint: dict[str, Any],
                tokenizer: Tokenizer, header: dict[str, Any], dest: Path, pipeline_args: Sequence[str],
                group_chars: int, chunk_tokens: int, shard_tokens: int) -> TokenStore:
    """Run the pipeline (options from `pipeline_args`, as Beam parses them: --runner=...) and move
    the finished store into `dest`."""
    pipeline = _pipeline(pipeline_args)  # refuses a bad option before anything is written
    build_dir = new_build_dir(dest)
    job = SplitJob(data, str(cache_root), split, corpus_fingerprint, pickle.dumps(tokenizer), identity_of(tokenizer),
                   token_dtype(tokenizer.vocab_size).name, tokenizer.eos_id, header, str(build_dir), group_chars,
                   chunk_tokens, shard_tokens)
    # The runner logs a failing step's traceback before the pipeline raises it; the error is
    # reported once, by the caller.
    step_errors = logging.getLogger("apache_beam.runners.common")
    level = step_errors.level
    step_errors.setLevel(logging.CRITICAL)
    try:
        with pipeline:  # runs the pipeline on leaving the block, and waits for it
            build_pipeline(pipeline, job)
        if not (build_dir / MANIFEST).is_file():
            raise UserError(f"the Beam pipeline finished without writing {build_dir / MANIFEST}: do the "
                            "workers share this filesystem with the launching process?")
        commit_build(build_dir, dest)
    except Exception as exc:
        cause = _user_error_in(exc)
        if cause is not None:  # a worker's user error, without the runner's "[while running ...]"
            raise UserError(str(cause)) from None
        raise
    finally:
        step_errors.setLevel(level)
        shutil.rmtree(build_dir, ignore_errors=True)  # gone already after the rename
    return TokenStore(dest)


def check_options(pipeline_args: Sequence[str]) -> None:
    """Refuse options that Beam does not accept, and an unknown runner, as user errors."""
    _pipeline(pipeline_args)


def _pipeline(pipeline_args: Sequence[str]) -> beam.Pipeline:
    """A pipeline with these options; an option Beam does not accept or an unknown runner is a
    user error (Beam's own parser would print its usage and exit)."""
    options = PipelineOptions(list(pipeline_args))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            options.get_all_options()
        return beam.Pipeline(options=options)
    except SystemExit:
        lines = printed.getvalue().strip().splitlines()
        reason = lines[-1].split("error: ", 1)[-1] if lines else " ".join(pipeline_args)
        raise UserError(f"Beam pipeline options: {reason}") from None
    except ValueError as exc:
        raise UserError(f"Beam pipeline: {exc}") from None


def _user_error_in(exc: BaseException | None) -> UserError | None:
    """The innermost UserError among `exc` and its causes (an in-process runner re-raises a step's
    error with the step's name appended, the original as its cause)."""
    found = None
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UserError):
            found = exc
        exc = exc.__cause__ or exc.__context__
    return found
