"""The rows of a supervised `data.task`: examples cut from the stdlib files, tokenised once.

Rows are int32 arrays of fixed width (see `tasks.encode_seq2seq_rows` / `encode_classify_rows`)
cached as `.npy` beside the token streams, keyed by everything that decides their content, and
memory-mapped afterwards. Train and validation examples come from different files, so a
function never has its body in one split and its name in the other: `funcname` and `docsig` use
the stdlib corpus's own split (by path hash); `package` holds out whole files making up about
`data.val_fraction` of each package's bytes, at least one file (`tasks.split_group`), so all
eight labels are held out. Those files come from both corpus splits: a model pretrained on the
corpus's training split may have read (without labels) some of the task's validation files.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from llm_jax.config import Config
from llm_jax.data import stdlib_tfds
from llm_jax.data.cache import CACHE_FORMAT_VERSION, build_once, content_key, log, save_npy_atomic, write_json_atomic
from llm_jax.data.sources import Corpus
from llm_jax.data.splits import stratified_validation_mask
from llm_jax.data.tasks import encode_classify_rows, encode_seq2seq_rows, split_group, task_examples, task_kind
from llm_jax.data.tokenizer import Tokenizer, decoder_start_id, identity_of
from llm_jax.errors import UserError

# Bump when the examples a task cuts from the same files, or the files of each split, change.
# 2: `package` validation files stratified by package, by bytes (were: the corpus's validation files).
TASK_RULES_VERSION = 2


def _capped(documents: Iterable[tuple[str, str]], max_bytes: int) -> Iterator[tuple[str, str]]:
    """Whole files while they fit in data.max_bytes (0: all), skipping those that do not, like
    `splits.cap_bytes` (which reads bare texts). Unlike it, a file is never cut: a cut file
    would not parse, and the examples are cut from its syntax tree."""
    used = 0
    for path, text in documents:
        size = len(text.encode("utf-8"))
        if max_bytes and used + size > max_bytes:
            continue
        used += size
        yield path, text
        if max_bytes and used >= max_bytes:
            return


def task_files(cfg: Config, root: Path, split: str) -> Iterator[tuple[str, str]]:
    """The (path, text) stdlib files the task's split is cut from, capped at data.max_bytes.

    A task with a `split_group` splits the files that have a group (from both corpus splits)
    with `stratified_validation_mask`; every other file counts as training, where it gives no
    examples. The cap then applies per split to the files read in the corpus's order, as for
    the other tasks, so a file's split never depends on the cap.
    """

    builder = stdlib_tfds.prepared_builder(root / "tfds", cfg.data.val_fraction)
    group_of = split_group(cfg.data.task)
    if group_of is None:
        return _capped(stdlib_tfds.stdlib_documents(builder, split), cfg.data.max_bytes)

    def every_file() -> Iterator[tuple[str, str]]:
        for corpus_split in ("train", "validation"):
            yield from stdlib_tfds.stdlib_documents(builder, corpus_split)

    grouped = [(path, group, len(text.encode("utf-8"))) for path, text in every_file()
               if (group := group_of(path)) is not None]
    in_val = stratified_validation_mask(*zip(*grouped), cfg.data.val_fraction) if grouped else []
    held_out = {path for (path, _, _), v in zip(grouped, in_val, strict=True) if v}
    want = split == "validation"
    return _capped(((path, text) for path, text in every_file() if (path in held_out) == want), cfg.data.max_bytes)


def encode_rows(cfg: Config, examples: Iterable, tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    """(rows, examples dropped because their target does not fit train.seq_len)."""
    encode = tokenizer.encode
    if task_kind(cfg.data.task) == "seq2seq":
        start = decoder_start_id(tokenizer.eos_id, getattr(tokenizer, "token_id", None))
        return encode_seq2seq_rows(examples, encode, cfg.train.src_len, cfg.train.seq_len, tokenizer.eos_id, start)
    return encode_classify_rows(examples, encode, cfg.train.seq_len, tokenizer.eos_id), 0


def task_rows(cfg: Config, corpus: Corpus, tokenizer: Tokenizer, split: str, root: Path) -> np.ndarray:
    """The split's rows, memory-mapped from the cache (built first if needed)."""
    key = content_key({"corpus": corpus.fingerprint, "tokenizer": identity_of(tokenizer), "split": split,
                       "task": cfg.data.task, "src_len": cfg.train.src_len, "seq_len": cfg.train.seq_len,
                       "val_fraction": cfg.data.val_fraction, "max_bytes": cfg.data.max_bytes,
                       "rules": TASK_RULES_VERSION, "format": CACHE_FORMAT_VERSION})
    folder = root / "tasks"
    npy, meta_path = folder / f"{key}.npy", folder / f"{key}.json"

    def build() -> None:
        log(f"building {cfg.data.task} {split} examples from the stdlib files...")
        rows, dropped = encode_rows(cfg, task_examples(cfg.data.task, task_files(cfg, root, split)), tokenizer)
        note = (f" ({dropped} with targets longer than train.seq_len={cfg.train.seq_len} dropped)"
                if task_kind(cfg.data.task) == "seq2seq" else "")
        log(f"{cfg.data.task} {split}: {len(rows)} examples{note}")
        save_npy_atomic(npy, rows)
        write_json_atomic(meta_path, {"n_rows": len(rows), "dropped": dropped, "task": cfg.data.task})

    build_once(meta_path, build)
    rows = np.load(npy, mmap_mode="r", allow_pickle=False)  # (the default, said aloud: rows are ints)
    if len(rows) < cfg.train.batch_size:
        raise UserError(f"data.task={cfg.data.task} has {len(rows)} {split} examples, fewer than "
                        f"train.batch_size={cfg.train.batch_size}; raise data.max_bytes (0 = all files)")
    return rows
