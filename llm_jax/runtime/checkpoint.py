"""Checkpoints: Orbax CheckpointManager, async, keep-N, restorable onto any mesh, verified on resume.

Layout: <run.dir>/checkpoints/<step>/{state, data, config, llm_jax_manifest.json}. Orbax writes
each step into `<step>.orbax-checkpoint-tmp` and renames it only when every item is complete, so
a save cut off by a kill is never listed. Just before that rename, process 0 hashes the step into
its manifest (checkpoint_integrity); a step whose files no longer match it (or that has none) is
not complete: resuming reports it, moves it to <run.dir>/checkpoints_damaged/ and falls back to
the newest step that verifies. A save that fails (a full disk) stops the run with one error line.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import jax
import orbax.checkpoint as ocp

from llm_jax.config import Config
from llm_jax.errors import UserError
from llm_jax.parallel.distributed import all_processes, barrier, broadcast_flag, broadcast_int
from llm_jax.runtime.checkpoint_integrity import move_aside, problem, write_manifest

T = TypeVar("T")
Warn = Callable[[str], None]
# Orbax's name for a step still being written (atomicity.AtomicRenameTemporaryPath).
TMP_SUFFIX = ".orbax-checkpoint-tmp"
# TensorStore reports a failed write as ValueError("... File too large [os_error_code='27']").
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve() / "checkpoints"


def damaged_dir(run_dir: str | Path) -> Path:
    """Where damaged steps are moved: beside checkpoints/, so Orbax no longer lists them and a
    later save of the same step number is not refused."""
    return Path(run_dir).resolve() / "checkpoints_damaged"


def print_warning(text: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {text}", file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    """The first line of what caused `exc` at the bottom (TensorStore's own words name the file and
    the fault; Orbax's wrapper only names an array index), at most 300 characters."""
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def os_error_of(exc: BaseException) -> str | None:
    """`[Errno N] text (file)` when `exc` (or what caused it) is a failed file operation, else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return f"[Errno {seen.errno}] {seen.strerror}" + (f" ({seen.filename})" if seen.filename else "")
        match = _OS_ERROR_CODE.search(str(seen))
        if match:
            return f"[Errno {match.group(1)}] {os.strerror(int(match.group(1)))}"
        seen = seen.__cause__ or seen.__context__
    return None


def _not_a_reported_write_failure(record: logging.LogRecord) -> bool:
    """Drops Orbax's (and its asyncio tasks') log records of a failed checkpoint write: the
    Checkpointer reports that as one `error:` line; Orbax would print its traceback four times."""
    if "orbax" not in record.pathname and record.name != "asyncio":
        return True
    exc = record.exc_info[1] if record.exc_info else None
    return not ((exc is not None and os_error_of(exc)) or _OS_ERROR_CODE.search(record.getMessage()))


def _closed_loop_callback(kind: type | None, value: object, tb) -> bool:
    """Whether this is TensorStore's late call into a closed event loop (see below)."""
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return (kind is RuntimeError and str(value) == "Event loop is closed" and tb is not None
            and tb.tb_frame.f_code.co_name == "_check_closed")


def _quiet_late_write_callbacks() -> None:
    """After one write of a save fails, Orbax closes the save's event loop while TensorStore's other
    writes are still finishing; each then fails to call back into the closed loop and TensorStore
    prints that as an unraisable exception (`RuntimeError: Event loop is closed`, up to hundreds of
    times). The failed save itself is reported as one error line, so only that exact case is dropped."""
    previous = sys.unraisablehook
    if getattr(previous, "_llm_jax_quiet", False):
        return

    def hook(unraisable) -> None:
        if not _closed_loop_callback(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback):
            previous(unraisable)

    hook._llm_jax_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


