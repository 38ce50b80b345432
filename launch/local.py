#!/usr/bin/env python3
"""Run N `llm-jax` processes on this machine as if they were N hosts: the local stand-in for a cluster.

    python launch/local.py --processes 2 --devices-per-process 4 -- train gpt_tiny mesh.fsdp=-1 mesh.data=1

Each process gets M forced CPU devices and the coordinator address of a free loopback port
(through LLM_JAX_COORDINATOR, LLM_JAX_NUM_PROCESSES, LLM_JAX_PROCESS_ID). Every output line is
prefixed with `[i]`, the process index. If any process fails, the others get SIGTERM (then
SIGKILL after --grace seconds) and the launcher exits with the failed process's code. SIGTERM
or Ctrl-C to the launcher is passed on to every process, which then checkpoint and stop.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

POLL_S = 0.2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(base: dict[str, str], index: int, processes: int, devices: int, port: int) -> dict[str, str]:
    env = dict(base)
    # Drop a device-count flag inherited from the caller; each process gets exactly `devices`.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["LLM_JAX_COORDINATOR"] = f"127.0.0.1:{port}"
    env["LLM_JAX_NUM_PROCESSES"] = str(processes)
    env["LLM_JAX_PROCESS_ID"] = str(index)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _pump(index: int, stream, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            sys.stdout.write(f"[{index}] {line}" if line.endswith("\n") else f"[{index}] {line}\n")
            sys.stdout.flush()
    stream.close()


def _signal_all(procs: list[subprocess.Popen], sig: int) -> None:
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # it exited since poll()
                proc.send_signal(sig)


def stop_all(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM the live processes, then SIGKILL whatever is still running after `grace_s`."""
    _signal_all(procs, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(POLL_S)
    _signal_all(procs, signal.SIGKILL)
    for proc in procs:
        proc.wait()


def launch(llm_jax_args: list[str], processes: int, devices: int, grace_s: float) -> int:
    port = free_port()
    lock = threading.Lock()
    command = [sys.executable, "-m", "llm_jax.cli", *llm_jax_args]
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    for index in range(processes):
        proc = subprocess.Popen(command, env=child_env(os.environ, index, processes, devices, port),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        procs.append(proc)
        print(f"local: process {index} of {processes}: pid {proc.pid}, {devices} CPU devices, "
              f"coordinator 127.0.0.1:{port}", file=sys.stderr, flush=True)
        pump = threading.Thread(target=_pump, args=(index, proc.stdout, lock), daemon=True)
        pump.start()
        pumps.append(pump)

    # Pass SIGTERM/SIGINT on: every process then reaches the same step, checkpoints and exits.
    forward = lambda signum, _frame: _signal_all(procs, signal.SIGTERM)  # noqa: E731
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    code = 0
    while any(p.poll() is None for p in procs):
        failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
        if failed:
            index, code = failed[0]
            print(f"local: process {index} exited with code {code}; stopping the others", file=sys.stderr, flush=True)
            stop_all(procs, grace_s)
            break
        time.sleep(POLL_S)
    for pump in pumps:
        pump.join()
    if code == 0:
        codes = [p.returncode for p in procs]
        code = next((c for c in codes if c != 0), 0)
    # A negative code is death by signal: report it the way a shell does (128 + signal).
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s --processes N --devices-per-process M -- LLM_JAX_ARGS...")
    parser.add_argument("--processes", type=int, required=True, help="number of processes (stand-in hosts)")
    parser.add_argument("--devices-per-process", type=int, default=1, help="forced CPU devices in each process")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds between SIGTERM and SIGKILL when stopping the others after a failure")
    parser.add_argument("llm_jax_args", nargs=argparse.REMAINDER, help="arguments of llm-jax, after --")
    args = parser.parse_args(argv)
    rest = args.llm_jax_args[1:] if args.llm_jax_args[:1] == ["--"] else args.llm_jax_args
    if args.processes < 1 or args.devices_per_process < 1:
        print("error: --processes and --devices-per-process must be at least 1", file=sys.stderr)
        return 2
    if not rest:
        print("error: no llm-jax arguments after --, e.g. -- train gpt_tiny", file=sys.stderr)
        return 2
    return launch(rest, args.processes, args.devices_per_process, args.grace)


if __name__ == "__main__":
    sys.exit(main())
