"""The one training loop: dispatch jitted steps with a bounded queue, and let hooks log, evaluate,
checkpoint and stop.

`Trainer(step_fn, hooks).run(state, batches)` serves `llm-jax train` (hooks below), `llm-jax
bench` (no hooks: it times the loop) and the synthetic-task sweeps. Any step function with the
signature step(state, batch) -> (state, metrics) runs in it: a preference loss or a PPO update
is another step function, not another loop.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax

from llm_jax.runtime.watchdog import Watchdog
from llm_jax.train.nonfinite import NonfinitePolicy

# A few steps in flight keep the devices busy (the host dispatches the next while one runs).
# An unbounded queue (every step dispatched between two logs) deadlocks XLA:CPU's cross-device
# collectives once some 64 steps of a multi-device mesh are queued: the all-reduce waits for a
# device that never arrives, and XLA aborts the process after its 40 s rendezvous timeout.
MAX_STEPS_IN_FLIGHT = 4

StepFn = Callable[[Any, Any], tuple[Any, dict]]


class StepWindow:
    """Call `push(done, metrics)` after dispatching each step; it waits for the step `depth` back
    and returns the steps that finished as (done, metrics) pairs; `drain()` waits for them all."""

    def __init__(self, depth: int = MAX_STEPS_IN_FLIGHT):
        self._depth = depth
        self._steps: collections.deque[tuple[int, dict]] = collections.deque()

    def push(self, done: int, metrics: dict) -> list[tuple[int, dict]]:
        self._steps.append((done, metrics))
        finished = []
        while len(self._steps) > self._depth:
            finished.append(self._finish())
        return finished

    def drain(self) -> list[tuple[int, dict]]:
        return [self._finish() for _ in range(len(self._steps))]

    def _finish(self) -> tuple[int, dict]:
        done, metrics = self._steps.popleft()
        jax.tree.leaves(metrics)[0].block_until_ready()  # the whole step has run: its outputs are ready together
        return done, metrics


class Hook:
    """Called after every step with the step count done (1-based) and the step's outputs."""

    def after_step(self, trainer: Trainer, done: int, state: Any, metrics: dict) -> bool:
        """Return True to stop the run after this step."""
        return False


class Trainer:
    """Runs `step_fn` over (step, batch) pairs, at most MAX_STEPS_IN_FLIGHT steps ahead of the devices.

    With a `nonfinite` policy, the step function reports a `nonfinite` flag (`nonfinite.nonfinite_flag`)
    and the Trainer reads it for each step once that step has finished (so no step waits for it)
    and hands the bad ones to the policy; hooks call `drain()` before anything that must only see
    good steps (a checkpoint save).
    """

    def __init__(self, step_fn: StepFn, hooks: Iterable[Hook] = (), nonfinite: NonfinitePolicy | None = None):
        self.step_fn = step_fn
        self.hooks = list(hooks)
        self.nonfinite = nonfinite
        self.stopped_at: int | None = None
        # Start of the current throughput interval: (steps done, time). Evaluations restart it.
        self.interval: tuple[int, float] | None = None
        self.window = StepWindow()

    def restart_interval(self, done: int) -> None:
        """Time spent from here on counts as training again (after an evaluation, say)."""
        self.interval = (done, time.perf_counter())

    def run(self, state: Any, batches: Iterable[tuple[int, Any]]) -> tuple[Any, dict | None]:
        """Train over `batches`; returns the last state and the last step's metrics (device arrays).
        Every step's flag has been read when it returns."""
        self.window = StepWindow()
        metrics = None
        for step, batch in batches:
            state, metrics = self.step_fn(state, batch)
            if self.nonfinite is not None:
                # The flag's copy to the host is queued behind the step: reading it later never waits.
                metrics["nonfinite"].copy_to_host_async()
            self._check(self.window.push(step + 1, metrics))
            stop = False
            for hook in self.hooks:
                stop = hook.after_step(self, step + 1, state, metrics) or stop
            if stop:
                self.stopped_at = step + 1
                break
        self.drain()
        return state, metrics

    def drain(self) -> None:
        """Wait for every step dispatched and hand any non-finite one to the policy (which may raise)."""
        self._check(self.window.drain())

    def _check(self, finished: list[tuple[int, dict]]) -> None:
        if self.nonfinite is None:
            return
        for done, metrics in finished:
            # A replicated scalar of a finished step, already copied to the host.
            if float(metrics["nonfinite"]):
                self.nonfinite.on_nonfinite(done, host_record(done, metrics))


