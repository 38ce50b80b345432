"""Batches for a range of steps, prepared `prefetch` steps ahead in a background thread.

The thread also runs `to_global` (host batch -> global jax.Array), so the host-to-device copy
overlaps the running training step. Position is just the next step: the dataset is random
access, so resuming at step s needs no replay.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class BatchIterator:
    """Yields (step, to_global(dataset[step])) for step in [start_step, end_step)."""

    def __init__(self, dataset: Sequence[np.ndarray], start_step: int, end_step: int, prefetch: int,
                 to_global: Callable[[np.ndarray], Any]):
        self._dataset = dataset
        self._next_step = start_step
        self._end_step = end_step
        self._to_global = to_global
        self._prefetch = prefetch
        self._stop = threading.Event()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if prefetch > 0 and start_step < end_step:
            self._queue = queue.Queue(maxsize=prefetch)
            self._thread = threading.Thread(
                target=self._produce, args=(start_step,), name="llm_jax-batches", daemon=True
            )
            self._thread.start()

    def _produce(self, first_step: int) -> None:
        try:
            for step in range(first_step, self._end_step):
                item = (step, self._to_global(self._dataset[step]))
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
            batch = self._to_global(self._dataset[step])
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
        """JSON-able position: the next step to be yielded (prefetched batches don't count)
        plus the order's parameters, so a resume can check that the data order is the same."""
        state: dict[str, Any] = {"next_step": self._next_step, "end_step": self._end_step}
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
