"""train.on_nonfinite=rollback: after a non-finite step N, restore the newest checkpoint C and go on
from it, skipping the batches of steps C+1..N, so the run trains on the batches after the bad one.

The skipped batches join the data position (`BatchIterator.skipped`, saved in every later
checkpoint), so a run killed after a rollback resumes on exactly the same batches; killed before
its next checkpoint, it replays from C, meets the same bad batch and rolls back the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from llm_jax.data.iterator import BatchIterator, batch_index, merge_ranges
from llm_jax.errors import UserError
from llm_jax.runtime.checkpoint import Checkpointer
from llm_jax.runtime.metrics import MetricsWriter
from llm_jax.train.nonfinite import RollbackRequest, describe_bad_step
from llm_jax.train.trainer import Trainer

# Bad steps again and again after restoring the same checkpoint mean the run diverges whatever the
# data: after this many rollbacks to one checkpoint the run stops instead of skipping on forever.
MAX_ROLLBACKS_PER_CHECKPOINT = 3


class Rollback:
    """Restores the newest checkpoint after a bad step and moves `batches` past the bad batch."""

    def __init__(self, ckpt: Checkpointer, abstract_state: Callable[[], dict], batches: BatchIterator,
                 writer: MetricsWriter):
        self.ckpt, self.abstract_state, self.batches, self.writer = ckpt, abstract_state, batches, writer
        self.count: Counter[int] = Counter()  # rollbacks to each checkpoint in this process

    def __call__(self, trainer: Trainer, bad: int, record: dict) -> Any:
        """The state of the newest checkpoint, with `batches` moved to go on from it; raises a
        UserError when there is none to go back to or it keeps failing."""
        what = describe_bad_step(bad, record)
        self.batches.close()  # no more prefetching for the abandoned steps
        self.ckpt.wait()  # a save still being written is a good step (saves read the flags first)
        # The newest checkpoint that verifies and restores (damaged newer ones are reported and set aside).
        resumed = self.ckpt.resume(lambda step: self.ckpt.restore(step, self.abstract_state()),
                                   lambda text: self.writer.log(f"warning: {text}"))
        if resumed is None:
            raise UserError(f"{what}; train.on_nonfinite=rollback has no checkpoint to go back to yet "
                            "(lower checkpoint.every, or try a lower optim.lr or optim.clip_norm)")
        kept, (state, data_state) = resumed
        if kept >= bad:  # a save always reads the flags of the steps before it: should not happen
            raise UserError(f"{what}, but the newest checkpoint is at step {kept}; it cannot be rolled back")
        self.count[kept] += 1
        if self.count[kept] > MAX_ROLLBACKS_PER_CHECKPOINT:
            raise UserError(f"{what}: the run rolled back to the checkpoint at step {kept} "
                            f"{MAX_ROLLBACKS_PER_CHECKPOINT} times and still fails; it diverges whatever "
                            "the data. Try a lower optim.lr or optim.clip_norm")
        # Dataset indices of the batches of steps kept+1 .. bad (0-based steps kept .. bad-1) under
        # the current order, which already skips the ranges of earlier rollbacks.
        first, last = batch_index(kept, self.batches.skipped), batch_index(bad - 1, self.batches.skipped)
        skipped = merge_ranges([*self.batches.skipped, [first, last]])
        start = int(data_state.get("next_step", kept))
        self.batches.restart(start, skipped)
        self.writer.rewind(start)
        trainer.restart_interval(start)
        self.writer.write({"step": start, "rolled_back_from": bad, "skipped_batches": [first, last]})
        self.writer.log(f"warning: {what}: rolled back to the checkpoint at step {kept}; skipping the batches of "
                        f"steps {kept + 1}..{bad} (dataset batches {first}..{last})")
        return state


def run_with_rollbacks(trainer: Trainer, state: Any, batches: BatchIterator, rollback: Rollback | None) -> Any:
    """`trainer.run` over `batches`, restarted from a checkpoint after each rollback; the last state."""
    while True:
        try:
            state, _ = trainer.run(state, batches)
            return state
        except RollbackRequest as request:
            if rollback is None:
                raise
            # Only plain values leave the handler: the exception's traceback holds the failed
            # attempt's train state, which must be freed before the checkpoint is restored.
            bad, record = request.done, request.record
        state = rollback(trainer, bad, record)
