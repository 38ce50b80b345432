"""Bound how far the host dispatches training steps ahead of the devices."""

from __future__ import annotations

import collections

import jax

# A few steps in flight keep the devices busy (the host dispatches the next while one runs).
# An unbounded queue (every step dispatched between two logs) deadlocks XLA:CPU's cross-device
# collectives once some 64 steps of a multi-device mesh are queued: the all-reduce waits for a
# device that never arrives, and XLA aborts the process after its 40 s rendezvous timeout.
MAX_STEPS_IN_FLIGHT = 4


class StepWindow:
    """Call `push(output)` after dispatching each step; it waits for the step `depth` back."""

    def __init__(self, depth: int = MAX_STEPS_IN_FLIGHT):
        self._depth = depth
        self._outputs: collections.deque[jax.Array] = collections.deque()

    def push(self, step_output: jax.Array) -> None:
        self._outputs.append(step_output)
        if len(self._outputs) > self._depth:
            self._outputs.popleft().block_until_ready()
