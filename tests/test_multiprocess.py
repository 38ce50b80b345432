"""Several processes on localhost standing in for hosts: same losses as one process, checkpoints
across topologies, SIGTERM as an agreed stop, and a dead peer ending the run instead of a hang."""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from runs import REPO, TINY, alter_a_byte, losses, truncate_array_file

from llm_jax.runtime.checkpoint_integrity import write_manifest

pytestmark = pytest.mark.slow  # every test here starts several processes

LOCAL = REPO / "launch" / "local.py"
MESH = ["mesh.data=2", "mesh.fsdp=2"]


def _local_module():
    spec = importlib.util.spec_from_file_location("launch_local", LOCAL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_local(processes: int, devices: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(LOCAL), "--processes", str(processes),
                          "--devices-per-process", str(devices), "--", *args],
                         capture_output=True, text=True, timeout=timeout, env=_env())
    return out


def _env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the launcher sets each process's device count
    return env


def train_args(run_dir: Path, steps: int, *extra: str) -> list[str]:
    # A fixed decay length: a run stopped at step 4 follows the learning rates of the 8-step run.
    return ["train", "gpt_tiny", f"run.dir={run_dir}", f"train.steps={steps}", "checkpoint.every=4",
            "optim.decay_steps=8", *TINY, *extra]


def assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-4)


def test_two_processes_match_one_and_checkpoints_cross_topologies(tmp_path):
    reference = tmp_path / "one_process"
    done = run_local(1, 4, train_args(reference, 8, *MESH))
    assert done.returncode == 0, done.stdout[-3000:]
    want = losses(reference)

    # 2 processes x 2 devices for 4 steps, then the same run continued by 1 process x 4 devices.
    forward = tmp_path / "two_then_one"
    done = run_local(2, 2, train_args(forward, 4, *MESH))
    assert done.returncode == 0, done.stdout[-3000:]
    assert "[0] step 4/4" in done.stdout and "[1] step" not in done.stdout  # process 0 logs alone
    done = run_local(1, 4, train_args(forward, 8, *MESH))
    assert done.returncode == 0, done.stdout[-3000:]
    assert "resumed from checkpoint at step 4" in done.stdout
    assert_same_losses(losses(forward), want)

    # And the reverse: a single-process checkpoint continued by two processes, as two slices
    # (hybrid mesh: data across processes over "DCN", fsdp within each), past damaged newer
    # steps: 6 fails its manifest, 8 was damaged before its manifest was sealed again, so that
    # each process's Orbax restore fails and they must agree to go back to step 4.
    backward = tmp_path / "one_then_two"
    done = run_local(1, 4, train_args(backward, 8, *MESH, "checkpoint.every=2", "checkpoint.keep=3"))
    assert done.returncode == 0, done.stdout[-3000:]
    ckpts = backward / "checkpoints"
    truncate_array_file(ckpts / "8")
    write_manifest(ckpts / "8")
    alter_a_byte(ckpts / "6")
    done = run_local(2, 2, train_args(backward, 8, "mesh.dcn_data=2", "mesh.data=1", "mesh.fsdp=2"))
    assert done.returncode == 0, done.stdout[-3000:]
    for step, reason in ((8, "Orbax could not restore it: "), (6, "sha256 differs")):
        warning = f"warning: checkpoint step {step} is damaged ("
        assert warning in done.stdout and reason in done.stdout.split(warning)[1].splitlines()[0], done.stdout[-3000:]
    assert "resumed from checkpoint at step 4" in done.stdout
    assert sorted(p.name for p in (backward / "checkpoints_damaged").iterdir()) == ["6", "8"]
    assert_same_losses(losses(backward), want)


def test_sigterm_to_one_process_stops_all_at_one_checkpoint_and_resumes(tmp_path):
    steps = 80
    reference = tmp_path / "uninterrupted"
    done = run_local(1, 4, train_args(reference, steps, *MESH, "checkpoint.every=0"))
    assert done.returncode == 0, done.stdout[-3000:]

    run = tmp_path / "preempted"
    args = train_args(run, steps, *MESH, "checkpoint.every=0")
    launcher = subprocess.Popen([sys.executable, str(LOCAL), "--processes", "2", "--devices-per-process", "2",
                                 "--", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=_env())
    lines = []
    pids = {}
    for line in launcher.stdout:
        lines.append(line)
        if line.startswith("local: process "):
            index = int(line.split()[2])
            pids[index] = int(line.split("pid ")[1].split(",")[0])
        if line.startswith("[0] step 10/"):
            os.kill(pids[1], signal.SIGTERM)  # a preemption notice reaches one host only
            break
    rest, _ = launcher.communicate(timeout=120)
    output = "".join(lines) + rest
    assert launcher.returncode == 0, output[-3000:]
    stopped = [line for line in output.splitlines() if "stopped by SIGTERM at step" in line]
    assert stopped, output[-3000:]
    stop_step = int(stopped[0].split("at step ")[1].split()[0])
    assert 10 <= stop_step < steps
    assert (run / "checkpoints" / str(stop_step)).is_dir()
    assert max(losses(run)) == stop_step

    done = run_local(2, 2, args)  # the same command resumes
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"resumed from checkpoint at step {stop_step}" in done.stdout
    np.testing.assert_allclose(losses(run)[steps], losses(reference)[steps], rtol=1e-4)


def _wait_for(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path} after {timeout}s:\n{path.read_text(errors='replace')[-2000:]}")


def test_a_dead_process_ends_the_others_within_the_timeout(tmp_path):
    local = _local_module()
    timeout_s = 5
    for victim in (1, 0):  # a worker, then the coordinator itself
        run = tmp_path / f"kill{victim}"
        port = local.free_port()
        args = train_args(run, 100000, *MESH, "checkpoint.every=0", f"distributed.timeout_s={timeout_s}")
        procs, logs = [], []
        for index in range(2):
            log = tmp_path / f"kill{victim}.{index}.log"
            logs.append(log)
            env = local.child_env(_env(), index, 2, 2, port)
            with open(log, "w") as handle:
                procs.append(subprocess.Popen([sys.executable, "-m", "llm_jax.cli", *args], env=env,
                                              stdout=handle, stderr=subprocess.STDOUT))
        try:
            _wait_for(logs[0], "step 5/", timeout=120)
            procs[victim].kill()
            killed_at = time.monotonic()
            survivor = procs[1 - victim]
            code = survivor.wait(timeout=timeout_s + 30)
            elapsed = time.monotonic() - killed_at
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        assert code != 0, f"survivor of killing process {victim} exited 0"
        assert elapsed < timeout_s + 30


def test_local_launcher_fails_fast_with_the_processes_error(tmp_path):
    done = run_local(2, 1, ["train", "gpt_tiny", f"run.dir={tmp_path / 'run'}", "train.stpes=3"], timeout=120)
    assert done.returncode == 2
    assert "[0] error: unknown config key 'train.stpes'" in done.stdout
    assert "did you mean 'train.steps'?" in done.stdout
