"""Batches for a range of steps, prepared `prefetch` steps ahead in a background thread.

The thread also runs `to_global` (host batch -> global jax.Array), so the host-to-device copy
overlaps the running training step. Position is just the next step: the dataset is random
access, so resuming at step s needs no replay.

Step s trains on dataset batch s, except after a rollback (train.on_nonfinite=rollback): the
batches it skipped are listed as inclusive ranges of dataset indices, and step s trains on the
s-th batch outside them (`batch_index`). The ranges are part of the position saved in
checkpoints, so a resumed run trains on the same batches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

_DONE = object()


Ranges = list[list[int]]  # sorted, disjoint, inclusive [first, last] dataset indices (JSON-able)


def batch_index(step: int, skipped: Ranges) -> int:
    """The dataset index of step `step`'s batch: the step-th index outside the `skipped` ranges."""
    index = step
    for first, last in skipped:  # ascending: each range before the index moves it past the range
        if index >= first:
            index += last - first + 1
    return index


def merge_ranges(ranges: Sequence[Sequence[int]]) -> Ranges:
    """Inclusive [first, last] ranges sorted, overlapping and adjacent ones merged."""
    merged: Ranges = []
    for lo, hi in sorted([int(a), int(b)] for a, b in ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return merged


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class BatchIterator:
    """Yields (step, to_global(dataset[batch_index(step, skipped)])) for step in [start_step, end_step)."""

    def __init__(self, dataset: Sequence[np.ndarray], start_step: int, end_step: int, prefetch: int,
                 to_global: Callable[[np.ndarray], Any], skipped: Sequence[Sequence[int]] = ()):
        self._dataset = dataset
        self._end_step = end_step
        self._to_global = to_global
        self._prefetch = prefetch
        self._start(start_step, skipped)

    def _start(self, start_step: int, skipped: Sequence[Sequence[int]]) -> None:
        self.skipped = merge_ranges(skipped)
        self._next_step = start_step
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if self._prefetch > 0 and start_step < self._end_step:
            self._queue = queue.Queue(maxsize=self._prefetch)
            self._thread = threading.Thread(
                target=self._produce, args=(start_step,), name="llm_jax-batches", daemon=True
            )
            self._thread.start()

    def restart(self, start_step: int, skipped: Sequence[Sequence[int]]) -> None:
        """Go on from `start_step` with these skipped batches (after a rollback); the batches
        prefetched for the old position are dropped."""
        self.close()
        self._start(start_step, skipped)

    def _produce(self, first_step: int) -> None:
        try:
            for step in range(first_step, self._end_step):
                item = (step, self._to_global(self._dataset[batch_index(step, self.skipped)]))
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._put(_Failure(error))

    def _put(self, item: Any) -> bool:
        # Poll so close() can stop a producer blocked on a full queue.
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        return self

    def __next__(self) -> tuple[int, Any]:
        if self._next_step >= self._end_step or self._stop.is_set():
            raise StopIteration
        if self._queue is None:
            step = self._next_step
            batch = self._to_global(self._dataset[batch_index(step, self.skipped)])
        else:
            item = self._queue.get()
            if isinstance(item, _Failure):
                self.close()
                raise item.error
            if item is _DONE:
                raise StopIteration
            step, batch = item
        self._next_step = step + 1
        return step, batch

    def get_state(self) -> dict[str, Any]:
        """JSON-able position: the next step to be yielded (prefetched batches don't count), the
        batches skipped by rollbacks (when any), and the order's parameters, so a resume can
        check that the data order is the same."""
        state: dict[str, Any] = {"next_step": self._next_step, "end_step": self._end_step}
        if self.skipped:
            state["skipped_batches"] = [list(r) for r in self.skipped]
        state.update(getattr(self._dataset, "order", {}))
        return state

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Let a forgotten iterator's thread exit; it is a daemon, so never joined here.
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
