"""What a run does with a step whose loss or gradient norm is NaN or infinite (`train.on_nonfinite`).

The train step reports `nonfinite` (1.0 or 0.0) with its metrics; the Trainer reads that flag of
each step once the step has finished anyway (when its queue of steps in flight waits for it, and
before every checkpoint save), so detection adds no wait on the devices, and no step is saved
before its flag was read. The policy then decides:

- `stop`: raise a UserError naming the step and the last checkpoint kept;
- `skip`: the step itself kept the parameters and optimizer state it had (`guarded_update`); count
  the step in `skipped_steps` (kept in the checkpoints' data position) and warn;
- `rollback`: raise `RollbackRequest`, which `train.run` answers by restoring the newest
  checkpoint and skipping the batches from it to the bad one (`train.rollback`).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from llm_jax.errors import UserError
from llm_jax.runtime.checkpoint import Checkpointer


def nonfinite_flag(loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
    """1.0 when the loss or the gradient norm is NaN or infinite, else 0.0 (float32: a metric
    like the others). A NaN or inf in any gradient makes the global norm NaN or inf."""
    return jnp.logical_not(jnp.isfinite(loss) & jnp.isfinite(grad_norm)).astype(jnp.float32)


def guarded_update(flag: jax.Array, new: Any, old: Any) -> Any:
    """`new` where the step was finite, else `old` (as optax.apply_if_finite): an elementwise
    select on the device, no host round trip; a skipped step leaves the state exactly as it was."""
    keep = flag == 0
    return jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, old)


def describe_bad_step(done: int, record: dict) -> str:
    """'loss became nan at step 7 (grad norm nan)', or the gradient norm first when the loss is finite."""
    loss, norm = record.get("loss", math.nan), record.get("grad_norm", math.nan)
    if not math.isfinite(loss):
        return f"loss became {loss} at step {done} (grad norm {norm:.4g})"
    return f"gradient norm became {norm} at step {done} (loss {loss:.4f})"


class RollbackRequest(Exception):
    """Raised out of `Trainer.run` under `rollback` (a request to the caller, not an error): step
    `done` was not finite."""

    def __init__(self, done: int, record: dict):
        super().__init__(describe_bad_step(done, record))
        self.done, self.record = done, record


class NonfinitePolicy(abc.ABC):
    """Called by the Trainer with each non-finite step; `record_fields` go into the logged metrics,
    `position_fields` into the data position of every checkpoint. `skipped_steps`: the updates
    dropped so far, carried over from the checkpoint (an earlier `skip` run of this directory)."""

    def __init__(self, skipped_steps: int = 0):
        self.skipped_steps = skipped_steps

    @abc.abstractmethod
    def on_nonfinite(self, done: int, record: dict) -> None:
        """Step `done` was not finite (`record`: its metrics on the host): count it or raise."""

    def record_fields(self) -> dict[str, Any]:
        return {}

    def position_fields(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps} if self.skipped_steps else {}


class StopOnNonfinite(NonfinitePolicy):
    """`stop`: nothing from the bad step on is saved (every save first reads the flags of the steps
    before it); the error names the step and the newest checkpoint kept."""

    def __init__(self, ckpt: Checkpointer, skipped_steps: int = 0):
        super().__init__(skipped_steps)
        self.ckpt = ckpt

    def on_nonfinite(self, done: int, record: dict) -> None:
        self.ckpt.wait()  # the saves under way are of good steps: they count as kept
        kept = self.ckpt.newest_step()  # a message: the step was verified when it was written
        where = (f"the newest checkpoint kept is step {kept}" if kept is not None
                 else "no checkpoint was saved before it")
        raise UserError(f"{describe_bad_step(done, record)}; nothing from that step on was saved, {where}. "
                        "Try a lower optim.lr or optim.clip_norm, or train.on_nonfinite=skip or rollback")


# Under `skip`, this many bad steps in a row stop the run: the state itself is then likely broken
# (an update that turned finite gradients into NaN parameters), and skipping would go on forever.
MAX_SKIPS_IN_A_ROW = 10


class SkipNonfinite(NonfinitePolicy):
    """`skip`: the step already dropped its own update (`guarded_update`); count it and say so."""

    def __init__(self, log: Callable[[str], None], skipped_steps: int = 0):
        super().__init__(skipped_steps)
        self.log = log
        self.in_a_row: tuple[int, int] = (0, 0)  # (last bad step, bad steps in a row up to it)

    def on_nonfinite(self, done: int, record: dict) -> None:
        last, run = self.in_a_row
        self.in_a_row = (done, run + 1 if done == last + 1 else 1)
        if self.in_a_row[1] > MAX_SKIPS_IN_A_ROW:
            raise UserError(f"{describe_bad_step(done, record)}: the last {MAX_SKIPS_IN_A_ROW + 1} steps were all "
                            "not finite, so the parameters themselves are likely broken; resume from a checkpoint "
                            "with a lower optim.lr or optim.clip_norm, or train.on_nonfinite=rollback")
        self.skipped_steps += 1
        self.log(f"warning: {describe_bad_step(done, record)}: update skipped "
                 f"({self.skipped_steps} skipped so far)")

    def record_fields(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}


class RollbackOnNonfinite(NonfinitePolicy):
    """`rollback`: hand the bad step to the caller, which restores a checkpoint and skips batches."""

    def on_nonfinite(self, done: int, record: dict) -> None:
        raise RollbackRequest(done, record)