def host_record(done: int, metrics: dict) -> dict:
    """A step's metrics on the host: scalars as floats, per-layer arrays (MoE load) as lists."""
    return {"step": done, **{k: v.tolist() if v.ndim else float(v) for k, v in jax.device_get(metrics).items()}}


class LogMetrics(Hook):
    """Every `every` steps (and at `last`): the metrics, tokens/s and MFU to `write`, with what
    `extra(done)` adds from the host (a mixture's shares) and the non-finite policy's counts."""

    def __init__(self, every: int, last: int, write: Callable[[dict], None], tokens_per_step: int,
                 flops_per_token: float, peak_flops: float, extra: Callable[[int], dict] | None = None):
        self.every, self.last, self.write, self.extra = every, last, write, extra
        self.tokens_per_step, self.flops_per_token, self.peak_flops = tokens_per_step, flops_per_token, peak_flops
        self.latest: dict = {}

    def after_step(self, trainer: Trainer, done: int, state: Any, metrics: dict) -> bool:
        due = done % self.every == 0 or done == self.last
        if not due and trainer.interval is not None:
            return False
        record = host_record(done, metrics)
        # This step has finished, so every step before it has too: reading their flags costs no
        # wait, and makes the policy's counts exact as of this step.
        trainer.drain()
        if trainer.interval is not None:
            # Throughput over the interval since the last log (the first, compiling step excluded).
            start_step, start_time = trainer.interval
            tps = (done - start_step) * self.tokens_per_step / (time.perf_counter() - start_time)
            record["tokens_per_sec"] = tps
            record["mfu"] = tps * self.flops_per_token / self.peak_flops
        if due:
            if self.extra is not None:
                record.update(self.extra(done))
            if trainer.nonfinite is not None:
                record.update(trainer.nonfinite.record_fields())
            self.write(record)
        self.latest.update(record)
        trainer.restart_interval(done)
        return False


class Evaluate(Hook):
    """Every `every` steps (0: never) and at `last`: `evaluate(params) -> dict` to `write`."""

    def __init__(self, every: int, last: int, evaluate: Callable[[Any], dict], write: Callable[[dict], None]):
        self.every, self.last, self.evaluate, self.write = every, last, evaluate, write
        self.latest: dict = {}

    def after_step(self, trainer: Trainer, done: int, state: Any, metrics: dict) -> bool:
        if done == self.last or (self.every and done % self.every == 0):
            trainer.drain()  # the evaluation waits for the state anyway: never evaluate a bad one
            result = self.evaluate(state["params"])
            self.write({"step": done, **result})
            self.latest.update(result)
            trainer.restart_interval(done)  # evaluation time is not training throughput
        return False


class StepTimeout(Hook):
    """The hung-step watchdog (`train.step_timeout_s`, runtime/watchdog.py; 0: off), kicked after
    every step. The first kick comes after the first step's dispatch, so its compilation is not
    timed; evaluations and saves run in hooks between two kicks, so the timeout covers them too (a
    save or an evaluation that hangs is caught like a step). `close()` it on every exit path."""

    def __init__(self, timeout_s: float):
        self.watchdog = Watchdog(timeout_s) if timeout_s > 0 else None

    def after_step(self, trainer: Trainer, done: int, state: Any, metrics: dict) -> bool:
        if self.watchdog is not None:
            self.watchdog.kick()
        return False

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.close()
