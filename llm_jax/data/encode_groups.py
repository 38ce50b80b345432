"""A split's token stream, tokenised group by group, in this process or in worker processes.

The stream is each document's tokens followed by end-of-text; for a joined corpus (one text
file handed out in line chunks) it is the whole text's tokens followed by one end-of-text.
Documents are encoded in groups of about `ENCODE_GROUP_CHARS` characters, and the groups are
the same whatever the number of workers, so 1 and N workers give the same tokens (a joined
text's tokens can depend on where it is cut into groups, so the cut must not move).

With workers, the parent reads documents and hands groups out with `submit`, keeping at
most `IN_FLIGHT_PER_WORKER` x workers of them submitted but not yet consumed, and yields the
results in submission order. (`multiprocessing.Pool.imap` would not bound memory: its feeder
thread drains the whole input iterator into the task queue.)
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm_jax.data.tokenizer import Tokenizer, encode_documents, identity_of

# Documents are encoded in groups of about this many characters: large enough for the
# batched encoders to pay off, small enough that Python-level id lists stay modest.
ENCODE_GROUP_CHARS = 8_000_000
IN_FLIGHT_PER_WORKER = 2


@dataclass
class EncodedGroup:
    tokens: np.ndarray
    """The group's tokens in the store's dtype (for a joined text: without an end-of-text)."""
    n_docs: int
    n_bytes: int
    """UTF-8 bytes of the group's text."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else int32: half the disk and page cache for most vocabularies."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.int32)


def document_groups(documents: Iterable[str], group_chars: int | None = None) -> Iterator[list[str]]:
    """Consecutive documents, cut after the first one that brings a group to `group_chars`
    (default ENCODE_GROUP_CHARS)."""
    if group_chars is None:
        group_chars = ENCODE_GROUP_CHARS  # read per call, so tests can make groups small
    group: list[str] = []
    chars = 0
    for doc in documents:
        group.append(doc)
        chars += len(doc)
        if chars >= group_chars:
            yield group
            group, chars = [], 0
    if group:
        yield group


def encode_group(tokenizer: Tokenizer, docs: list[str], joined: bool) -> EncodedGroup:
    dtype = token_dtype(tokenizer.vocab_size)
    if joined:  # consecutive pieces of one text: one string, its EOS dropped (added at the very end)
        tokens = encode_documents(tokenizer, ["".join(docs)])[:-1]
    else:
        tokens = encode_documents(tokenizer, docs)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return EncodedGroup(tokens.astype(dtype, copy=False), len(docs), n_bytes)


def encoded_stream(documents: Iterable[str], tokenizer: Tokenizer, joined: bool,
                   workers: int = 1) -> Iterator[EncodedGroup]:
    """The split's groups, encoded, in order; a joined text's final end-of-text is a last group
    of its own. `workers` > 1 tokenises in that many worker processes."""
    groups = document_groups(documents)
    encoded = _in_workers(groups, tokenizer, joined, workers) if workers > 1 else _here(groups, tokenizer, joined)
    any_text = False
    for group in encoded:
        any_text = True
        yield group
        # Loop variables live until the next item arrives: drop this group's tokens before
        # the next group is encoded, or two groups would be held at once (here and below).
        del group
    if joined and any_text:
        eos = np.array([tokenizer.eos_id], token_dtype(tokenizer.vocab_size))
        yield EncodedGroup(eos, 0, 0)


def _here(groups: Iterator[list[str]], tokenizer: Tokenizer, joined: bool) -> Iterator[EncodedGroup]:
    for docs in groups:
        encoded = encode_group(tokenizer, docs, joined)
        del docs  # the text is not needed once encoded
        yield encoded
        del encoded


# ---------------------------------------------------------------- worker processes

_worker_tokenizer: Tokenizer | None = None


def _start_worker(tokenizer: Tokenizer, identity: dict[str, Any]) -> None:
    global _worker_tokenizer
    # A tokenizer pickles as its model file's path: refuse a file changed since the parent read it.
    if identity_of(tokenizer) != identity:
        raise RuntimeError(f"the tokenizer reloaded in a worker is not the parent's: {identity_of(tokenizer)}")
    # N workers are the parallelism: each one's tokenizer encodes in one thread, not one per core.
    if hasattr(tokenizer, "threads"):
        tokenizer.threads = 1
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # Hugging Face tokenizers' own thread pool
    _worker_tokenizer = tokenizer


def _encode_in_worker(docs: list[str], joined: bool) -> EncodedGroup:
    assert _worker_tokenizer is not None, "worker started without its tokenizer"
    return encode_group(_worker_tokenizer, docs, joined)


def _in_workers(groups: Iterator[list[str]], tokenizer: Tokenizer, joined: bool,
                workers: int) -> Iterator[EncodedGroup]:
    # Not fork: the parent may have started JAX's threads, which a fork would copy mid-flight.
    # The fork server is a fresh process that imports this module once (about 2 s: the package
    # pulls in JAX) and forks every later pool's workers from there, so each split's pool
    # starts at once.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    # A process pool from concurrent.futures rather than multiprocessing.Pool: a worker that dies
    # (killed for memory, say) fails the build with BrokenProcessPool instead of hanging it.
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                               initargs=(tokenizer, identity_of(tokenizer)))
    pending: deque[Future[EncodedGroup]] = deque()
    try:
        for group in groups:
            pending.append(pool.submit(_encode_in_worker, group, joined))
            del group  # the pool holds its own pickled copy until a worker takes it
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # an error or an early stop: drop the queue
