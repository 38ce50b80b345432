"""train.on_nonfinite under an injected NaN: a training batch holding a corrupt token id, far
outside the embedding table. The model's lookup (`jnp.take`, whose default mode fills rows out of
range with NaN) makes that step's loss and gradients NaN, as a corrupted data file would. The
fault follows the batch (its dataset index), not the step number, so a rollback that skips the
batch also skips the fault.

NaN steps met: stop 2 (one per way of finding it), skip 2 (one before a resume, one after) + 11
(too many in a row), rollback 4 (one; one before a crash after the next checkpoint; one before a
crash before it, and again after the resume), its guards 1 (no checkpoint yet) + 4 (in a row).
An RL run (whose rewards are checked finite) is made to diverge instead: 1.
"""

import json
import math

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from runs import TINY, losses

from llm_jax.alignment.run import rl_train
from llm_jax.cli import main
from llm_jax.config import load_config
from llm_jax.data.iterator import BatchIterator, batch_index, merge_ranges
from llm_jax.errors import UserError
from llm_jax.parallel.mesh import make_mesh
from llm_jax.train import run as train_run
from llm_jax.train.nonfinite import MAX_SKIPS_IN_A_ROW
from llm_jax.train.rollback import MAX_ROLLBACKS_PER_CHECKPOINT

pytestmark = pytest.mark.faults

CORRUPT_ID = 2**30  # far outside any vocabulary: its embedding row reads as NaN
# A fixed decay horizon: a run resumed with more train.steps keeps the same learning rates.
SCHEDULE = ["optim.decay_steps=40"]


class Crash(Exception):
    """Stands for the process dying while it fetches a batch (the run directory is left as is)."""


class FaultyBatches:
    """The real training batches of a run, by dataset index: indices in `bad` carry CORRUPT_ID;
    fetching one in `crash` raises Crash (once); `dropped` indices are left out of the order
    altogether (a reference run that never saw them)."""

    def __init__(self, dataset, bad=(), crash=(), dropped=()):
        self.dataset, self.order = dataset, dataset.order
        self.bad, self.crash = set(bad), set(crash)
        self.kept = [i for i in range(1000) if i not in set(dropped)]

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if index in self.crash:
            self.crash.discard(index)
            raise Crash(f"killed while fetching batch {index}")
        batch = np.array(self.dataset[self.kept[index]])
        if index in self.bad:
            batch[0, 5] = CORRUPT_ID
        return batch


REAL_DATASET = train_run.train_dataset


def inject(monkeypatch, **faults) -> None:
    """The next `train` reads its batches through FaultyBatches(**faults) (replacing earlier faults)."""
    monkeypatch.setattr(train_run, "train_dataset", lambda *a, **k: FaultyBatches(REAL_DATASET(*a, **k), **faults))


def train(run_dir, *overrides) -> dict:
    return train_run.train(load_config("gpt_tiny", [*TINY, f"run.dir={run_dir}", *overrides]))


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def saved_steps(run_dir) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def saved(run_dir, step: int) -> tuple[dict, dict]:
    """The train state and data position of a checkpoint, as saved."""
    with ocp.CheckpointManager(run_dir / "checkpoints", item_names=("state", "data", "config")) as manager:
        out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                            data=ocp.args.JsonRestore()))
    return jax.device_get(out["state"]), out["data"]


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 6)), max_size=5), st.integers(0, 30))
def test_batch_index_skips_exactly_the_ranges(pairs, step):
    ranges = merge_ranges([[a, a + n] for a, n in pairs])
    skipped = {i for a, b in ranges for i in range(a, b + 1)}
    assert batch_index(step, ranges) == [i for i in range(100) if i not in skipped][step]
    assert all(b + 1 < c for (_, b), (c, _) in zip(ranges, ranges[1:]))  # disjoint, not adjacent


def test_iterator_restart_goes_on_past_the_skipped_batches():
    with BatchIterator(list(range(20)), 0, 8, 2, lambda b: b) as it:
        assert [next(it), next(it)] == [(0, 0), (1, 1)]
        it.restart(1, [[1, 3]])
        assert list(it) == [(s, s + 3) for s in range(1, 8)]
        assert it.get_state()["skipped_batches"] == [[1, 3]]