class Checkpointer:
    """Saves {state, data position, config} every `checkpoint.every` steps and at the end."""

    def __init__(self, run_dir: str | Path, cfg: Config, *, read_only: bool = False):
        self.every = cfg.checkpoint.every
        self.directory = checkpoint_dir(run_dir)
        self.damaged = damaged_dir(run_dir)
        self.read_only = read_only
        self._async = cfg.checkpoint.async_save and not read_only
        self._primary = jax.process_index() == 0
        # Steps handed to Orbax and not yet sealed; Orbax's callback does not say which step it
        # finalizes, but it finishes saves in order, one at a time.
        self._unsealed: deque[int] = deque()
        self._in_flight: int | None = None  # the async save whose errors Orbax has not reported yet
        self._failed = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.checkpoint.keep,
            enable_async_checkpointing=self._async,
            create=not read_only,
            read_only=read_only,
            # Runs on process 0 after every process wrote its part and before the rename.
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal_next) if self._async else None,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "config"))
        for name in ("absl", "asyncio"):
            logging.getLogger(name).addFilter(_not_a_reported_write_failure)  # once: the same function
        if not read_only:
            _quiet_late_write_callbacks()

    # -- saving ---------------------------------------------------------------------------------

    def _seal_next(self) -> None:
        write_manifest(self.directory / f"{self._unsealed.popleft()}{TMP_SUFFIX}")

    def should_save(self, step: int, final_step: int) -> bool:
        return step == final_step or (self.every > 0 and step % self.every == 0)

    def save(self, step: int, state: dict, data_state: dict, cfg: Config, *, force: bool = False) -> bool:
        self._finish_in_flight()  # Orbax would wait here anyway; this way an error names its own step
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state),
                                  config=ocp.args.JsonSave(cfg.to_dict()))
        if self._async and self._primary:
            self._unsealed.append(step)
        saved = False
        try:
            saved = self.manager.save(step, args=args, force=force)
            if saved and not self._async and self._primary:
                write_manifest(self.directory / str(step))
        except Exception as exc:
            raise self._save_error(step, exc) from None
        finally:
            if not saved and self._unsealed and self._unsealed[-1] == step:
                self._unsealed.pop()  # no callback will come for a save that never started
        self._in_flight = step if saved and self._async else None
        return saved

    def _finish_in_flight(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as exc:
            raise self._save_error(self._in_flight, exc) from None
        self._in_flight = None

    def _save_error(self, step: int | None, exc: Exception) -> Exception:
        """A failed write (a full disk, a file-size limit, a vanished mount) as one error line;
        anything else is a bug and keeps its traceback."""
        os_error = os_error_of(exc)
        if os_error is None:
            return exc
        self._failed = True
        return UserError(f"the checkpoint at step {step} could not be saved: {os_error}; the earlier checkpoints "
                         f"in {self.directory} are untouched: make room and run the same command to resume")

    def wait(self) -> None:
        self._finish_in_flight()

    def close(self) -> None:
        try:
            if not self._failed:  # a failed save was reported already; do not raise it twice
                self._finish_in_flight()
        finally:
            self.manager.close()

    # -- finding and restoring ------------------------------------------------------------------

    def check(self, step: int) -> str | None:
        """Why checkpoint `step` is not complete, or None (checkpoint_integrity.problem)."""
        return problem(self.directory / str(step))

    def _newest_sound(self, skip: dict[int, str]) -> int | None:
        """Process 0 checks the listed steps newest first, adding each damaged one to `skip`;
        every process gets the first sound one (or None)."""
        chosen = -1
        if self._primary:
            for step in sorted(self.manager.all_steps(), reverse=True):
                if step in skip:
                    continue
                found = self.check(step)
                if found is None:
                    chosen = step
                    break
                skip[step] = found
        chosen = broadcast_int(chosen)
        return None if chosen < 0 else chosen

    def _give_up(self, skip: dict[int, str], what: str) -> None:
        """Checkpoints exist but none could be used: refuse (never a silent restart from step 0)."""
        if broadcast_flag(bool(skip)):
            named = "; ".join(f"step {s} ({why})" for s, why in sorted(skip.items(), reverse=True)) or \
                "see process 0's error"
            raise UserError(f"no checkpoint in {self.directory} is complete: {named}; nothing was {what}. "
                            "Each step is left where it is; see docs/reliability.md (Checkpoints)")

    def _set_aside(self, skip: dict[int, str], chosen: int, warn: Warn) -> None:
        """Report every damaged step newer than `chosen` and move it aside (process 0), so that the
        run can save that step number again; read-only callers leave them in place."""
        for step, why in sorted(skip.items(), reverse=True):
            if self.read_only:
                warn(f"checkpoint step {step} is damaged ({why}); using step {chosen}")
            elif self._primary:
                dest = move_aside(self.directory / str(step), self.damaged)
                warn(f"checkpoint step {step} is damaged ({why}); moved to {dest}; resuming from step {chosen}")
        if not self.read_only and broadcast_flag(bool(skip)):  # process 0 knows of every damaged step
            barrier("checkpoints_set_aside")  # every process sees the moves before listing again
            self.manager.reload()

    def newest_step(self) -> int | None:
        """The newest step Orbax lists: sealed with its manifest when it was written, not hashed
        again (for messages; resuming and reading use the verified steps below)."""
        return self.manager.latest_step()

    def newest_sound_step(self, warn: Warn = print_warning) -> int | None:
        """The newest step that verifies (read-only callers: generate, export, init_from); newer
        damaged ones are reported, not moved. None when there is no checkpoint at all."""
        skip: dict[int, str] = {}
        step = self._newest_sound(skip)
        if step is None:
            self._give_up(skip, "read")
            return None
        self._set_aside(skip, step, warn)
        return step

    def resume(self, load: Callable[[int], T], warn: Warn) -> tuple[int, T] | None:
        """(step, load(step)) of the newest step that verifies and restores; damaged newer steps
        (a manifest mismatch, or an error from Orbax's restore on any process) are reported and
        moved to checkpoints_damaged/. None when the run has no checkpoint at all; UserError
        naming each step when it has some but none is usable."""
        skip: dict[int, str] = {}
        while (step := self._newest_sound(skip)) is not None:
            error = None
            try:
                value = load(step)
            except Exception as exc:  # a file the manifest could not vouch for; tried on an older step
                error = f"Orbax could not restore it: {_first_line(exc)}"
            if all_processes(error is None):
                self._set_aside(skip, step, warn)
                return step, value
            skip[step] = error or "another process could not restore it"
        self._give_up(skip, "restored")
        return None

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        """Restore the train state onto the shardings in `abstract_state` (any mesh)."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def restore_params(self, step: int, abstract_params: dict) -> dict:
        """Only the parameters (for generation and `llm_jax.load`), onto the given shardings."""
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape,
                                                                   dtype=s.dtype), abstract_params)
        # The train state was written as one pytree; read back just its "params" subtree.
        path = Path(self.manager.directory) / str(step) / "state"
        out = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
            item={"params": abstract_params}, restore_args={"params": restore_args}, partial_restore=True))
        return out["params"]
