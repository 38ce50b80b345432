"""Checkpoints under faults: SIGKILLs at random moments (during saves too), damaged steps (truncated,
altered, missing files, a restore that fails), a full disk. Each resume starts from the newest
complete checkpoint and the losses equal an uninterrupted run's exactly; nothing good is lost.

Injected per run of this file (docs/reliability.md states these numbers): 5 SIGKILLs (at least
one inside a save; the count is asserted), 5 damaged steps of 5 kinds resumed past, 2 damaged steps
refused, 1 save that fails for a full disk.
"""

import errno
import random
import resource
import shutil
import signal
import time

import pytest
from runs import (
    TINY,
    alter_a_byte,
    checkpoint_names,
    cli_subprocess,
    complete_and_partial,
    holds_array_data,
    largest_array_file,
    losses,
    truncate_array_file,
)

from llm_jax.cli import main
from llm_jax.config import load_config
from llm_jax.errors import UserError
from llm_jax.runtime.checkpoint import Checkpointer, os_error_of
from llm_jax.runtime.checkpoint_integrity import MANIFEST, NO_MANIFEST, move_aside, problem, write_manifest
from llm_jax.runtime.restore import restore_params

pytestmark = pytest.mark.faults

STEPS = 24
# A checkpoint after every step, all kept: the damaged ones are the newest few.
ARGS = ["train", "gpt_tiny", f"train.steps={STEPS}", "checkpoint.every=1", "checkpoint.keep=30",
        "checkpoint.async_save=true", *TINY]


def _train(run_dir, args=ARGS) -> int:
    return main([*args, f"run.dir={run_dir}"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, one checkpoint per step: the losses every resumed run must reproduce."""
    run_dir = tmp_path_factory.mktemp("faults") / "reference"
    assert _train(run_dir) == 0
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    return run_dir


def _steps_from(first: int):
    """copytree's `ignore`: leave out checkpoint steps `first` and later."""
    def ignore(directory, names):
        return [n for n in names if n.isdigit() and int(n) >= first] if directory.endswith("checkpoints") else []
    return ignore


# Orbax leaves the read coroutines of the restore that fails behind; pytest reports each as unraisable.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_newest_checkpoints_are_set_aside_and_the_run_resumes_exactly(reference, tmp_path, capsys):
    run_dir = tmp_path / "damaged"
    shutil.copytree(reference, run_dir)
    ckpts = run_dir / "checkpoints"
    # Damage written before the manifest (sealed again over it): only Orbax's restore can tell.
    truncate_array_file(ckpts / "24")
    write_manifest(ckpts / "24")
    truncate_array_file(ckpts / "23")
    alter_a_byte(ckpts / "22")
    (ckpts / "21" / "state" / "_METADATA").unlink()  # Orbax's metadata of the train state
    (ckpts / "20" / MANIFEST).unlink()  # cut off before sealed, or from before manifests
    assert _train(run_dir) == 0

    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: checkpoint step")]
    assert len(warnings) == 5, err
    reasons = {
        24: "Orbax could not restore it: ",
        23: "state/",
        22: "sha256 differs",
        21: "state/_METADATA: missing",
        20: NO_MANIFEST,
    }
    for line, (step, reason) in zip(warnings, reasons.items(), strict=True):
        assert line.startswith(f"warning: checkpoint step {step} is damaged (")
        assert reason in line and line.endswith(f"moved to {run_dir / 'checkpoints_damaged' / str(step)}; "
                                                "resuming from step 19"), line
    assert "bytes, " in warnings[1] and " expected" in warnings[1]  # the truncated file, by size
    assert "resumed from checkpoint at step 19 " in err
    assert sorted(int(p.name) for p in (run_dir / "checkpoints_damaged").iterdir()) == [20, 21, 22, 23, 24]
    assert losses(run_dir) == losses(reference)  # steps 20..24 again, exactly
    assert all(problem(ckpts / str(s)) is None for s in range(1, STEPS + 1))  # redone, sealed


def test_no_complete_checkpoint_refuses_naming_each_and_moves_nothing(reference, tmp_path, capsys):
    run_dir = tmp_path / "ruined"
    shutil.copytree(reference, run_dir, ignore=_steps_from(3))
    alter_a_byte(run_dir / "checkpoints" / "2")
    (run_dir / "checkpoints" / "1" / MANIFEST).unlink()
    before = (run_dir / "metrics.jsonl").read_text()

    assert _train(run_dir) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no checkpoint in "), err
    assert "step 2 (state/" in err[0] and "sha256 differs" in err[0] and f"step 1 ({NO_MANIFEST})" in err[0]
    assert "nothing was restored" in err[0]
    # Never a silent restart from step 0: nothing moved, nothing trained, the metrics as they were.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert not (run_dir / "checkpoints_damaged").exists()
    assert (run_dir / "metrics.jsonl").read_text() == before
    # Readers (generate, export-hf, llm_jax.load) refuse the same way and move nothing.
    with pytest.raises(UserError, match=r"step 2 \(.*sha256 differs.*nothing was read"):
        restore_params(run_dir)


def test_synchronous_saves_are_sealed_too(tmp_path):
    cfg = load_config(None, ["checkpoint.async_save=false"])
    import jax.numpy as jnp  # noqa: PLC0415

    ckpt = Checkpointer(tmp_path, cfg)
    ckpt.save(1, {"w": jnp.arange(8.0)}, {"next_step": 1}, cfg)
    ckpt.close()
    assert (tmp_path / "checkpoints" / "1" / MANIFEST).is_file() and ckpt.check(1) is None


@pytest.mark.slow
def test_full_disk_during_a_save_stops_with_one_error_and_keeps_the_last_checkpoint(reference, tmp_path):
    run_dir = tmp_path / "full"
    # The run as a kill after step 4's save would leave it.
    shutil.copytree(reference, run_dir, ignore=_steps_from(5))
    limit = 256 * 1024
    # Only checkpoint array files reach the limit; the compile and token caches are warm (the
    # reference run filled them), the metrics stay far below it.
    assert largest_array_file(run_dir / "checkpoints" / "4").stat().st_size > limit
    assert (run_dir / "metrics.jsonl").stat().st_size < limit // 10

    proc = cli_subprocess([*ARGS, f"run.dir={run_dir}"])
    # Files may not grow past `limit`: a write past it fails with EFBIG as on a full disk (CPython
    # ignores SIGXFSZ). Set from outside, seconds before the first save: no fork of this
    # multithreaded process for a preexec_fn.
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and errors[0].startswith("error: the checkpoint at step 5 could not be saved: "
                                                          "[Errno 27] File too large"), err
    assert "Traceback" not in err and "Event loop is closed" not in err, err
    complete, partial = complete_and_partial(run_dir)
    assert complete == [1, 2, 3, 4] and problem(run_dir / "checkpoints" / "4") is None
    assert partial and partial[0] == 5  # the cut-off save, never listed

    assert _train(run_dir) == 0  # room again: the same command resumes from step 4
    assert losses(run_dir) == losses(reference)


def test_write_errors_are_named_by_their_os_error():
    # TensorStore's words for a full disk, Python's, and what is not a write error at all.
    tensorstore = ValueError("OUT_OF_RANGE: Error writing \"w/0\": Failed writing: \"/r/d/8e5b\": "
                             "Failed to write 4 bytes to file 3: No space left on device [os_error_code='28']")
    assert os_error_of(tensorstore) == "[Errno 28] No space left on device"
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.EFBIG, "File too large", "/r/manifest.tmp")
    assert os_error_of(wrapped) == "[Errno 27] File too large (/r/manifest.tmp)"
    assert os_error_of(ValueError("shapes differ")) is None


def test_a_step_moved_aside_twice_keeps_both(tmp_path):
    for n in range(2):
        step = tmp_path / "checkpoints" / "5"
        step.mkdir(parents=True)
        (step / "x").write_text(str(n))
        move_aside(step, tmp_path / "checkpoints_damaged")
    assert [(tmp_path / "checkpoints_damaged" / name / "x").read_text() for name in ("5", "5.1")] == ["0", "1"]


def _kill_at_a_random_moment(proc, run_dir, after: int, rng: random.Random, in_a_save: bool) -> None:
    """SIGKILL `proc` once a checkpoint newer than step `after` is complete: `in_a_save`, as soon as
    a newer step has array data on disk and is not committed yet; else after a random delay."""
    deadline, delay = time.monotonic() + 180, rng.uniform(0.0, 0.3)
    progressed = None
    while proc.poll() is None and time.monotonic() < deadline:
        complete, partial = complete_and_partial(run_dir)
        if complete and complete[-1] > after:
            progressed = progressed or time.monotonic()
            if in_a_save:
                writing = [s for s in partial if s > complete[-1]]
                if any(holds_array_data(run_dir / "checkpoints" / f"{s}.orbax-checkpoint-tmp") for s in writing):
                    break
                if complete[-1] > after + 8 and writing:  # no poll caught array data: any save in flight
                    break
            elif time.monotonic() - progressed >= delay:
                break
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)