@pytest.mark.slow
@pytest.mark.parametrize(("bad", "every", "kept"), [
    (6, 4, 4),  # step 7, found when step 8 is to be saved: the save reads the steps' flags first
    (1, 0, None),  # step 2, found when the queue of steps in flight waits for it (step 6), no save yet
])
def test_stop_names_the_step_and_saves_nothing_from_it_on(tmp_path, monkeypatch, capsys, bad, every, kept):
    inject(monkeypatch, bad={bad})
    run = tmp_path / "run"
    # log_every=100: only the in-flight queue and the saves read the flags.
    code = main(["train", "gpt_tiny", f"run.dir={run}", *TINY, "train.log_every=100", "train.steps=12",
                 f"checkpoint.every={every}", "checkpoint.keep=10"])
    assert code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    where = f"the newest checkpoint kept is step {kept}" if kept else "no checkpoint was saved before it"
    assert errors == [f"error: loss became nan at step {bad + 1} (grad norm nan); nothing from that step on was "
                      f"saved, {where}. Try a lower optim.lr or optim.clip_norm, or train.on_nonfinite=skip or "
                      "rollback"]
    assert "Traceback" not in err
    assert saved_steps(run) == ([kept] if kept else [])


@pytest.mark.slow
def test_skip_drops_the_update_counts_it_and_keeps_the_count_on_resume(tmp_path, monkeypatch):
    common = [*SCHEDULE, "train.on_nonfinite=skip", "checkpoint.every=1", "checkpoint.keep=20"]
    # The reference never sees batch 4: skipping step 5's update must be the same as that.
    inject(monkeypatch, dropped={4})
    ref = train(tmp_path / "ref", *common, "train.steps=7")
    inject(monkeypatch, bad={4})
    run = tmp_path / "run"
    got = train(run, *common, "train.steps=8")

    ref_losses, run_losses = losses(tmp_path / "ref"), losses(run)
    assert [run_losses[s] for s in range(1, 5)] == [ref_losses[s] for s in range(1, 5)]
    assert math.isnan(run_losses[5])
    assert [run_losses[s] for s in range(6, 9)] == [ref_losses[s] for s in range(5, 8)]
    assert_trees_equal(got["params"], ref["params"])
    # The state after the bad step is the state before it, but for the step count.
    (before, _), (after, position) = saved(run, 4), saved(run, 5)
    assert_trees_equal({k: before[k] for k in ("params", "opt_state")}, {k: after[k] for k in ("params", "opt_state")})
    assert (before["step"], after["step"]) == (4, 5)
    assert position["skipped_steps"] == 1 and "skipped_steps" not in saved(run, 4)[1]
    assert [r["skipped_steps"] for r in records(run) if "loss" in r] == [0, 0, 0, 0, 1, 1, 1, 1]

    # Resumed at step 8 with one more bad batch (step 10): the count goes on from 1.
    inject(monkeypatch, bad={4, 9})
    train(run, *common, "train.steps=11")
    assert {r["step"]: r["skipped_steps"] for r in records(run) if "loss" in r and r["step"] > 7} == \
        {8: 1, 9: 1, 10: 2, 11: 2}
    assert saved(run, 11)[1]["skipped_steps"] == 2


@pytest.mark.slow
def test_skip_stops_when_every_step_is_bad(tmp_path, monkeypatch):
    inject(monkeypatch, bad=set(range(2, 40)))  # steps 3 on
    with pytest.raises(UserError, match=f"loss became nan at step {3 + MAX_SKIPS_IN_A_ROW} .*: the last "
                                        f"{MAX_SKIPS_IN_A_ROW + 1} steps were all not finite"):
        train(tmp_path / "run", "train.on_nonfinite=skip", "checkpoint.every=0", "train.steps=20")
    assert records(tmp_path / "run")[-1]["skipped_steps"] == MAX_SKIPS_IN_A_ROW


