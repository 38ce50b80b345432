"""The synthetic tasks of the Mamba paper (Gu and Dao 2023, section 4.1), generated from the seed.

No corpus is read: each split's rows are drawn with numpy from (seed, task, split), so a run is
reproducible and the validation rows are a different draw from the training rows. A row is int32
of width 2T + 1 (T = train.seq_len):

    row[:T + 1]   the token window: model inputs window[:-1], targets window[1:]
    row[T + 1:]   T weights, 0 or 1: which targets are scored (objective `masked_causal`)

Token ids (V = data.synthetic_vocab): content 0..V-1, BLANK = V, MARKER = V + 1, TRIGGER = V + 2;
`synthetic_ids(V)` = V + 3 ids in all. They are not the tokenizer's ids: with the byte tokenizer
(vocabulary padded to 384 model rows) 0..V+2 are rows of the embedding like any other, and
decoding them as bytes means nothing.

selective_copy (K = data.synthetic_copies, P = T - K):

    window[0:P]      K content tokens (uniform over 0..V-1) at K random distinct positions, BLANK elsewhere
    window[P]        MARKER
    window[P+1:T+1]  the K content tokens in their order of appearance

    The scored targets are the last K (targets T-K..T-1, i.e. window[P+1:]): the first answer is
    predicted at the MARKER, each next one teacher-forced after the previous. Needs T >= 2K.

induction:

    window[0:T+1]    content tokens uniform over 0..V-1, except:
    window[p]        TRIGGER, p uniform in [0, (T-1)//2) (the first half of the inputs)
    window[p+1]      the answer (a content token)
    window[T-1]      TRIGGER (the last input)
    window[T]        the answer again: the last target, the only one scored

    TRIGGER appears exactly twice. Needs T >= 3.

Rows are drawn in blocks of CHUNK from their own seeds, so row i does not depend on how many rows
are asked for (raising data.synthetic_examples keeps the first rows).
"""

from __future__ import annotations

import numpy as np

from llm_jax.errors import UserError

CHUNK = 1024  # rows per independently seeded block
# Streams folded into the seed: the two splits, the two tasks.
_SPLIT_STREAM = {"train": 0x545241, "validation": 0x56414C}  # "TRA", "VAL"
_TASK_STREAM = {"selective_copy": 0x534350, "induction": 0x494E44}  # "SCP", "IND"


def blank_id(vocab: int) -> int:
    return vocab


def marker_id(vocab: int) -> int:
    return vocab + 1


def trigger_id(vocab: int) -> int:
    return vocab + 2


def synthetic_ids(vocab: int) -> int:
    """How many token ids the synthetic tasks use: content 0..vocab-1, BLANK, MARKER, TRIGGER."""
    return vocab + 3


def check_layout(task: str, seq_len: int, copies: int) -> None:
    """Refuse (UserError) a train.seq_len the task's layout does not fit in."""
    if task == "selective_copy" and seq_len < 2 * copies:
        raise UserError(f"data.task=selective_copy needs train.seq_len >= 2 * data.synthetic_copies = {2 * copies} "
                        f"(the {copies} tokens among blanks, then the marker and their {copies} copies); "
                        f"got train.seq_len={seq_len}")
    if task == "induction" and seq_len < 3:
        raise UserError(f"data.task=induction needs train.seq_len >= 3 (trigger, answer, trigger); got {seq_len}")
    if task not in _TASK_STREAM:
        raise UserError(f"unknown synthetic task {task!r}; known: {', '.join(_TASK_STREAM)}")


def _rng(seed: int, task: str, split: str, chunk: int) -> np.random.Generator:
    if split not in _SPLIT_STREAM:
        raise ValueError(f"split must be train or validation, not {split!r}")
    return np.random.default_rng(np.random.SeedSequence([seed % 2**64, _TASK_STREAM[task], _SPLIT_STREAM[split],
                                                         chunk]))


def _selective_copy_chunk(rng: np.random.Generator, m: int, seq_len: int, vocab: int, copies: int) -> np.ndarray:
    T, K = seq_len, copies
    P = T - K
    rows = np.arange(m)[:, None]
    # K distinct positions of the prefix: the K smallest of P uniform keys, in order.
    positions = np.sort(np.argpartition(rng.random((m, P)), K - 1, axis=1)[:, :K], axis=1)
    content = rng.integers(0, vocab, (m, K), dtype=np.int32)
    window = np.full((m, T + 1), blank_id(vocab), np.int32)
    window[rows, positions] = content
    window[:, P] = marker_id(vocab)
    window[:, P + 1:] = content
    weights = np.zeros((m, T), np.int32)
    weights[:, T - K:] = 1
    return np.concatenate([window, weights], axis=1)


def _induction_chunk(rng: np.random.Generator, m: int, seq_len: int, vocab: int) -> np.ndarray:
    T = seq_len
    rows = np.arange(m)
    window = rng.integers(0, vocab, (m, T + 1), dtype=np.int32)
    first = rng.integers(0, (T - 1) // 2, m)
    window[rows, first] = trigger_id(vocab)
    window[:, T - 1] = trigger_id(vocab)
    window[:, T] = window[rows, first + 1]
    weights = np.zeros((m, T), np.int32)
    weights[:, T - 1] = 1
    return np.concatenate([window, weights], axis=1)


def generate_rows(task: str, n: int, seq_len: int, vocab: int, copies: int, seed: int, split: str) -> np.ndarray:
    """int32 [n, 2 * seq_len + 1] rows of `task` (layouts in the module docstring)."""
    check_layout(task, seq_len, copies)
    chunks = []
    for c in range(-(-n // CHUNK)):
        rng = _rng(seed, task, split, c)
        if task == "selective_copy":
            chunks.append(_selective_copy_chunk(rng, CHUNK, seq_len, vocab, copies))
        else:
            chunks.append(_induction_chunk(rng, CHUNK, seq_len, vocab))
    rows = np.concatenate(chunks)[:n] if chunks else np.zeros((0, 2 * seq_len + 1), np.int32)
    return np.ascontiguousarray(rows)


def synthetic_rows(cfg, split: str) -> np.ndarray:
    """The split's rows for `cfg.data.task`: data.synthetic_examples training rows, or
    train.eval_batches * train.batch_size validation rows (what one evaluation reads)."""
    data, train = cfg.data, cfg.train
    n = data.synthetic_examples if split == "train" else train.eval_batches * train.batch_size
    if n < train.batch_size:
        raise UserError(f"data.synthetic_examples={n} is fewer than train.batch_size={train.batch_size}")
    return generate_rows(data.task, n, train.seq_len, data.synthetic_vocab, data.synthetic_copies, cfg.seed, split)