@pytest.mark.slow
def test_sigkills_at_random_moments_resume_from_the_newest_complete_checkpoint(reference, tmp_path, capsys):
    """Five SIGKILLs in a row on one run directory, with a save after every step, at seeded-random
    moments, some aimed at a save in flight; each resume starts from the newest complete step."""
    steps, args = STEPS, ARGS
    run_dir, rng = tmp_path / "killed", random.Random(2026)
    kills = kills_in_a_save = 0
    newest = 0  # the newest complete checkpoint: where the next run must resume
    for attempt in range(5):
        proc = cli_subprocess([*args, f"run.dir={run_dir}"])
        _kill_at_a_random_moment(proc, run_dir, newest, rng, in_a_save=attempt % 2 == 0)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed:\n{err[-3000:]}"
        kills += 1
        if newest:
            assert f"resumed from checkpoint at step {newest} " in err, err
        complete, partial = complete_and_partial(run_dir)
        kills_in_a_save += any(s > complete[-1] for s in partial)
        assert problem(run_dir / "checkpoints" / str(complete[-1])) is None, checkpoint_names(run_dir)
        assert complete[-1] > newest and complete[-1] < steps
        newest = complete[-1]
    assert kills == 5 and kills_in_a_save >= 1, kills_in_a_save

    assert _train(run_dir) == 0  # the last run in-process: its programs are compiled already
    err = capsys.readouterr().err
    assert f"resumed from checkpoint at step {newest} " in err and "warning: checkpoint" not in err
    complete, partial = complete_and_partial(run_dir)
    assert complete == list(range(1, steps + 1)) and not partial  # cut-off saves redone and committed
    assert losses(run_dir) == losses(reference)  # every step's loss, exactly
    with capsys.disabled():
        print(f"\n{kills} SIGKILLs, {kills_in_a_save} of them inside a save")
