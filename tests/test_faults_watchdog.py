"""The hung-step watchdog (train.step_timeout_s, llm_jax/runtime/watchdog.py): a stuck step, a
stuck hook and a stuck peer of a multi-process run end the process with an error line, every
thread's stack and exit code 3; a run that ends, normally or not, leaves nothing armed."""

import faulthandler
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from runs import REPO, TINY
from test_multiprocess import MESH, _env, _local_module, _wait_for, train_args

from llm_jax.cli import main
from llm_jax.runtime import watchdog as watchdog_module
from llm_jax.runtime.watchdog import EXIT_CODE, THREAD_NAME, Watchdog
from llm_jax.train import trainer as trainer_module

pytestmark = pytest.mark.faults

# A Trainer with the watchdog hook over a trivial step; `stuck_*` never returns at step 3.
SCRIPT = """
import ctypes, sys, time
import jax.numpy as jnp
from llm_jax.runtime.watchdog import Watchdog
from llm_jax.train.trainer import Hook, StepTimeout, Trainer

mode = sys.argv[1]

def stuck_in_step(state, batch):
    if batch == 3:
        time.sleep(600)  # releases the GIL, like a wait on a collective
    return state, {"loss": jnp.zeros(())}

def stuck_holding_the_gil(state, batch):
    if batch == 3:
        ctypes.PyDLL(None).sleep(600)  # a C call that keeps the GIL: only faulthandler's thread runs
    return state, {"loss": jnp.zeros(())}

class StuckInEvaluation(Hook):
    def after_step(self, trainer, done, state, metrics):
        if done == 3:
            time.sleep(600)
        return False

def plain_step(state, batch):
    return state, {"loss": jnp.zeros(())}

if mode == "step":
    Trainer(stuck_in_step, [StepTimeout(0.5)]).run(0, ((i, i) for i in range(10)))
elif mode == "hook":
    Trainer(plain_step, [StuckInEvaluation(), StepTimeout(0.5)]).run(0, ((i, i) for i in range(10)))
elif mode == "gil":
    watchdog = Watchdog(0.5, backstop_s=1.0)
    class Kick(Hook):
        def after_step(self, trainer, done, state, metrics):
            watchdog.kick()
    Trainer(stuck_holding_the_gil, [Kick()]).run(0, ((i, i) for i in range(10)))
elif mode == "finish":
    hook = StepTimeout(0.5)
    try:
        Trainer(plain_step, [hook]).run(0, ((i, i) for i in range(10)))
    finally:
        hook.close()
    time.sleep(2)  # past both deadlines: nothing may fire
    print("finished")
"""