@pytest.mark.slow
def test_rollback_skips_the_bad_batches_and_a_resume_replays_the_same(tmp_path, monkeypatch, capsys):
    common = [*SCHEDULE, "train.on_nonfinite=rollback", "checkpoint.every=3", "checkpoint.keep=10",
              "train.steps=10"]
    # Batch 4 (step 5) is bad; the newest checkpoint is step 3, so steps 4 and 5 (batches 3, 4)
    # are skipped: the reference trains on every batch but those.
    inject(monkeypatch, dropped={3, 4})
    ref = train(tmp_path / "ref", *common)
    ref_losses = losses(tmp_path / "ref")

    run = tmp_path / "run"
    inject(monkeypatch, bad={4})
    got = train(run, *common)
    assert "loss became nan at step 5 (grad norm nan): rolled back to the checkpoint at step 3; skipping the " \
           "batches of steps 4..5 (dataset batches 3..4)" in capsys.readouterr().err
    assert losses(run) == ref_losses and all(math.isfinite(v) for v in ref_losses.values())
    assert_trees_equal(got["params"], ref["params"])
    assert {"step": 3, "rolled_back_from": 5, "skipped_batches": [3, 4]} in records(run)
    assert saved(run, 6)[1]["skipped_batches"] == [[3, 4]]

    # Killed after the checkpoint at step 6 (while fetching step 8's batch, dataset batch 9): the
    # resume goes on from 6 past the skipped batches, as the uninterrupted run did.
    crashed = tmp_path / "crashed"
    inject(monkeypatch, bad={4}, crash={9})
    with pytest.raises(Crash):
        train(crashed, *common)
    assert saved_steps(crashed) == [3, 6]
    inject(monkeypatch, bad={4})
    train(crashed, *common)
    assert "resumed from checkpoint at step 6" in capsys.readouterr().err
    assert losses(crashed) == ref_losses


@pytest.mark.slow
def test_rollback_killed_before_its_next_checkpoint_rolls_back_again_the_same_way(tmp_path, monkeypatch, capsys):
    # data.prefetch=0: batches are fetched in step order, so the crash comes right after the rollback.
    common = [*SCHEDULE, "train.on_nonfinite=rollback", "checkpoint.every=3", "train.steps=7", "data.prefetch=0"]
    inject(monkeypatch, dropped={3, 4})
    train(tmp_path / "ref", *common)
    run = tmp_path / "run"
    inject(monkeypatch, bad={4}, crash={5})
    with pytest.raises(Crash):
        train(run, *common)
    assert saved_steps(run) == [3]
    inject(monkeypatch, bad={4})
    train(run, *common)
    err = capsys.readouterr().err
    assert "resumed from checkpoint at step 3" in err and "rolled back to the checkpoint at step 3" in err
    assert losses(run) == losses(tmp_path / "ref")


@pytest.mark.slow
@pytest.mark.parametrize(("bad", "message"), [
    ({1}, "loss became nan at step 2 (grad norm nan); train.on_nonfinite=rollback has no checkpoint to go back to"),
    (set(range(3, 40)), "the run rolled back to the checkpoint at step 3 "
                        f"{MAX_ROLLBACKS_PER_CHECKPOINT} times and still fails"),
])
def test_rollback_without_a_checkpoint_or_again_and_again_stops(tmp_path, monkeypatch, bad, message):
    inject(monkeypatch, bad=bad)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(tmp_path / "run", "train.on_nonfinite=rollback", "checkpoint.every=3", "train.steps=12")


@pytest.mark.slow
def test_rl_run_that_diverges_stops_and_saves_nothing_from_the_bad_step_on(tmp_path):
    # Rewards are checked finite on the host; a learning rate of 1e30 blows the parameters up in
    # one update instead, so the loss of step 2 is the first NaN. log_every=100 and a save every
    # step: the save of step 2 reads the flags first.
    cfg = load_config("gpt_tiny", [
        "model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.d_ff=64", "train.seq_len=32",
        "rl.method=grpo", "rl.group_size=4", "rl.reward=arith", "rl.num_prompts=16", "rl.prompts_per_step=2",
        "rl.max_new_tokens=4", "rl.epochs=1", "rl.minibatches=1", "optim.lr=1e30", "optim.warmup_steps=0",
        "optim.schedule=constant", "train.steps=6", "train.log_every=100", "checkpoint.every=1",
        "checkpoint.keep=10", "train.tensorboard=false", f"run.dir={tmp_path / 'rl'}"])
    with pytest.raises(UserError, match=r"^loss became nan at step 2 \(grad norm nan\); nothing from that step on "
                                        "was saved, the newest checkpoint kept is step 1"):
        rl_train(cfg, mesh=make_mesh(cfg, jax.devices()[:1]))
    assert saved_steps(tmp_path / "rl") == [1]


def test_rl_runs_refuse_skip_and_rollback(tmp_path):
    cfg = load_config("grpo_arith", [f"run.dir={tmp_path / 'run'}", "train.on_nonfinite=skip"])
    with pytest.raises(UserError, match="train.on_nonfinite=skip is for `llm-jax train` without rl.method"):
        rl_train(cfg)
    assert not (tmp_path / "run").exists()
