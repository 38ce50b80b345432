"""Token windows served through Grain: the training order is a pure function of (seed, step).

The token stream is cut into N non-overlapping windows of seq_len+1 tokens (window i starts at
i*seq_len; consecutive windows share one boundary token, so every token is a target once).
Example k of the global stream (k = step*global_batch + row) is window
`permutation(seed, epoch)[k % N]` with `epoch = k // N`: Grain's index shuffle gives a fresh
permutation per epoch and random access, so step s can be produced without replaying 0..s-1.
"""

from __future__ import annotations

import numpy as np

from llm_jax.data.store import TokenStream
from llm_jax.errors import UserError


class TokenWindows:
    """Random-access source of int32 windows `tokens[i*seq_len : i*seq_len + seq_len + 1]`."""

    def __init__(self, tokens: TokenStream, seq_len: int):
        self._tokens = tokens
        self._seq_len = seq_len
        self._length = max(0, (len(tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> np.ndarray:
        start = int(index) * self._seq_len
        # Cached streams may be uint16 token stores: widen only the rows actually read.
        return np.asarray(self._tokens[start : start + self._seq_len + 1], dtype=np.int32)

    def __repr__(self) -> str:
        return f"TokenWindows(n={self._length}, seq_len={self._seq_len})"


class Rows:
    """Random-access source over the rows of a 2-D array (a data.task's examples)."""

    def __init__(self, rows: np.ndarray):
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.asarray(self._rows[int(index)], dtype=np.int32)

    def __repr__(self) -> str:
        return f"Rows(n={len(self._rows)}, width={self._rows.shape[1]})"


Windows = TokenWindows | Rows


def windows_of(tokens: TokenStream, seq_len: int, what: str) -> Windows:
    """Windows of a 1-D token stream, or the rows of a 2-D array of examples."""
    windows = Rows(tokens) if tokens.ndim == 2 else TokenWindows(tokens, seq_len)
    if len(windows) == 0:
        raise UserError(
            f"the {what} split has {len(tokens)} tokens, fewer than train.seq_len+1={seq_len + 1}; "
            "use more data or a shorter train.seq_len"
        )
    return windows


def rows_per_process(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise UserError(
            f"train.batch_size={global_batch} is not divisible by the {process_count} processes"
        )
    return global_batch // process_count


def grain_seed(seed: int) -> int:
    """Mix the user's seed into Grain's 32-bit seed space.

    Grain shuffles epoch e with seed `seed + e`, so raw seeds 0 and 1 would share all but one
    epoch's permutation (shifted by one epoch). Hashing keeps nearby user seeds unrelated.
    """
    return int(np.random.SeedSequence(seed % 2**64).generate_state(1, dtype=np.uint32)[0])


class StepBatches:
    """`ds[step]` -> this process's rows of global step `step` (a Grain MapDataset underneath);
    knows the order's parameters so the iterator can record them in checkpoints."""

    def __init__(self, dataset, order: dict[str, int]):
        self._dataset = dataset
        self.order = order

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, step: int) -> np.ndarray:
        return self._dataset[step]

    def __str__(self) -> str:
        return f"StepBatches({self.order})"


def train_dataset(tokens: TokenStream, seq_len: int, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> StepBatches:
    """ds[step] -> int32 [global_batch // process_count, seq_len + 1]: rows
    p*B/P .. (p+1)*B/P of the global batch of `step`, for process p of P."""
    import grain  # heavy, and absent where only `bench` or a synthetic task runs (the GPU image)

    local_batch = rows_per_process(global_batch, process_count)
    windows = windows_of(tokens, seq_len, "training")
    dataset = (
        grain.MapDataset.source(windows)
        .shuffle(seed=grain_seed(seed))
        # Unbounded; Grain passes indices beyond one epoch to the shuffle, which reshuffles per epoch.
        .repeat()
        # Process p's rows of step s are stream positions s*B + p*b .. s*B + (p+1)*b - 1, i.e.
        # local batch number s*P + p: batch by b, then keep every P-th batch starting at p.
        # Only those b windows are ever read by this process.
        .batch(local_batch, drop_remainder=True)
        .slice(slice(process_index, None, process_count))
    )
    order = {"seed": seed, "seq_len": seq_len, "global_batch": global_batch,
             "n_windows": len(windows), "process_index": process_index,
             "process_count": process_count}
    return StepBatches(dataset, order)


def eval_batches(tokens: TokenStream, seq_len: int, global_batch: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1, what: str = "validation") -> list[np.ndarray]:
    """Fixed held-out batches (windows in order, wrapping around if too few); this process's rows."""
    local_batch = rows_per_process(global_batch, process_count)
    windows = windows_of(tokens, seq_len, what)
    batches = []
    for b in range(num_batches):
        first = b * global_batch + process_index * local_batch
        rows = [windows[(first + r) % len(windows)] for r in range(local_batch)]
        batches.append(np.stack(rows))
    return batches