def _run_script(mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


@pytest.mark.slow
@pytest.mark.parametrize("mode, function", [("step", "stuck_in_step"), ("hook", "after_step")])
def test_a_stuck_step_or_hook_dumps_every_stack_and_exits_3(mode, function):
    done = _run_script(mode)
    assert done.returncode == EXIT_CODE, done.stderr[-3000:]
    assert ("error: no training step completed in 0.5 s (train.step_timeout_s); dumping every thread's stack "
            f"and exiting with code {EXIT_CODE}") in done.stderr
    dump = done.stderr.split("error: no training step", 1)[1]
    assert "Thread 0x" in dump and "Current thread 0x" in dump  # every thread, the watchdog's own among them
    assert f" in {function}\n" in dump and 'trainer.py", line' in dump and " in run\n" in dump
    assert "Timeout (" not in done.stderr  # the monitor fired, not the backstop


@pytest.mark.slow
def test_a_step_holding_the_gil_is_ended_by_the_faulthandler_backstop():
    done = _run_script("gil")
    assert done.returncode == 1, done.stderr[-3000:]  # faulthandler's own exit code
    assert "Timeout (0:00:01.500000)!" in done.stderr
    assert " in stuck_holding_the_gil\n" in done.stderr and " in run\n" in done.stderr
    assert "error: no training step" not in done.stderr  # the monitor never got the GIL


@pytest.mark.slow
def test_a_closed_watchdog_never_fires():
    done = _run_script("finish")
    assert (done.returncode, done.stdout, done.stderr) == (0, "finished\n", "")


class _FaulthandlerCalls:
    """Records the watchdog's calls to faulthandler (and makes them), to see what is left armed."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in ("dump_traceback_later", "cancel_dump_traceback_later"):
            real = getattr(faulthandler, name)
            monkeypatch.setattr(watchdog_module.faulthandler, name, self._recording(name, real))

    def _recording(self, name, real):
        def call(*args, **kwargs):
            self.calls.append(name)
            return real(*args, **kwargs)
        return call


def _watchdog_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


@pytest.mark.slow
def test_a_finished_or_failed_run_leaves_no_watchdog_armed(tmp_path, monkeypatch):
    calls = _FaulthandlerCalls(monkeypatch)
    run = ["train", "gpt_tiny", *TINY, "train.steps=4", "checkpoint.every=0", "train.step_timeout_s=120"]
    assert main([*run, f"run.dir={tmp_path / 'ok'}"]) == 0
    assert calls.calls[0] == "dump_traceback_later" and calls.calls[-1] == "cancel_dump_traceback_later"
    assert not _watchdog_threads()

    calls.calls.clear()
    stuck_after = trainer_module.StepTimeout.after_step

    def fail_at_step_3(self, trainer, done, state, metrics):
        if done == 3:
            raise RuntimeError("injected failure at step 3")
        return stuck_after(self, trainer, done, state, metrics)

    monkeypatch.setattr(trainer_module.StepTimeout, "after_step", fail_at_step_3)
    with pytest.raises(RuntimeError, match="injected failure at step 3"):  # main re-raises in one process
        main([*run, f"run.dir={tmp_path / 'failed'}"])
    assert calls.calls[0] == "dump_traceback_later" and calls.calls[-1] == "cancel_dump_traceback_later"
    assert not _watchdog_threads()


def test_the_watchdog_is_off_at_0_and_refuses_a_nonpositive_timeout():
    assert trainer_module.StepTimeout(0.0).watchdog is None
    with pytest.raises(ValueError, match="must be positive"):
        Watchdog(0.0)


@pytest.mark.slow
def test_a_stopped_peer_ends_the_waiting_process_with_a_stack_dump(tmp_path):
    """SIGSTOP one of two processes: the other waits in a collective; the heartbeat sees nothing
    for distributed.timeout_s (set far above), the watchdog ends it first with its stacks."""
    local = _local_module()
    step_timeout, heartbeat = 15, 300
    port = local.free_port()
    args = train_args(tmp_path / "run", 100000, *MESH, "checkpoint.every=0", f"distributed.timeout_s={heartbeat}",
                      f"train.step_timeout_s={step_timeout}")
    procs, logs = [], [tmp_path / f"process{i}.log" for i in range(2)]
    for index in range(2):
        with open(logs[index], "w") as handle:
            procs.append(subprocess.Popen([sys.executable, "-m", "llm_jax.cli", *args],
                                          env=local.child_env(_env(), index, 2, 2, port), stdout=handle,
                                          stderr=subprocess.STDOUT))
    try:
        _wait_for(logs[0], "step 5/", timeout=180)
        procs[1].send_signal(signal.SIGSTOP)  # alive (its sockets open) but answering nothing
        code = procs[0].wait(timeout=heartbeat - 60)  # the heartbeat would end it later, with another code
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()  # SIGKILL ends a stopped process too
                proc.wait()
    output = Path(logs[0]).read_text(errors="replace")
    assert code == EXIT_CODE, output[-3000:]
    assert (f"error: no training step completed in {step_timeout} s (train.step_timeout_s); dumping every "
            f"thread's stack and exiting with code {EXIT_CODE}") in output
    dump = output.split("error: no training step", 1)[1]
    assert "Thread 0x" in dump and 'trainer.py", line' in dump and " in run\n" in dump, dump[-3000:]
